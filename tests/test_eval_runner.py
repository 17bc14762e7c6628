"""`llava-jax eval` end to end on a tiny random model: every task generates then scores; a batch answers each
question as that question alone would be answered; a killed run resumes without redoing answered questions; 1, 2
and 8 devices give the same answers; a missing or broken image is counted and skipped."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval_tiny_data import write_task_data
from llava_jax import load_checkpoint
from llava_jax.cli import main as cli
from llava_jax.convert import convert_checkpoint
from llava_jax.demo import write_tiny_hf_parts
from llava_jax.data.synthetic import build_tokenizer
from llava_jax.eval import evaluate, get_task, read_answers
from llava_jax.processor import Processor

NEW_TOKENS = 4
METRIC_NAMES = {"textvqa": {"accuracy"}, "scienceqa": {"accuracy", "img_accuracy"}, "gqa": {"accuracy"},
                "mmbench": {"accuracy"}, "seed": {"accuracy", "per_type"},
                "mme": {"perception", "cognition", "subtasks"},
                "vqav2": {"submission"}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_model")
  tokenizer = build_tokenizer(str(root / "tokenizer"))
  clip, llm = write_tiny_hf_parts(str(root / "hf"), tokenizer, seed=0)
  convert_checkpoint(str(root / "ckpt"), clip=clip, llm=llm, progress=False)
  return str(root / "ckpt")


@pytest.fixture(scope="module")
def loaded(ckpt):
  model = load_checkpoint(ckpt)
  return model, Processor.from_model(model)


def _alone(model, proc, question) -> str:
  """The greedy answer to one question by itself (batch 1), cut at EOS: what every batched row must reproduce."""
  from PIL import Image

  image = None
  if question.image is not None:
    image = question.image() if callable(question.image) else Image.open(question.image).convert("RGB")
  inputs = proc(proc.prompt([question.text], image=image is not None), [image] if image is not None else None)
  pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
  from llava_jax import generate

  tokens = generate(model, inputs["input_ids"], pixels, inputs["attention_mask"], max_new_tokens=NEW_TOKENS,
                    eos_token_id=proc.tokenizer.eos_token_id, pad_token_id=proc.tokenizer.eos_token_id)[0]
  eos = np.flatnonzero(tokens == proc.tokenizer.eos_token_id)
  return proc.decode(tokens[:eos[0]] if len(eos) else tokens).strip()


@pytest.mark.parametrize("task", ["pope", "textvqa", "scienceqa", "gqa", "mme", "mmbench", "seed", "vqav2"])
def test_generate_then_score(task, loaded, tmp_path):
  model, proc = loaded
  data, out = write_task_data(task, str(tmp_path)), str(tmp_path / "out")
  metrics = evaluate(task, data, out, model=model, processor=proc, batch_size=4, max_new_tokens=NEW_TOKENS,
                     progress=False, print_fn=lambda *_: None)
  questions = get_task(task).questions(data)
  records = read_answers(os.path.join(out, "answers.jsonl"))
  assert [r["question_id"] for r in records] == [q.question_id for q in questions]
  for record, question in zip(records, questions):
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(record)
    assert record["prompt"] == question.prompt
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == json.loads(json.dumps(metrics))
  if task == "pope":
    assert set(metrics) == {"adversarial", "random"}
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(metrics["random"])
  else:
    assert METRIC_NAMES[task] <= set(metrics)
  if task in ("scienceqa", "mmbench"):  # a mixed image / text-only batch, and inline (base64) images
    assert [r["text"] for r in records] == [_alone(model, proc, q) for q in questions]
  assert not os.listdir(out) or not [f for f in os.listdir(out) if ".part" in f]  # parts merged away


def test_command_line(ckpt, tmp_path, capsys):
  data, out = write_task_data("gqa", str(tmp_path)), str(tmp_path / "out")
  assert cli(["eval", "--task", "gqa", "--data", data, "--ckpt", ckpt, "--out", out, "--max-new-tokens", "4",
              "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "questions/s" in printed and "accuracy" in printed
  records = read_answers(os.path.join(out, "answers.jsonl"))
  assert len(records) == 2 and records[0]["model_id"] == "ckpt"
  assert cli(["eval", "--task", "gqa", "--data", data, "--out", out]) == 2  # neither --ckpt nor --answers


def test_killed_run_resumes_without_repeating(loaded, tmp_path, monkeypatch):
  model, proc = loaded
  data, out = write_task_data("pope", str(tmp_path)), str(tmp_path / "out")
  runner = importlib.import_module("llava_jax.eval.runner")
  real, calls = runner._greedy, []  # pylint: disable=protected-access  (one call per batch)

  def dies_on_second_call(*args, **kwargs):
    calls.append(args[2].shape[0])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(runner, "_greedy", dies_on_second_call)
  one_device = jax.devices()[:1]
  with pytest.raises(KeyboardInterrupt):  # batches of one question: the first is written, then the run dies
    evaluate("pope", data, out, model=model, processor=proc, batch_size=1, max_new_tokens=NEW_TOKENS,
             progress=False, devices=one_device, print_fn=lambda *_: None)
  parts = [f for f in os.listdir(out) if f.startswith("answers.part")]
  first = read_answers(os.path.join(out, parts[0]))
  assert len(first) == 1
  with open(os.path.join(out, parts[0]), "a") as f:
    f.write('{"question_id": 2, "prompt": "cut sho')  # a line cut short by the kill: redone
  calls.clear()
  monkeypatch.setattr(runner, "_greedy", lambda *a, **k: (calls.append(a[2].shape[0]), real(*a, **k))[1])
  evaluate("pope", data, out, model=model, processor=proc, batch_size=1, max_new_tokens=NEW_TOKENS, progress=False,
           devices=one_device, print_fn=lambda *_: None)
  assert len(calls) == 2  # only the two unanswered questions
  records = read_answers(os.path.join(out, "answers.jsonl"))
  assert [r["question_id"] for r in records] == [0, 1, 2]
  assert first[0] in records  # the answer from before the kill is kept as it was (same answer_id)
  with open(os.path.join(out, "run.json")) as f:
    assert json.load(f)["already_answered"] == 1


def test_one_two_and_eight_devices_give_the_same_answers(loaded, tmp_path):
  model, proc = loaded
  assert len(jax.devices()) == 8  # tests/conftest.py
  data = write_task_data("scienceqa", str(tmp_path))
  texts = []
  for n in (1, 2, 8):
    out = str(tmp_path / f"out{n}")
    evaluate("scienceqa", data, out, model=model, processor=proc, batch_size=8, max_new_tokens=NEW_TOKENS,
             progress=False, devices=jax.devices()[:n], print_fn=lambda *_: None)
    texts.append([r["text"] for r in read_answers(os.path.join(out, "answers.jsonl"))])
  assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 3


def test_missing_and_broken_images_are_counted_and_skipped(loaded, tmp_path):
  model, proc = loaded
  data, out = write_task_data("pope", str(tmp_path)), str(tmp_path / "out")
  os.remove(os.path.join(data, "val2014", "COCO_0.jpg"))
  with open(os.path.join(data, "val2014", "COCO_1.jpg"), "wb") as f:
    f.write(b"not an image")
  printed = []
  evaluate("pope", data, out, model=model, processor=proc, batch_size=4, max_new_tokens=NEW_TOKENS, progress=False,
           print_fn=printed.append)
  with open(os.path.join(out, "run.json")) as f:
    report = json.load(f)
  assert [e["question_id"] for e in report["image_errors"]] == [0, 1]
  assert [r["question_id"] for r in read_answers(os.path.join(out, "answers.jsonl"))] == [2]
  assert any("2 question(s) skipped" in line for line in printed)


def test_demo_scores_its_held_out_questions_through_the_evaluator(ckpt, tmp_path):
  from llava_jax import demo
  from llava_jax.data.synthetic import write_shapes_corpus

  paths = write_shapes_corpus(str(tmp_path / "data"), num_train=1, num_eval=5, seed=0)
  accuracy, results = demo.evaluate(ckpt, paths["eval"], paths["image_dir"])
  assert len(results) == 5
  assert accuracy == sum(demo._first_word(a) == demo._first_word(e) for _, e, a in results) / 5  # noqa: SLF001
  assert os.path.exists(tmp_path / "data" / "shapes_eval" / "metrics.json")
