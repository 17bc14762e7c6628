"""A tiny data folder in the reference's layout for every evaluation task (a few questions, small random images,
annotations the scorers accept), for end-to-end runs of `llava-jax eval`."""

from __future__ import annotations

import base64
import csv
import io
import json
import os

import numpy as np
from PIL import Image

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def _image(seed: int) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30 + seed % 7, 40, 3), np.uint8))


def _save_image(path: str, seed: int):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _image(seed).save(path)


def _jsonl(path: str, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _json(path: str, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(content, f)


def write_task_data(task: str, root: str) -> str:
  """Writes `root/<task>` and returns it."""
  data = os.path.join(root, task)
  if task == "pope":
    qs = [("adversarial", "Is there a dog in the image?"), ("adversarial", "Is there a cat in the image?"),
          ("random", "Is there a car in the image?")]
    _jsonl(os.path.join(data, "llava_pope_test.jsonl"),
           [{"question_id": i, "image": f"COCO_{i}.jpg", "text": t + SHORT, "category": c}
            for i, (c, t) in enumerate(qs)])
    for i in range(len(qs)):
      _save_image(os.path.join(data, "val2014", f"COCO_{i}.jpg"), i)
    _jsonl(os.path.join(data, "coco", "coco_pope_adversarial.json"), [{"label": "yes"}, {"label": "no"}])
    _jsonl(os.path.join(data, "coco", "coco_pope_random.json"), [{"label": "yes"}])
  elif task == "textvqa":
    qs = [("img1", "what is written here?"), ("img2", "what brand is it?")]
    _jsonl(os.path.join(data, "llava_textvqa_val_v051_ocr.jsonl"),
           [{"question_id": img, "image": f"{img}.jpg", "text": f"{q}\nReference OCR token: abc" + SHORT}
            for img, q in qs])
    for i, (img, _) in enumerate(qs):
      _save_image(os.path.join(data, "train_images", f"{img}.jpg"), 10 + i)
    _json(os.path.join(data, "TextVQA_0.5.1_val.json"),
          {"data": [{"image_id": img, "question": q, "answers": ["abc"] * 10} for img, q in qs]})
  elif task == "scienceqa":
    _json(os.path.join(data, "llava_test_CQM-A.json"), [
        {"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nWhich colour?\n"
                                                               "A. red\nB. blue"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Context: none.\nWhich is a fruit?\nA. apple\n"
                                                                 "B. stone"}]},
        {"id": "3", "image": "3/image.png", "conversations": [{"from": "human", "value": "What is shown?\nA. x\n"
                                                               "B. y\nC. z"}]}])
    _save_image(os.path.join(data, "images", "test", "1", "image.png"), 20)
    _save_image(os.path.join(data, "images", "test", "3", "image.png"), 21)
    _json(os.path.join(data, "problems.json"), {"1": {"choices": ["red", "blue"], "answer": 0},
                                                "2": {"choices": ["apple", "stone"], "answer": 0},
                                                "3": {"choices": ["x", "y", "z"], "answer": 2}})
    _json(os.path.join(data, "pid_splits.json"), {"test": ["1", "2", "3"]})
  elif task == "gqa":
    _jsonl(os.path.join(data, "llava_gqa_testdev_balanced.jsonl"),
           [{"question_id": f"20{i}", "image": f"n{i}.jpg", "text": q + SHORT}
            for i, q in enumerate(["Is the sky blue?", "What colour is the car on the left side?"])])
    for i in range(2):
      _save_image(os.path.join(data, "data", "images", f"n{i}.jpg"), 30 + i)
    _json(os.path.join(data, "data", "testdev_balanced_questions.json"),
          {"200": {"answer": "yes", "isBalanced": True}, "201": {"answer": "red", "isBalanced": True}})
  elif task == "mme":
    root_dir = os.path.join(data, "MME_Benchmark_release_version", "existence")
    _save_image(os.path.join(root_dir, "000.jpg"), 40)
    with open(os.path.join(root_dir, "000.txt"), "w") as f:
      f.write("Is there a dog in this image? Please answer yes or no.\tYes\n"
              "Is there a cat in this image? Please answer yes or no.\tNo\n")
    _jsonl(os.path.join(data, "llava_mme.jsonl"),
           [{"question_id": "existence/000.jpg", "image": "existence/000.jpg", "text": q + SHORT,
             "category": "existence"} for q in ("Is there a dog in this image?", "Is there a cat in this image?")])
  elif task == "mmbench":
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
               "comment", "split", "image"]
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "mmbench_dev_20230712.tsv"), "w", newline="") as f:
      writer = csv.writer(f, delimiter="\t")
      writer.writerow(columns)
      for index, (answer, hint) in enumerate([("A", "nan"), ("B", "A hint.")]):
        buf = io.BytesIO()
        _image(50 + index).save(buf, format="PNG")
        row = {"index": index, "question": "What is in the image?", "hint": hint, "A": "a cat", "B": "a dog",
               "C": "a bird", "D": "", "answer": answer, "category": "object", "split": "dev",
               "image": base64.b64encode(buf.getvalue()).decode()}
        writer.writerow([row.get(c, "") for c in columns])
  elif task == "seed":
    _jsonl(os.path.join(data, "llava-seed-bench.jsonl"),
           [{"question_id": str(100 + i), "image": f"SEED-Bench-image/{i}.jpg",
             "text": "What is shown?\nA. one\nB. two\nC. three\nD. four" + LETTER} for i in range(2)])
    for i in range(2):
      _save_image(os.path.join(data, "SEED-Bench-image", f"{i}.jpg"), 60 + i)
    _json(os.path.join(data, "SEED-Bench.json"), {
        "question_type": {"Scene Understanding": 1},
        "questions": [{"question_id": str(100 + i), "question_type_id": 1, "answer": "A", "data_type": "image"}
                      for i in range(2)]})
  elif task == "vqav2":
    rows = [{"question_id": 7 + i, "image": f"COCO_test2015_{i}.jpg", "text": q + SHORT}
            for i, q in enumerate(["How many people?", "What is the man holding?"])]
    _jsonl(os.path.join(data, "llava_vqav2_mscoco_test-dev2015.jsonl"), rows)
    for i in range(2):
      _save_image(os.path.join(data, "test2015", f"COCO_test2015_{i}.jpg"), 70 + i)
  else:
    raise KeyError(task)
  return data


def write_tiny_checkpoint(root: str) -> str:
  """A random tiny llava-jax checkpoint (the demo's tokenizer, CLIP and LLaMA parts) under `root`; returns its path."""
  from llava_jax.convert import convert_checkpoint
  from llava_jax.data.synthetic import build_tokenizer
  from llava_jax.demo import write_tiny_hf_parts

  tokenizer = build_tokenizer(os.path.join(root, "tokenizer"))
  clip, llm = write_tiny_hf_parts(os.path.join(root, "hf"), tokenizer, seed=0)
  convert_checkpoint(os.path.join(root, "ckpt"), clip=clip, llm=llm, progress=False)
  return os.path.join(root, "ckpt")


def rewrite_line(path: str, number: int, text: str):
  """Replaces line `number` (1-based) of a text file with `text`, as a hand edit or a bad export would."""
  with open(path) as f:
    lines = f.read().split("\n")
  lines[number - 1] = text
  with open(path, "w") as f:
    f.write("\n".join(lines))
