"""The multiple-choice tasks in the reference's layout: ScienceQA (model_vqa_science's single-prediction prompt),
MMBench (model_vqa_mmbench's hint, options and letter instruction; base64 images in the TSV) and SEED-Bench's image
split, each scored as the reference scores it (scoring.py)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
from collections import defaultdict

from llava_jax.eval import scoring
from llava_jax.eval.inputs import EvalInputError, check_fields
from llava_jax.eval.task_base import OPTION_LETTER, QUESTION_ID, Question, Task, need, read_json


class ScienceQA(Task):
  name, question_file, image_folder = "scienceqa", "llava_test_CQM-A.json", "images/test"
  max_new_tokens = 1024
  question_fields = {"id": QUESTION_ID, "conversations": list}
  answer_fields = {**Task.answer_fields, "prompt": str}  # image questions are told apart by their prompt

  def questions(self, data):
    """model_vqa_science with --single-pred-prompt: the first turn without "<image>", the letter instruction on a
    new line; image questions get "<image>\\n" in front of the prompt the answer records."""
    path = need(os.path.join(data, self.question_file))
    lines = read_json(path)
    if not isinstance(lines, list):
      raise EvalInputError(f"{path}: expected a JSON list of questions, got {type(lines).__name__}")
    out = []
    for number, line in enumerate(lines):
      where = f"{path}: entry {number}"
      check_fields(line, self.question_fields, where)
      if not line["conversations"] or not isinstance(line["conversations"][0], dict):
        raise EvalInputError(f"{where}: 'conversations' has no first turn")
      check_fields(line["conversations"][0], {"value": str}, f"{where}, first turn")
      qs = line["conversations"][0]["value"].replace("<image>", "").strip()
      text = qs + "\n" + OPTION_LETTER
      image, error = self.image(data, line["image"]) if "image" in line else (None, None)
      out.append(Question(line["id"], text, ("<image>\n" if image else "") + text, image, image_error=error))
    return out

  def score(self, data, answers, out):
    """eval_science_qa: every problem of the test split; a missing prediction is 'FAILED' (wrong) and, as its prompt
    is unknown, not an image question; IMG-accuracy over answers whose prompt holds "<image>"."""
    split = read_json(need(os.path.join(data, "pid_splits.json")))["test"]
    problems = read_json(need(os.path.join(data, "problems.json")))
    predictions = {str(a["question_id"]): a for a in answers}
    correct = total = img_correct = img_total = 0
    for pid in split:
      pred = predictions.get(str(pid), {"text": "FAILED", "prompt": "Unknown"})
      problem = problems[pid]
      hit = scoring.sqa_choice_index(scoring.sqa_parse(pred["text"]), len(problem["choices"])) == problem["answer"]
      correct, total = correct + hit, total + 1
      if "<image>" in pred["prompt"]:
        img_correct, img_total = img_correct + hit, img_total + 1
    return {"accuracy": 100 * correct / max(total, 1), "img_accuracy": 100 * img_correct / max(img_total, 1),
            "correct": correct, "count": total, "missing": sum(str(p) not in predictions for p in split)}


_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _is_none(value) -> bool:
  """model_vqa_mmbench.is_none on a cell as pandas.read_table gives it (its default NA strings become NaN)."""
  return value is None or value in _PANDAS_NA or value.lower() in ("nan", "none")


def read_mmbench(path: str) -> list[dict]:
  csv.field_size_limit(sys.maxsize)  # base64 images
  with open(path, newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


class MMBench(Task):
  name, question_file = "mmbench", "mmbench_dev_20230712.tsv"
  max_new_tokens = 1024
  LETTERS = ("A", "B", "C", "D")

  def questions(self, data):
    """model_vqa_mmbench with --single-pred-prompt, one round (the file already holds the circular copies): hint,
    question and 'X. option' lines; the letter instruction is added for the model but not to the recorded prompt."""
    out = []
    for row in read_mmbench(need(os.path.join(data, self.question_file))):
      options = []
      for letter in self.LETTERS:
        if _is_none(row.get(letter)):
          break
        options.append(row[letter])
      question = row["question"] if _is_none(row.get("hint")) else row["hint"] + "\n" + row["question"]
      for letter, option in zip(self.LETTERS, options):
        question += "\n" + letter + ". " + option
      encoded = row["image"]
      out.append(Question(int(row["index"]), question + "\n" + OPTION_LETTER, question,
                          lambda encoded=encoded: _image_from_base64(encoded),
                          {"round_id": 0, "options": options, "option_char": list(self.LETTERS[:len(options)])}))
    return out

  def score(self, data, answers, out):
    """The submission table (convert_mmbench_for_submission: the file's columns less hint/category/source/image/
    comment/l2-category, with 'prediction') and, where the file has answers (dev), circular-evaluation accuracy."""
    rows = read_mmbench(need(os.path.join(data, self.question_file)))
    predicted = {}
    for a in answers:
      predicted[str(a["question_id"])] = a["text"]
    dropped = {"hint", "category", "source", "image", "comment", "l2-category"}
    columns = [c for c in rows[0].keys() if c not in dropped] if rows else []
    columns.insert(min(6, len(columns)), "prediction")
    upload = os.path.join(out, "answers_upload", os.path.splitext(self.question_file)[0] + ".tsv")
    os.makedirs(os.path.dirname(upload), exist_ok=True)
    with open(upload, "w", newline="") as f:
      writer = csv.writer(f, delimiter="\t")
      writer.writerow(columns)
      for row in rows:
        writer.writerow([predicted.get(row["index"], "") if c == "prediction" else row.get(c, "") for c in columns])
    metrics = {"submission": upload, "answered": len(predicted)}
    if rows and "answer" in rows[0] and not any(_is_none(r.get("answer")) for r in rows):
      graded = [{"index": int(r["index"]), "answer": r["answer"], "category": r.get("category"),
                 "prediction": predicted.get(r["index"]),
                 "options": {k: r[k] for k in self.LETTERS if not _is_none(r.get(k))}} for r in rows]
      metrics.update(scoring.mmbench_circular(graded))
    return metrics


def _image_from_base64(encoded: str):
  from PIL import Image

  with Image.open(io.BytesIO(base64.b64decode(encoded))) as im:
    return im.convert("RGB")


class Seed(Task):
  name, question_file, image_folder = "seed", "llava-seed-bench.jsonl", ""
  ANNOTATION = "SEED-Bench.json"

  def _keep(self, data, lines):
    """The image split: questions the annotation marks data_type 'image' (without it, those under
    SEED-Bench-image/)."""
    path = os.path.join(data, self.ANNOTATION)
    if os.path.exists(path):
      image_ids = {str(q["question_id"]) for q in read_json(path)["questions"] if q["data_type"] == "image"}
      return [line for line in lines if str(line["question_id"]) in image_ids]
    return [line for line in lines if line["image"].startswith("SEED-Bench-image")]

  def score(self, data, answers, out):
    """convert_seed_for_submission with eval_only_type='image': the text must equal the answer letter; per question
    type and total in percent over every image question of the annotation (a missing answer is wrong); and its
    upload file (question_id, prediction)."""
    annotation = read_json(need(os.path.join(data, self.ANNOTATION)))
    names = {v: k for k, v in annotation["question_type"].items()}
    results = {str(a["question_id"]): a["text"] for a in answers}
    counts, right = defaultdict(int), defaultdict(int)
    upload = os.path.join(out, "answers_upload", "seed_bench.jsonl")
    os.makedirs(os.path.dirname(upload), exist_ok=True)
    with open(upload, "w") as f:
      for q in annotation["questions"]:
        if str(q["question_id"]) in results:
          f.write(json.dumps({"question_id": q["question_id"], "prediction": results[str(q["question_id"])]}) + "\n")
        if q["data_type"] != "image":
          continue
        counts[q["question_type_id"]] += 1
        right[q["question_type_id"]] += results.get(str(q["question_id"])) == q["answer"]
    per_type = {names.get(t, str(t)): 100 * right[t] / counts[t] for t in sorted(counts)}
    return {"accuracy": 100 * sum(right.values()) / max(sum(counts.values()), 1), "per_type": per_type,
            "submission": upload}
