"""The free-form answer tasks in the reference's layout: POPE, TextVQA, GQA, MME and VQAv2 (model_vqa_loader's
prompts: the question file's text, which already ends with the task's instruction), each scored as the reference's
eval_* / convert_* scripts score it (scoring.py)."""

from __future__ import annotations

import os
from collections import defaultdict

from llava_jax.eval import scoring
from llava_jax.eval.task_base import QUESTION_ID, Task, need, read_json, read_jsonl, write_json


class Pope(Task):
  name, question_file, image_folder = "pope", "llava_pope_test.jsonl", "val2014"
  question_fields = {**Task.question_fields, "category": str}

  def score(self, data, answers, out):
    """Per category (the coco/coco_pope_<category>.json files): the category's answers against the labels, the n-th
    question of a category with the n-th label line, as eval_pope zips them."""
    questions = read_jsonl(need(os.path.join(data, self.question_file)), self.question_fields)
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
    annotation_dir = need(os.path.join(data, "coco"))
    for file in sorted(os.listdir(annotation_dir)):
      if not (file.startswith("coco_pope_") and file.endswith(".json")):
        continue
      category = file[len("coco_pope_"):-len(".json")]
      labels = [line["label"] for line in read_jsonl(os.path.join(annotation_dir, file), {"label": str})]
      mine = by_category.get(category, [])
      preds = [scoring.pope_yes_no(a["text"]) for a in mine]
      metrics[category] = scoring.pope_metrics(preds, [labels[position[str(a["question_id"])]] for a in mine])
      metrics[category].update(answered=len(mine), questions=counters.get(category, 0))
    return metrics


class TextVQA(Task):
  name, question_file, image_folder = "textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images"
  answer_fields = {**Task.answer_fields, "prompt": str}  # the question is read back from the prompt

  def score(self, data, answers, out):
    """eval_textvqa: each answer's annotation found by (question_id = image id, question from the prompt); VQA soft
    accuracy in percent over the answers present."""
    annotations = read_json(need(os.path.join(data, "TextVQA_0.5.1_val.json")))["data"]
    table = {(a["image_id"], a["question"].lower()): a for a in annotations}
    scores = [scoring.vqa_accuracy(a["text"], table[(a["question_id"], scoring.textvqa_question(a["prompt"]))]
                                   ["answers"]) for a in answers]
    return {"accuracy": 100 * sum(scores) / max(len(scores), 1), "answered": len(scores)}

class GQA(Task):
  name, question_file, image_folder = "gqa", "llava_gqa_testdev_balanced.jsonl", "data/images"
  QUESTIONS = ("data/testdev_balanced_questions.json", "data/questions1.2/testdev_balanced_questions.json",
               "testdev_balanced_questions.json")

  def score(self, data, answers, out):
    """convert_gqa_for_eval writes the predictions GQA's eval.py reads (OUT/testdev_balanced_predictions.json);
    accuracy is its exact match over the balanced questions, in percent. GQA's script refuses a missing prediction;
    here it counts as wrong and is reported."""
    predictions = [{"questionId": a["question_id"], "prediction": scoring.gqa_prediction(a["text"])} for a in answers]
    write_json(os.path.join(out, "testdev_balanced_predictions.json"), predictions)
    path = next((os.path.join(data, p) for p in self.QUESTIONS if os.path.exists(os.path.join(data, p))), None)
    questions = read_json(need(path or os.path.join(data, self.QUESTIONS[0])))
    by_id = {str(p["questionId"]): p["prediction"] for p in predictions}
    balanced = [(qid, q) for qid, q in questions.items() if q.get("isBalanced", True)]
    right = sum(by_id.get(str(qid)) == q["answer"] for qid, q in balanced)
    return {"accuracy": 100 * right / max(len(balanced), 1),
            "missing": sum(str(qid) not in by_id for qid, _ in balanced)}


class MME(Task):
  name, question_file, image_folder = "mme", "llava_mme.jsonl", "MME_Benchmark_release_version"
  answer_fields = {**Task.answer_fields, "prompt": str}  # the question is read back from the prompt

  def ground_truth(self, data) -> dict:
    """MME's files: <category>/questions_answers_YN/*.txt (or <category>/*.txt), lines 'question<TAB>Yes|No'."""
    root, truth = need(os.path.join(data, self.image_folder)), {}
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


class VQAv2(Task):
  name, question_file, image_folder = "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015"
  FULL_SPLIT = "llava_vqav2_mscoco_test2015.jsonl"

  def score(self, data, answers, out):
    """convert_vqav2_for_submission: one entry per question of the full test2015 split (the question file when that
    is absent), the EvalAI-normalised answer or '' where there is none; scored by the EvalAI server."""
    split_file = os.path.join(data, self.FULL_SPLIT)
    split = read_jsonl(split_file if os.path.exists(split_file) else need(os.path.join(data, self.question_file)),
                       {"question_id": QUESTION_ID})
    results = {a["question_id"]: a["text"] for a in answers}
    upload = [{"question_id": x["question_id"],
               "answer": scoring.evalai_normalize(results[x["question_id"]]) if x["question_id"] in results else ""}
              for x in split]
    path = write_json(os.path.join(out, "answers_upload", os.path.splitext(self.question_file)[0] + ".json"), upload)
    return {"submission": path, "answered": sum(x["question_id"] in results for x in split), "total": len(split)}
