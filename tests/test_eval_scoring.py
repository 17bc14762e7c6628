"""Scoring of every evaluation task on a tiny data directory in the reference's layout and crafted answers; every
expected number is worked out by hand in the comments from the reference's definitions."""

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from llava_jax.eval import get_task, scoring
from llava_jax.eval.runner import evaluate


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def write_json(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(content, f)


def answer(question_id, text, prompt="", **extra):
  return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
          "metadata": {}, **extra}


# -- parsing rules ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No", "no"),
    ("There is not a cat. Yes.", "no"),   # first sentence only
    ("Yes. There is no cat.", "yes"),     # the 'no' is in the second sentence
    ("Not really.", "yes"),               # 'Not' (capital) is not one of the words
    ("no, it isn't", "no"),               # the comma goes before splitting
    ("Nope", "yes"),
    ("", "yes"),
])
def test_pope_parsing(text, expected):
  assert scoring.pope_yes_no(text) == expected


@pytest.mark.parametrize("raw,expected", [
    ("Hello, World!", "hello world"),   # ',' removed with the word split, '!' alone becomes a space
    ("Coca-Cola.", "coca cola"),        # '-' -> space, final period dropped
    ("3.5", "3.5"),                     # a period before a digit stays
    ("1,000", "1000"),
    ("The dog", "dog"),                 # articles go
    ("Two", "2"),                       # number words up to ten become digits
    ("ten.", "10"),
    ("dont", "don't"),                  # contractions come back
    ("an apple's core", "apple 's core"),
    ("a - b", "b"),                     # ' -' present: '-' removed without a space; 'a' is an article
])
def test_evalai_normalisation(raw, expected):
  assert scoring.evalai_normalize(raw) == expected


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("A. because", "A"), ("The answer is D.", "D"), ("The answer is B. The answer is B.", "FAILED"),
    ("b", "FAILED"), ("E", "E"), ("I think C", "FAILED"), ("", "FAILED"),
])
def test_scienceqa_parsing(text, expected):
  assert scoring.sqa_parse(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("no", "no"), ("No, there is not.", "no"), ("Not sure", "no"), ("nope", "no"),
    ("There is a bus", "other"), ("n", "other"), ("It is yes", "other"),  # only the first four characters count
])
def test_mme_parsing(text, expected):
  assert scoring.mme_yes_no(text) == expected


@pytest.mark.parametrize("text,options,expected", [
    ("A", {"A": "x", "B": "y"}, "A"),
    ("The answer is C.", {"A": "x", "B": "y", "C": "z"}, "C"),  # 'C.' matches the ('', '.') affix
    ("(B)", {"A": "x", "B": "y"}, "B"),
    ("A dog is shown.", {"A": "cat", "B": "dog"}, "B"),  # 'A' may be the article: falls to the option text
    ("A or B", {"A": "cat", "B": "dog"}, False),          # two letters, no option text
    ("red", {"A": "green", "B": "red", "C": "blue"}, "B"),
    ("red or green", {"A": "green", "B": "red"}, False),
])
def test_mmbench_inference(text, options, expected):
  assert scoring.mmbench_infer(text, options) == expected


# -- whole tasks --------------------------------------------------------------------------------------------------


def test_pope(tmp_path):
  data = str(tmp_path / "pope")
  adversarial_labels = ["yes", "yes", "no", "no", "yes"]
  random_labels = ["no", "no", "yes"]
  questions = [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "category": "adversarial"}
               for i in range(5)] + [{"question_id": 10 + i, "image": "r.jpg", "text": "Is there a cat?",
                                      "category": "random"} for i in range(3)]
  write_jsonl(os.path.join(data, "llava_pope_test.jsonl"), questions)
  write_jsonl(os.path.join(data, "coco", "coco_pope_adversarial.json"),
              [{"question_id": i + 1, "label": label} for i, label in enumerate(adversarial_labels)])
  write_jsonl(os.path.join(data, "coco", "coco_pope_random.json"),
              [{"question_id": i + 1, "label": label} for i, label in enumerate(random_labels)])
  answers = [answer(0, "Yes, there is a dog in the image."),  # yes, label yes: TP
             answer(1, "No"),                                 # no, label yes: FN
             answer(2, "There is not a dog. Yes."),           # no, label no: TN
             answer(3, "Not really."),                        # yes ('Not' is not a listed word), label no: FP
             answer(4, "Yes."),                               # yes, label yes: TP
             answer(10, "no, there isn't"),                   # no, label no: TN
             answer(11, "The image shows no. Cat")]           # no, label no: TN; question 12 is unanswered
  metrics = get_task("pope").score(data, answers, str(tmp_path / "out"))
  adv = metrics["adversarial"]
  # TP 2, FP 1, TN 1, FN 1: precision 2/3, recall 2/3, F1 2/3, accuracy 3/5, yes ratio 3/5
  assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (2, 1, 1, 1)
  assert adv["precision"] == pytest.approx(2 / 3) and adv["recall"] == pytest.approx(2 / 3)
  assert adv["f1"] == pytest.approx(2 / 3) and adv["accuracy"] == pytest.approx(0.6)
  assert adv["yes_ratio"] == pytest.approx(0.6)
  rnd = metrics["random"]
  # two answers, both TN: accuracy 1, no positive prediction (precision 0 where the reference divides by zero)
  assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"], rnd["yes_ratio"]) == (1.0, 0.0, 0.0, 0.0, 0.0)
  assert (rnd["answered"], rnd["questions"]) == (2, 3)


def test_textvqa(tmp_path):
  data = str(tmp_path / "textvqa")
  suffix = "\nAnswer the question using a single word or phrase."
  write_json(os.path.join(data, "TextVQA_0.5.1_val.json"), {"data": [
      {"image_id": "i1", "question": "What brand is this?", "answers": ["coca cola"] * 3 + ["coke"] * 7},
      {"image_id": "i1", "question": "How many cans?", "answers": ["2", "two"] + ["3"] * 8},
      {"image_id": "i2", "question": "What animal?", "answers": ["a dog"] * 10},
      {"image_id": "i3", "question": "What is it?", "answers": ["dog"] * 10}]})
  answers = [
      # 'Coca-Cola.' -> 'coca cola'; 3 of 10 humans said it: the 3 see 2 others (2/3 each), the 7 see 3 (1 each):
      # (3 * 2/3 + 7) / 10 = 0.9
      answer("i1", "Coca-Cola.", "What brand is this?\nReference OCR token: Coca, Cola" + suffix),
      # 'Two' -> '2' as are '2' and 'two': the 2 see 1 other (1/3), the 8 see 2 (2/3): (2/3 + 16/3) / 10 = 0.6
      answer("i1", "Two", "How many cans?" + suffix),
      answer("i2", "the dog", "What animal?" + suffix),  # 'dog' = every human's normalised answer: 1.0
      answer("i3", "cat", "What is it?" + suffix)]      # 0
  metrics = get_task("textvqa").score(data, answers, str(tmp_path / "out"))
  assert metrics["accuracy"] == pytest.approx(100 * (0.9 + 0.6 + 1.0 + 0.0) / 4)


def test_scienceqa(tmp_path):
  data = str(tmp_path / "scienceqa")
  problems = {"p1": {"choices": ["a", "b", "c"], "answer": 1}, "p2": {"choices": ["x", "y"], "answer": 0},
              "p3": {"choices": ["a", "b", "c", "d"], "answer": 3}, "p4": {"choices": ["a", "b"], "answer": 1},
              "p5": {"choices": ["a", "b", "c"], "answer": 0}, "p6": {"choices": ["a", "b"], "answer": 0},
              "p7": {"choices": ["a", "b", "c"], "answer": 2}, "p8": {"choices": ["a", "b"], "answer": 0}}
  write_json(os.path.join(data, "problems.json"), problems)
  write_json(os.path.join(data, "pid_splits.json"), {"test": [f"p{i}" for i in range(1, 8)], "val": ["p8"]})
  img, txt = "<image>\nQuestion", "Question"
  answers = [answer("p1", "B", img),                 # right, image
             answer("p2", "A. x is right", txt),     # right
             answer("p3", "The answer is D.", img),  # right, image
             answer("p4", "The answer is B. The answer is B.", img),  # two matches: FAILED, image
             answer("p5", "E", img),                 # E is not one of 3 choices: wrong, image
             answer("p7", "C", txt),                 # right; p6 has no answer: wrong, and not an image question
             answer("p8", "A", txt)]                 # val split: not counted
  metrics = get_task("scienceqa").score(data, answers, str(tmp_path / "out"))
  assert metrics["accuracy"] == pytest.approx(100 * 4 / 7)    # p1 p2 p3 p7 of p1..p7
  assert metrics["img_accuracy"] == pytest.approx(100 * 2 / 4)  # p1 p3 of p1 p3 p4 p5
  assert metrics["missing"] == 1


def test_scienceqa_prompt_is_the_single_prediction_prompt(tmp_path):
  data = str(tmp_path / "scienceqa")
  write_json(os.path.join(data, "llava_test_CQM-A.json"), [
      {"id": "p1", "image": "p1/image.png", "conversations": [{"from": "human", "value": "<image>\nWhich? A. x B. y"}]},
      {"id": "p2", "conversations": [{"from": "human", "value": "Context: none\nWhich?"}]}])
  q1, q2 = get_task("scienceqa").questions(data)
  instruction = "Answer with the option's letter from the given choices directly."
  assert q1.text == "Which? A. x B. y\n" + instruction and q1.prompt == "<image>\n" + q1.text
  assert q1.image == os.path.join(data, "images/test", "p1/image.png")
  assert q2.text == q2.prompt == "Context: none\nWhich?\n" + instruction and q2.image is None


def test_gqa(tmp_path):
  data = str(tmp_path / "gqa")
  write_json(os.path.join(data, "data", "testdev_balanced_questions.json"), {
      "q1": {"answer": "yes", "isBalanced": True}, "q2": {"answer": "red", "isBalanced": True},
      "q3": {"answer": "left", "isBalanced": True}, "q4": {"answer": "man", "isBalanced": False},
      "q5": {"answer": "no", "isBalanced": True}})
  answers = [answer("q1", "Yes."),         # 'yes': right
             answer("q2", "Red.."),        # all trailing periods go: 'red', right
             answer("q3", "On the left."),  # 'on the left' != 'left'
             answer("q4", "Man")]          # right but not a balanced question; q5 unanswered: wrong
  out = str(tmp_path / "out")
  metrics = get_task("gqa").score(data, answers, out)
  assert metrics["accuracy"] == pytest.approx(100 * 2 / 4) and metrics["missing"] == 1
  with open(os.path.join(out, "testdev_balanced_predictions.json")) as f:
    assert json.load(f)[:3] == [{"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "red"},
                                {"questionId": "q3", "prediction": "on the left"}]


def test_mme(tmp_path):
  data = str(tmp_path / "MME")
  root = os.path.join(data, "MME_Benchmark_release_version")
  yn = " Please answer yes or no."
  files = {"existence/000.txt": [f"Is there a dog in this image?{yn}\tYes", f"Is there a cat in this image?{yn}\tNo"],
           "existence/001.txt": [f"Is there a car in this image?{yn}\tYes", f"Is there a bus in this image? {yn}\tNo"],
           "artwork/questions_answers_YN/a.txt": [f"Is this by Monet?{yn}\tYes", f"Is this by Goya?{yn}\tNo"],
           "code_reasoning/c.txt": [f"Is the output 5?{yn}\tYes", f"Is the output 6?{yn}\tNo"]}
  for name, lines in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    with open(os.path.join(root, name), "w") as f:
      f.write("\n".join(lines) + "\n")
  os.makedirs(os.path.join(root, "artwork", "images"))
  suffix = "\nAnswer the question using a single word or phrase."
  answers = [answer("existence/000.jpg", "Yes", "Is there a dog in this image?" + suffix),      # right
             answer("existence/000.jpg", "No, there is not.", "Is there a cat in this image?" + suffix),  # right
             answer("existence/001.jpg", "yes", "Is there a car in this image?" + suffix),      # right
             answer("existence/001.jpg", "There is a bus", "Is there a bus in this image?" + suffix),  # other
             answer("artwork/a.jpg", "Not sure", "Is this by Monet?" + suffix),  # 'not ' holds 'no': wrong
             answer("artwork/a.jpg", "no", "Is this by Goya?" + suffix),         # right
             answer("code_reasoning/c.png", "Yes, the output is 5", "Is the output 5?" + suffix),  # right
             answer("code_reasoning/c.png", "nope", "Is the output 6?" + suffix)]                  # right
  metrics = get_task("mme").score(data, answers, str(tmp_path / "out"))
  sub = metrics["subtasks"]
  # existence: 3 of 4 questions, 1 of 2 images with both right: 75 + 50
  assert (sub["existence"]["acc"], sub["existence"]["acc_plus"], sub["existence"]["score"]) == (75, 50, 125)
  assert (sub["artwork"]["acc"], sub["artwork"]["acc_plus"]) == (50, 0)
  assert sub["code_reasoning"]["score"] == 200
  assert metrics["perception"] == 175 and metrics["cognition"] == 200


def _png_base64(colour):
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def write_mmbench(path, rows):
  columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
             "comment", "split", "image"]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(columns)
    for row in rows:
      writer.writerow([row.get(c, "") for c in columns])


MMBENCH_ROWS = [
    dict(index=0, question="What colour?", hint="nan", A="red", B="blue", C="green", answer="A", category="color"),
    dict(index=1000000, question="What colour?", hint="nan", A="blue", B="green", C="red", answer="C",
         category="color"),
    dict(index=2000000, question="What colour?", hint="nan", A="green", B="red", C="blue", answer="B",
         category="color"),
    dict(index=1, question="How many?", hint="Look carefully", A="one", B="two", C="three", D="four", answer="D",
         category="count"),
    dict(index=1000001, question="How many?", hint="Look carefully", A="two", B="three", C="four", D="one",
         answer="C", category="count"),
    dict(index=2, question="Which animal?", hint="", A="cat", B="dog", answer="B", category="count"),
]


def test_mmbench(tmp_path):
  data = str(tmp_path / "mmbench")
  rows = [dict(r, image=_png_base64((i * 40, 0, 0)), split="dev") for i, r in enumerate(MMBENCH_ROWS)]
  write_mmbench(os.path.join(data, "mmbench_dev_20230712.tsv"), rows)
  questions = get_task("mmbench").questions(data)
  instruction = "\nAnswer with the option's letter from the given choices directly."
  assert questions[0].prompt == "What colour?\nA. red\nB. blue\nC. green"  # 'nan' hint skipped, D empty: 3 options
  assert questions[0].text == questions[0].prompt + instruction
  assert questions[3].prompt == "Look carefully\nHow many?\nA. one\nB. two\nC. three\nD. four"
  assert questions[0].extra == {"round_id": 0, "options": ["red", "blue", "green"], "option_char": ["A", "B", "C"]}
  assert questions[2].image().getpixel((0, 0)) == (80, 0, 0)
  answers = [answer(0, "A"),                  # right
             answer(1000000, "The answer is C."),  # 'C.': right
             answer(2000000, "red"),          # option text of B: right -> question 0 right in every rotation
             answer(1, "D"),                  # right
             answer(1000001, "A three"),      # 'A' alone with 2 words: A, wrong -> question 1 wrong
             answer(2, "A dog is shown.")]    # 'A' may be the article; text 'dog' -> B: right
  out = str(tmp_path / "out")
  metrics = get_task("mmbench").score(data, answers, out)
  assert metrics["accuracy"] == pytest.approx(100 * 2 / 3)
  assert metrics["categories"] == {"color": 100.0, "count": 50.0}
  with open(metrics["submission"], newline="") as f:
    table = list(csv.DictReader(f, delimiter="\t"))
  assert [r["prediction"] for r in table] == [a["text"] for a in answers]
  assert "image" not in table[0] and "hint" not in table[0]


def test_seed(tmp_path):
  data = str(tmp_path / "seed_bench")
  write_json(os.path.join(data, "SEED-Bench.json"), {
      "question_type": {"Scene Understanding": 1, "Instance Identity": 2},
      "questions": [{"question_id": "101", "question_type_id": 1, "answer": "A", "data_type": "image"},
                    {"question_id": "102", "question_type_id": 1, "answer": "B", "data_type": "image"},
                    {"question_id": "103", "question_type_id": 2, "answer": "C", "data_type": "image"},
                    {"question_id": "104", "question_type_id": 2, "answer": "D", "data_type": "video"}]})
  write_jsonl(os.path.join(data, "llava-seed-bench.jsonl"), [
      {"question_id": q, "image": f"SEED-Bench-{kind}/{q}.jpg", "text": "Which?"}
      for q, kind in (("101", "image"), ("102", "image"), ("103", "image"), ("104", "video-image"))])
  assert [q.question_id for q in get_task("seed").questions(data)] == ["101", "102", "103"]  # the image split
  answers = [answer("101", "A"),   # right
             answer("102", "B."),  # not exactly 'B': wrong; 103 unanswered: wrong
             answer("104", "D")]   # a video question: not in the image split
  metrics = get_task("seed").score(data, answers, str(tmp_path / "out"))
  assert metrics["per_type"] == {"Scene Understanding": 50.0, "Instance Identity": 0.0}
  assert metrics["accuracy"] == pytest.approx(100 / 3)


def test_vqav2_submission(tmp_path):
  data = str(tmp_path / "vqav2")
  write_jsonl(os.path.join(data, "llava_vqav2_mscoco_test2015.jsonl"),
              [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (1, 2, 3)])
  write_jsonl(os.path.join(data, "llava_vqav2_mscoco_test-dev2015.jsonl"),
              [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (1, 2)])
  metrics = get_task("vqav2").score(data, [answer(1, "Two dogs."), answer(2, "Yes")], str(tmp_path / "out"))
  with open(metrics["submission"]) as f:
    assert json.load(f) == [{"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": "yes"},
                            {"question_id": 3, "answer": ""}]  # every test2015 question, '' where unanswered


def test_score_only_command_writes_metrics_and_the_answers_file(tmp_path, capsys):
  from llava_jax.cli import main as cli

  data = str(tmp_path / "gqa")
  write_json(os.path.join(data, "data", "testdev_balanced_questions.json"),
             {"q1": {"answer": "yes", "isBalanced": True}, "q2": {"answer": "no", "isBalanced": True}})
  answers_file = str(tmp_path / "theirs.jsonl")
  write_jsonl(answers_file, [answer("q1", "Yes"), answer("q2", "Yes")])
  out = str(tmp_path / "out")
  assert cli(["eval", "--task", "gqa", "--data", data, "--answers", answers_file, "--out", out]) == 0
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["accuracy"] == 50.0
  assert len(open(os.path.join(out, "answers.jsonl")).readlines()) == 2
  assert "accuracy" in capsys.readouterr().out
  assert evaluate("gqa", data, out, answers=os.path.join(out, "answers.jsonl"), print_fn=lambda *_: None) == \
      {"accuracy": 50.0, "missing": 0}


def test_shapes_demo_task(tmp_path):
  from llava_jax.eval.tasks import write_shapes_task

  samples = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                     {"from": "gpt", "value": a}]}
             for i, (q, a) in enumerate([("What colour is the shape?", "Red."), ("What shape is this?", "Circle."),
                                         ("What colour is the background?", "White."),
                                         ("Which shape is shown?", "Star.")])]
  data = write_shapes_task(str(tmp_path / "shapes"), samples, str(tmp_path / "images"))
  questions = get_task("shapes").questions(data)
  assert [q.text for q in questions][:2] == ["What colour is the shape?", "What shape is this?"]
  answers = [answer(0, "red"), answer(1, "Circle, clearly."), answer(2, "Black.")]  # question 3 unanswered
  metrics = get_task("shapes").score(data, answers, str(tmp_path / "out"))
  # first words: "red" right; "circle," is not "circle"; "black" is not "white"; the star question is unanswered
  assert metrics == {"accuracy": 0.25, "categories": {"background": 0.0, "colour": 1.0, "shape": 0.0}}
