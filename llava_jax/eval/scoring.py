"""The reference's scoring rules, one function per rule, written from its definitions so a score here is the score
the reference's scripts (and the official tools they call) print for the same answers file:

  POPE      llava/eval/eval_pope.py: first sentence, "No"/"not"/"no" as a word -> no, else yes; acc/P/R/F1/yes-ratio
  TextVQA   llava/eval/eval_textvqa.py + m4c_evaluator.py: EvalAI answer normalisation, VQA soft accuracy
  VQAv2     scripts/convert_vqav2_for_submission.py: the same EvalAI normalisation, for the server
  ScienceQA llava/eval/eval_science_qa.py: "A" / "A. ..." / "The answer is A." parsing, accuracy and IMG-accuracy
  GQA       scripts/convert_gqa_for_eval.py (rstrip '.', lower) + GQA's eval.py (exact match, balanced questions)
  MME       MME's convert_answer_to_mme.py + eval_tool/calculation.py: yes/no in the first 4 characters, acc, acc+
  MMBench   MMBench's evaluator (as lmms-eval carries it): option-letter / option-text inference, circular groups
  SEED      scripts/convert_seed_for_submission.py: exact match with the answer letter, per question type

Where a reference script crashes (a division by zero, a missing prediction) these functions return 0 or count the
question wrong and say so in docs/EVALUATION.md; everything else follows the reference, quirks included.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Iterable, Sequence

# -- POPE --------------------------------------------------------------------------------------------------------


def pope_yes_no(text: str) -> str:
  """eval_pope.py's parsing: keep the text before the first '.', drop commas, split on single spaces; 'No', 'not' or
  'no' among the words -> 'no', anything else (including an empty answer) -> 'yes'."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _safe_div(a: float, b: float) -> float:
  return a / b if b else 0.0  # the reference divides by zero here; 0 is what a table can show


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
  """Binary metrics with 'yes' as the positive class, as eval_pope prints them (fractions, not percent).
  `predictions` are 'yes'/'no' from `pope_yes_no`, `labels` the annotation's 'yes'/'no' (anything not 'no' is yes)."""
  tp = fp = tn = fn = 0
  for pred, label in zip(predictions, labels):
    pred_yes, label_yes = pred != "no", label != "no"
    tp += pred_yes and label_yes
    fp += pred_yes and not label_yes
    tn += not pred_yes and not label_yes
    fn += not pred_yes and label_yes
  precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
  return {"accuracy": _safe_div(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall,
          "f1": _safe_div(2 * precision * recall, precision + recall),
          "yes_ratio": _safe_div(sum(p != "no" for p in predictions), len(predictions)),
          "TP": tp, "FP": fp, "TN": tn, "FN": fn}


# -- EvalAI answer normalisation (TextVQA, VQAv2) -----------------------------------------------------------------

# Word -> contracted form; the table of m4c_evaluator.EvalAIAnswerProcessor (itself EvalAI's VQA table).
_CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've "
    "shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've "
    "somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've "
    "someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd "
    "somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's "
    "thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd "
    "theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't "
    "wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's "
    "whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've "
    "who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't "
    "wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all "
    "yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've "
    "youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've").split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
# Both patterns exactly as the reference writes them; "(?!<=\d)" is a look-ahead (a typo for a look-behind), kept.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The reference passes re.UNICODE as `sub`'s third positional argument, which is `count`: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def evalai_normalize(answer: str) -> str:
  """m4c_evaluator.EvalAIAnswerProcessor: lower-case, drop ',' '?' and split "'s", punctuation -> '' or ' ', periods
  not inside numbers dropped, number words -> digits, articles dropped, contractions restored."""
  text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  out = text
  has_digit_comma = _COMMA_STRIP.search(text) is not None
  for p in _PUNCTUATION:
    if p + " " in text or " " + p in text or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def vqa_soft_scores(gt_answers: Sequence[str]) -> dict[str, float]:
  """TextVQAAccuracyEvaluator._compute_answer_scores: for each distinct (normalised) human answer, the mean over
  the humans of min(1, matches among the *other* humans / 3). The reference asserts 10 answers; any count works."""
  answers = [evalai_normalize(a) for a in gt_answers]
  scores = {}
  for candidate in set(answers):
    per_human = [min(1.0, sum(a == candidate for j, a in enumerate(answers) if j != i) / 3)
                 for i in range(len(answers))]
    scores[candidate] = sum(per_human) / len(per_human)
  return scores


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
  return vqa_soft_scores(gt_answers).get(evalai_normalize(prediction), 0.0)


def textvqa_question(prompt: str) -> str:
  """eval_textvqa.prompt_processor: the question inside the answers file's prompt, lower-cased (the key into the
  annotations, with the image id)."""
  lines = prompt.split("\n")
  if prompt.startswith("OCR tokens: "):
    match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    question = match.group(1)
  elif "Reference OCR token: " in prompt and len(lines) == 3:
    question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
  elif len(lines) == 2:
    question = lines[0]
  else:
    raise ValueError(f"cannot find the question in TextVQA prompt {prompt!r} (the reference asserts here)")
  return question.lower()


# -- ScienceQA ----------------------------------------------------------------------------------------------------

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # '.' is any character, as in the reference


def sqa_parse(text: str) -> str:
  """eval_science_qa.py: the whole answer is a letter; or 'X. ...'; or exactly one 'The answer is X.'; else FAILED."""
  if text in SQA_OPTIONS:
    return text
  if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
    return text[0]
  found = _SQA_ANSWER_IS.findall(text)
  return found[0] if len(found) == 1 else "FAILED"


def sqa_choice_index(letter: str, num_choices: int) -> int:
  """get_pred_idx: the letter's index when it names one of the problem's choices, else -1."""
  return SQA_OPTIONS.index(letter) if letter in SQA_OPTIONS[:num_choices] else -1


# -- GQA ----------------------------------------------------------------------------------------------------------


def gqa_prediction(text: str) -> str:
  """convert_gqa_for_eval.py: trailing periods stripped, lower-cased; GQA's eval.py then compares exactly."""
  return text.rstrip(".").lower()


# -- MME ----------------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_yes_no(text: str) -> str:
  """calculation.py's parse_pred_ans on the answer as its results file holds it (lower-cased, line end kept, so the
  exact-match branch never fires): 'yes' in the first 4 characters -> yes, else 'no' there -> no, else other."""
  prefix = (text.lower() + "\n")[:4]
  return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_subtask(pairs: Iterable[Sequence[tuple[str, str]]]) -> dict:
  """One subtask from its images' (label, answer) lists: acc over questions ('other' is wrong), acc+ over images
  (all of an image's questions right), score = 100 * (acc + acc+), as calculation.py sums them."""
  questions = right = images = images_right = 0
  for pair in pairs:
    correct = [mme_yes_no(answer) == label.lower() for label, answer in pair]
    questions, right = questions + len(correct), right + sum(correct)
    images, images_right = images + 1, images_right + all(correct)
  acc, acc_plus = 100 * _safe_div(right, questions), 100 * _safe_div(images_right, images)
  return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def mme_ground_truth_prompt(prompt: str, known) -> str:
  """convert_answer_to_mme.py: drop the short-answer suffix and put back MME's ' Please answer yes or no.' (with two
  spaces before it when the image's file does not hold the one-space form) to find the question's line.
  `known(question)` says whether the image's file holds that question."""
  suffix = "Answer the question using a single word or phrase."
  if suffix in prompt:
    prompt = prompt.replace(suffix, "").strip()
  if "Please answer yes or no." not in prompt:
    prompt = prompt + " Please answer yes or no."
    if not known(prompt):
      prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
  return prompt


# -- MMBench ------------------------------------------------------------------------------------------------------

_MMBENCH_AFFIXES = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                    (":", ","), (":", "."), (":", ")"), (":", ")."))


def mmbench_option_letter(answer: str, num_choice: int = 5):
  """MMBench's can_infer_option: a single bare option letter among the whitespace-separated words (unless 'A' could
  be the article: 'A' present and more than 3 words), else a single letter with one of the affixes ('B.', '(C)',
  ':D', ...). Returns the letter or False."""
  choices = string.ascii_uppercase[:num_choice]
  words = [w.strip() for w in answer.split()]

  def count(prefix="", suffix=""):
    return sum(prefix + c + suffix in words for c in choices)

  if count() == 1 and not ("A" in words and len(words) > 3):
    return next(c for c in choices if c in words)
  for prefix, suffix in _MMBENCH_AFFIXES:
    if count(prefix, suffix) == 1:
      return next(c for c in choices if prefix + c + suffix in words)
  return False


def mmbench_option_text(answer: str, options: dict[str, str]):
  """MMBench's can_infer_text: exactly one option's text (lower-cased) inside the answer -> its letter."""
  answer = answer.lower()
  found = [k for k, v in options.items() if str(v).lower() in answer]
  return found[0] if len(found) == 1 else False


def mmbench_infer(answer: str, options: dict[str, str]):
  """can_infer: the letter, else the text; False when neither decides (the official evaluator then asks ChatGPT,
  which is not available here: such an answer counts as wrong)."""
  return mmbench_option_letter(answer) or mmbench_option_text(answer, options)


def mmbench_circular(rows: Sequence[dict]) -> dict:
  """Circular evaluation: rows are {index, answer, prediction, options, category}; a question (index < 1e6) counts
  only if it and every circular copy (index % 1e6 equal) are answered with the right letter."""
  groups = defaultdict(list)
  for row in rows:
    groups[int(row["index"]) % 1_000_000].append(row)
  main = sorted(int(r["index"]) for r in rows if int(r["index"]) < 1_000_000)
  hits, per_category = {}, defaultdict(list)
  for index in main:
    hit = all(r.get("prediction") is not None and mmbench_infer(r["prediction"], r["options"]) == r["answer"]
              for r in groups[index])
    hits[index] = hit
    category = next(r.get("category") for r in groups[index] if int(r["index"]) == index)
    per_category[category or "uncategorized"].append(hit)
  return {"accuracy": 100 * _safe_div(sum(hits.values()), len(hits)),
          "categories": {k: 100 * sum(v) / len(v) for k, v in sorted(per_category.items())}}
