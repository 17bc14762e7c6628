"""What every benchmark task shares: a question as the model sees it and as the answer record names it, the key
that makes an answer unique (to resume a killed run), the reference's file readers, and the `Task` interface (its
question file, image folder, prompts and scorer). The tasks themselves: tasks_open.py (free-form answers: POPE,
TextVQA, GQA, MME, VQAv2) and tasks_choice.py (multiple choice: ScienceQA, MMBench, SEED); tasks.py has the registry.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from llava_jax.eval.inputs import image_path, read_json, read_jsonl  # noqa: F401 (the tasks' readers)

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass
class Question:
  question_id: Any
  text: str  # the user turn as the model sees it after "<image>\n": the question with the task's instruction
  prompt: str  # the answer record's "prompt", as the reference writes it
  image: str | Callable | None = None  # a file, a callable returning a PIL image, or None for a text-only question
  extra: dict = dataclasses.field(default_factory=dict)  # more answer-record fields (MMBench's round_id, options)
  image_error: str | None = None  # why `image` is refused (outside the image folder): skipped as a missing image

  @property
  def key(self) -> str:
    return answer_key({"question_id": self.question_id, "prompt": self.prompt, **self.extra})


def answer_key(record: dict) -> str:
  """What makes an answer unique: MME asks two questions per image under one question_id, and MMBench's rounds
  share one, so the prompt (and round) count too. Used to skip questions already answered when resuming."""
  return json.dumps([str(record["question_id"]), record.get("prompt", ""), record.get("round_id", 0)])


def need(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (see docs/EVALUATION.md for the layout of each task)")
  return path


def write_json(path: str, content) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(content, f)
  return path


QUESTION_ID = (int, str)


class Task:
  """One benchmark: its question file, image folder and scorer."""
  name = ""
  question_file = ""
  image_folder = ""
  max_new_tokens = 128  # model_vqa_loader's default; ScienceQA and MMBench use 1024
  # What each question line and each answer record must hold (the scorers read these), checked line by line.
  question_fields = {"question_id": QUESTION_ID, "text": str, "image": str}
  answer_fields = {"question_id": QUESTION_ID, "text": str}

  def questions(self, data: str) -> list[Question]:
    """The reference's model_vqa_loader: "<image>\\n" + the line's text, which already ends with the task's
    instruction; the answer's prompt is that text."""
    lines = read_jsonl(need(os.path.join(data, self.question_file)), self.question_fields)
    out = []
    for line in self._keep(data, lines):
      image, error = self.image(data, line["image"])
      out.append(Question(line["question_id"], line["text"], line["text"], image, image_error=error))
    return out

  def image(self, data: str, name) -> tuple[str, str | None]:
    """The image file a question names, and why it is refused if it leaves the task's image folder."""
    return image_path(os.path.join(data, self.image_folder), name)

  def _keep(self, data: str, lines: list[dict]) -> list[dict]:
    return lines

  def score(self, data: str, answers: list[dict], out: str) -> dict:
    raise NotImplementedError

