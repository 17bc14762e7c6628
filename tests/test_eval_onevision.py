"""`llava-jax eval` on a tiny LLaVA-OneVision checkpoint: the runner passes each image's size and the OneVision
feature rows with their tap weights, moved to its fixed image slots, so every answer of a mixed batch (image and
text-only questions, a blank image slot, two devices) is what `llava_jax.generate` answers to that question
alone."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import hf_tiny
from eval_tiny_data import write_task_data
from llava_jax import generate, load_hf_checkpoint
from llava_jax.eval import evaluate, get_task, read_answers
from llava_jax.processor import Processor

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
  model = load_hf_checkpoint(hf_tiny.onevision_directory(tmp_path_factory.mktemp("ov_eval")))
  return model, Processor.from_model(model, template="chatml_direct")


def answer_alone(model, proc, question) -> str:
  """`generate`'s greedy answer to one question asked alone, cut at EOS (as the runner cuts)."""
  image = None if question.image is None else Image.open(question.image).convert("RGB")
  inputs = proc([proc.prompt([question.text], image=image is not None)], None if image is None else [image])
  pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
  eos = proc.tokenizer.eos_token_id
  tokens = generate(model, inputs["input_ids"], pixels, inputs["attention_mask"], image_sizes=inputs["image_sizes"],
                    max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=eos)[0]
  cut = np.flatnonzero(tokens == eos)
  return proc.decode(tokens[:cut[0]] if len(cut) else tokens).strip()


def test_onevision_checkpoint_answers_as_generate_does(onevision, tmp_path):
  model, proc = onevision
  assert model.config.is_onevision and proc.anyres.taps > 1
  data, out = write_task_data("scienceqa", str(tmp_path)), str(tmp_path / "out")
  # 3 questions (2 with images of different sizes, 1 text-only) in 4 rows over 2 devices: a blank image slot.
  evaluate("scienceqa", data, out, model=model, processor=proc, batch_size=4, max_new_tokens=NEW_TOKENS,
           progress=False, devices=jax.devices()[:2], print_fn=lambda *_: None)
  questions = get_task("scienceqa").questions(data)
  assert sum(q.image is not None for q in questions) == 2
  texts = [r["text"] for r in read_answers(os.path.join(out, "answers.jsonl"))]
  expected = [answer_alone(model, proc, q) for q in questions]
  assert any(expected)  # the comparison means something: not every answer is empty
  assert texts == expected
