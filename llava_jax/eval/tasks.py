"""The benchmarks in the reference's layout (`playground/data/eval/<task>/`, its docs/Evaluation.md): which files
hold the questions, images and annotations, how each question becomes a prompt (as the reference's
model_vqa_loader / model_vqa_science / model_vqa_mmbench build it), and how an answers file is scored (scoring.py).

`--data DIR` is the task's folder, e.g. playground/data/eval/pope. Answer records are the reference's
(`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`, plus MMBench's round fields), so its scripts
score our answers files and we score theirs.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import os
import sys
from collections import defaultdict
from typing import Any, Callable

from llava_jax.eval import scoring

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass
class Question:
  question_id: Any
  text: str  # the user turn as the model sees it after "<image>\n": the question with the task's instruction
  prompt: str  # the answer record's "prompt", as the reference writes it
  image: str | Callable | None = None  # a file, a callable returning a PIL image, or None for a text-only question
  extra: dict = dataclasses.field(default_factory=dict)  # more answer-record fields (MMBench's round_id, options)

  @property
  def key(self) -> str:
    return answer_key({"question_id": self.question_id, "prompt": self.prompt, **self.extra})


def answer_key(record: dict) -> str:
  """What makes an answer unique: MME asks two questions per image under one question_id, and MMBench's rounds
  share one, so the prompt (and round) count too. Used to skip questions already answered when resuming."""
  return json.dumps([str(record["question_id"]), record.get("prompt", ""), record.get("round_id", 0)])


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _need(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (see docs/EVALUATION.md for the layout of each task)")
  return path


def _write_json(path: str, content) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(content, f)
  return path


class Task:
  """One benchmark: its question file, image folder and scorer."""
  name = ""
  question_file = ""
  image_folder = ""
  max_new_tokens = 128  # model_vqa_loader's default; ScienceQA and MMBench use 1024

  def questions(self, data: str) -> list[Question]:
    """The reference's model_vqa_loader: "<image>\\n" + the line's text, which already ends with the task's
    instruction; the answer's prompt is that text."""
    lines = read_jsonl(_need(os.path.join(data, self.question_file)))
    return [Question(line["question_id"], line["text"], line["text"],
                     os.path.join(data, self.image_folder, line["image"])) for line in self._keep(data, lines)]

  def _keep(self, data: str, lines: list[dict]) -> list[dict]:
    return lines

  def score(self, data: str, answers: list[dict], out: str) -> dict:
    raise NotImplementedError


class Pope(Task):
  name, question_file, image_folder = "pope", "llava_pope_test.jsonl", "val2014"

  def score(self, data, answers, out):
    """Per category (the coco/coco_pope_<category>.json files): the category's answers against the labels, the n-th
    question of a category with the n-th label line, as eval_pope zips them."""
    questions = read_jsonl(_need(os.path.join(data, self.question_file)))
    position, category_of = {}, {}
    counters = defaultdict(int)
    for q in questions:
      position[str(q["question_id"])] = counters[q["category"]]
      category_of[str(q["question_id"])] = q["category"]
      counters[q["category"]] += 1
    by_category = defaultdict(list)
    for a in answers:
      qid = str(a["question_id"])
      if qid in category_of:
        by_category[category_of[qid]].append(a)
    metrics = {}
    annotation_dir = _need(os.path.join(data, "coco"))
    for file in sorted(os.listdir(annotation_dir)):
      if not (file.startswith("coco_pope_") and file.endswith(".json")):
        continue
      category = file[len("coco_pope_"):-len(".json")]
      labels = [line["label"] for line in read_jsonl(os.path.join(annotation_dir, file))]
      mine = by_category.get(category, [])
      preds = [scoring.pope_yes_no(a["text"]) for a in mine]
      metrics[category] = scoring.pope_metrics(preds, [labels[position[str(a["question_id"])]] for a in mine])
      metrics[category].update(answered=len(mine), questions=counters.get(category, 0))
    return metrics


class TextVQA(Task):
  name, question_file, image_folder = "textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images"

  def score(self, data, answers, out):
    """eval_textvqa: each answer's annotation found by (question_id = image id, question from the prompt); VQA soft
    accuracy in percent over the answers present."""
    annotations = read_json(_need(os.path.join(data, "TextVQA_0.5.1_val.json")))["data"]
    table = {(a["image_id"], a["question"].lower()): a for a in annotations}
    scores = [scoring.vqa_accuracy(a["text"], table[(a["question_id"], scoring.textvqa_question(a["prompt"]))]
                                   ["answers"]) for a in answers]
    return {"accuracy": 100 * sum(scores) / max(len(scores), 1), "answered": len(scores)}


class ScienceQA(Task):
  name, question_file, image_folder = "scienceqa", "llava_test_CQM-A.json", "images/test"
  max_new_tokens = 1024

  def questions(self, data):
    """model_vqa_science with --single-pred-prompt: the first turn without "<image>", the letter instruction on a
    new line; image questions get "<image>\\n" in front of the prompt the answer records."""
    out = []
    for line in read_json(_need(os.path.join(data, self.question_file))):
      qs = line["conversations"][0]["value"].replace("<image>", "").strip()
      text = qs + "\n" + OPTION_LETTER
      image = os.path.join(data, self.image_folder, line["image"]) if "image" in line else None
      out.append(Question(line["id"], text, ("<image>\n" if image else "") + text, image))
    return out

  def score(self, data, answers, out):
    """eval_science_qa: every problem of the test split; a missing prediction is 'FAILED' (wrong) and, as its prompt
    is unknown, not an image question; IMG-accuracy over answers whose prompt holds "<image>"."""
    split = read_json(_need(os.path.join(data, "pid_splits.json")))["test"]
    problems = read_json(_need(os.path.join(data, "problems.json")))
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


class GQA(Task):
  name, question_file, image_folder = "gqa", "llava_gqa_testdev_balanced.jsonl", "data/images"
  QUESTIONS = ("data/testdev_balanced_questions.json", "data/questions1.2/testdev_balanced_questions.json",
               "testdev_balanced_questions.json")

  def score(self, data, answers, out):
    """convert_gqa_for_eval writes the predictions GQA's eval.py reads (OUT/testdev_balanced_predictions.json);
    accuracy is its exact match over the balanced questions, in percent. GQA's script refuses a missing prediction;
    here it counts as wrong and is reported."""
    predictions = [{"questionId": a["question_id"], "prediction": scoring.gqa_prediction(a["text"])} for a in answers]
    _write_json(os.path.join(out, "testdev_balanced_predictions.json"), predictions)
    path = next((os.path.join(data, p) for p in self.QUESTIONS if os.path.exists(os.path.join(data, p))), None)
    questions = read_json(_need(path or os.path.join(data, self.QUESTIONS[0])))
    by_id = {str(p["questionId"]): p["prediction"] for p in predictions}
    balanced = [(qid, q) for qid, q in questions.items() if q.get("isBalanced", True)]
    right = sum(by_id.get(str(qid)) == q["answer"] for qid, q in balanced)
    return {"accuracy": 100 * right / max(len(balanced), 1),
            "missing": sum(str(qid) not in by_id for qid, _ in balanced)}


class MME(Task):
  name, question_file, image_folder = "mme", "llava_mme.jsonl", "MME_Benchmark_release_version"

  def ground_truth(self, data) -> dict:
    """MME's files: <category>/questions_answers_YN/*.txt (or <category>/*.txt), lines 'question<TAB>Yes|No'."""
    root, truth = _need(os.path.join(data, self.image_folder)), {}
    for category in sorted(os.listdir(root)):
      folder = os.path.join(root, category)
      if not os.path.isdir(folder):
        continue
      qa = os.path.join(folder, "questions_answers_YN") if os.path.exists(os.path.join(folder, "images")) else folder
      for file in os.listdir(qa):
        if file.endswith(".txt"):
          with open(os.path.join(qa, file)) as f:
            for line in f:
              if line.strip():
                question, answer = line.strip().split("\t")
                truth[(category, file, question)] = answer
    return truth

  def score(self, data, answers, out):
    """convert_answer_to_mme + calculation.py: each answer's label found by (category, image's .txt, question with
    MME's yes/no suffix); per subtask acc and acc+ (an image's two questions both right), score = acc + acc+; the
    perception and cognition totals add their subtasks' scores."""
    truth = self.ground_truth(data)
    per_task = defaultdict(lambda: defaultdict(list))  # category -> image -> [(label, answer)]
    for a in answers:
      category = str(a["question_id"]).split("/")[0]
      file = str(a["question_id"]).split("/")[-1].split(".")[0] + ".txt"
      question = scoring.mme_ground_truth_prompt(a["prompt"], lambda q: (category, file, q) in truth)
      label = truth[(category, file, question)]
      per_task[category][a["question_id"]].append((label, a["text"]))
    subtasks = {name: scoring.mme_subtask(per_task[name].values()) for name in sorted(per_task)}
    return {"perception": sum(subtasks[n]["score"] for n in scoring.MME_PERCEPTION if n in subtasks),
            "cognition": sum(subtasks[n]["score"] for n in scoring.MME_COGNITION if n in subtasks),
            "subtasks": subtasks}


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
    for row in read_mmbench(_need(os.path.join(data, self.question_file))):
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
    rows = read_mmbench(_need(os.path.join(data, self.question_file)))
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
    annotation = read_json(_need(os.path.join(data, self.ANNOTATION)))
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


class VQAv2(Task):
  name, question_file, image_folder = "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015"
  FULL_SPLIT = "llava_vqav2_mscoco_test2015.jsonl"

  def score(self, data, answers, out):
    """convert_vqav2_for_submission: one entry per question of the full test2015 split (the question file when that
    is absent), the EvalAI-normalised answer or '' where there is none; scored by the EvalAI server."""
    split_file = os.path.join(data, self.FULL_SPLIT)
    split = read_jsonl(split_file if os.path.exists(split_file) else _need(os.path.join(data, self.question_file)))
    results = {a["question_id"]: a["text"] for a in answers}
    upload = [{"question_id": x["question_id"],
               "answer": scoring.evalai_normalize(results[x["question_id"]]) if x["question_id"] in results else ""}
              for x in split]
    path = _write_json(os.path.join(out, "answers_upload", os.path.splitext(self.question_file)[0] + ".json"), upload)
    return {"submission": path, "answered": sum(x["question_id"] in results for x in split), "total": len(split)}


class Shapes(Task):
  """The demo's held-out questions (llava-jax demo), written as a task in the same layout: `llava_shapes_eval.jsonl`
  ({question_id, image, text, category}), images/, and `shapes_answers.json` ({question_id: expected answer})."""
  name, question_file, image_folder = "shapes", "llava_shapes_eval.jsonl", "images"
  max_new_tokens = 6
  ANSWERS = "shapes_answers.json"

  @staticmethod
  def first_word(text: str) -> str:
    words = text.lower().replace(".", " ").split()
    return words[0] if words else ""

  def score(self, data, answers, out):
    """An answer counts when its first word is the expected one; fractions overall and per category (the kind of
    question: colour, shape, background); unanswered questions count as wrong."""
    expected = read_json(_need(os.path.join(data, self.ANSWERS)))
    questions = read_jsonl(_need(os.path.join(data, self.question_file)))
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
  _write_json(os.path.join(data, Shapes.ANSWERS), expected)
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
