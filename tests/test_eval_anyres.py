"""`llava-jax eval` on a tiny LLaVA-NeXT (anyres) checkpoint: the runner passes each image's size through, so every
answer of a mixed batch (image and text-only questions, padded rows, two devices) is what transformers'
LlavaNextForConditionalGeneration answers to that question alone."""

import os

import jax
import numpy as np
import pytest
import torch

import hf_tiny
from eval_tiny_data import write_task_data
from llava_jax.eval import evaluate, get_task, read_answers

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
  """LLaVA-NeXT (anyres, 56-px tiles): transformers\' model, ours and our processor (hf_tiny.next_checkpoint)."""
  return hf_tiny.next_checkpoint(str(tmp_path_factory.mktemp("next_ckpt")))


def transformers_answer(hf, proc, question) -> str:
  """transformers' greedy answer to one question asked alone, cut at EOS."""
  from PIL import Image

  image = None if question.image is None else Image.open(question.image).convert("RGB")
  inputs = proc(proc.prompt([question.text], image=image is not None), None if image is None else [image])
  kwargs = dict(input_ids=torch.as_tensor(inputs["input_ids"], dtype=torch.long),
                attention_mask=torch.as_tensor(inputs["attention_mask"], dtype=torch.long))
  if image is not None:
    kwargs["pixel_values"] = torch.from_numpy(np.ascontiguousarray(inputs["pixel_values"].transpose(0, 1, 4, 2, 3)))
    kwargs["image_sizes"] = torch.as_tensor(inputs["image_sizes"], dtype=torch.long)
  eos = proc.tokenizer.eos_token_id
  with torch.no_grad():
    tokens = hf.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)[0, kwargs["input_ids"].shape[1]:].numpy()
  cut = np.flatnonzero(tokens == eos)
  return proc.decode(tokens[:cut[0]] if len(cut) else tokens).strip()


def test_next_checkpoint_answers_as_transformers_does(next_model, tmp_path):
  hf, model, proc = next_model
  assert model.config.is_next and proc.anyres is not None
  data, out = write_task_data("scienceqa", str(tmp_path)), str(tmp_path / "out")
  # 3 questions (2 with images of different sizes, 1 text-only) in 4 rows over 2 devices: a blank image slot.
  evaluate("scienceqa", data, out, model=model, processor=proc, batch_size=4, max_new_tokens=NEW_TOKENS,
           progress=False, devices=jax.devices()[:2], print_fn=lambda *_: None)
  questions = get_task("scienceqa").questions(data)
  assert sum(q.image is not None for q in questions) == 2
  texts = [r["text"] for r in read_answers(os.path.join(out, "answers.jsonl"))]
  expected = [transformers_answer(hf, proc, q) for q in questions]
  assert any(expected)  # the comparison means something: not every answer is empty
  assert texts == expected
