"""The benchmarks in the reference's layout (`playground/data/eval/<task>/`, its docs/Evaluation.md): which files
hold the questions, images and annotations, how each question becomes a prompt (as the reference's
model_vqa_loader / model_vqa_science / model_vqa_mmbench build it), and how an answers file is scored (scoring.py).

`--data DIR` is the task's folder, e.g. playground/data/eval/pope. Answer records are the reference's
(`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`, plus MMBench's round fields), so its scripts
score our answers files and we score theirs.

The tasks live in tasks_open.py (free-form answers) and tasks_choice.py (multiple choice), their shared parts in
task_base.py; this module is the registry (`TASKS`, `get_task`) and the demo's own task (`shapes`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

from llava_jax.eval.task_base import (OPTION_LETTER, SHORT_ANSWER, Question, Task, answer_key, need, read_json,
                                      read_jsonl, write_json)
from llava_jax.eval.tasks_choice import MMBench, ScienceQA, Seed, read_mmbench
from llava_jax.eval.tasks_open import GQA, MME, VQAv2, Pope, TextVQA

__all__ = ["GQA", "MME", "OPTION_LETTER", "SHORT_ANSWER", "TASKS", "MMBench", "Pope", "Question", "ScienceQA", "Seed",
           "Shapes", "Task", "TextVQA", "VQAv2", "answer_key", "get_task", "read_json", "read_jsonl", "read_mmbench",
           "write_shapes_task"]


class Shapes(Task):
  """The demo's held-out questions (llava-jax demo), written as a task in the same layout: `llava_shapes_eval.jsonl`
  ({question_id, image, text, category}), images/, and `shapes_answers.json` ({question_id: expected answer})."""
  name, question_file, image_folder = "shapes", "llava_shapes_eval.jsonl", "images"
  max_new_tokens = 6
  question_fields = {**Task.question_fields, "category": str}
  ANSWERS = "shapes_answers.json"

  @staticmethod
  def first_word(text: str) -> str:
    words = text.lower().replace(".", " ").split()
    return words[0] if words else ""

  def score(self, data, answers, out):
    """An answer counts when its first word is the expected one; fractions overall and per category (the kind of
    question: colour, shape, background); unanswered questions count as wrong."""
    expected = read_json(need(os.path.join(data, self.ANSWERS)))
    questions = read_jsonl(need(os.path.join(data, self.question_file)), self.question_fields)
    given = {str(a["question_id"]): a["text"] for a in answers}
    per_category = defaultdict(list)
    for q in questions:
      qid = str(q["question_id"])
      per_category[q["category"]].append(self.first_word(given.get(qid, "")) == self.first_word(expected[qid]))
    hits = [h for v in per_category.values() for h in v]
    return {"accuracy": sum(hits) / max(len(hits), 1),
            "categories": {k: sum(v) / len(v) for k, v in sorted(per_category.items())}}


def write_shapes_task(data: str, samples: list[dict], image_dir: str) -> str:
  """The demo's eval.json records (one question each) -> the Shapes task's files under `data`."""
  os.makedirs(data, exist_ok=True)
  lines, expected = [], {}
  for i, s in enumerate(samples):
    question = s["conversations"][0]["value"].replace("<image>", "").strip()
    kind = "background" if "background" in question else "colour" if "colour" in question else "shape"
    lines.append({"question_id": i, "image": s["image"], "text": question, "category": kind})
    expected[str(i)] = s["conversations"][1]["value"]
  with open(os.path.join(data, Shapes.question_file), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  write_json(os.path.join(data, Shapes.ANSWERS), expected)
  link = os.path.join(data, Shapes.image_folder)
  if not os.path.exists(link):
    os.symlink(os.path.abspath(image_dir), link)
  return data


TASKS: dict[str, Task] = {t.name: t for t in (Pope(), TextVQA(), ScienceQA(), GQA(), MME(), MMBench(), Seed(),
                                                VQAv2(), Shapes())}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise KeyError(f"unknown evaluation task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]
