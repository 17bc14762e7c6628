"""`llava-jax eval` on bad inputs: flag values out of range are refused up front (CLI and Python API); a bad line of a
question, annotation or answers file is an error naming file and line; a kill's torn last answer is redone, not
fatal; image paths may not leave the task's image folder (skipped and counted like a missing image)."""

import importlib
import json
import logging
import os

import jax
import pytest

from eval_tiny_data import rewrite_line, write_task_data, write_tiny_checkpoint
from llava_jax import load_checkpoint
from llava_jax.cli import main as cli
from llava_jax.eval import evaluate, get_task, read_answers
from llava_jax.eval.inputs import EvalInputError, read_jsonl
from llava_jax.processor import Processor

runner = importlib.import_module("llava_jax.eval.runner")
REAL_GREEDY = runner._greedy  # pylint: disable=protected-access  (one call per batch)
QUIET = {"progress": False, "print_fn": lambda *_: None}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return write_tiny_checkpoint(str(tmp_path_factory.mktemp("limits_model")))


@pytest.fixture(scope="module")
def loaded(ckpt):
  model = load_checkpoint(ckpt)
  return model, Processor.from_model(model)


def _run(loaded, data, out, task="pope", **kwargs):
  model, proc = loaded
  settings = {"batch_size": 4, "max_new_tokens": 2, "devices": jax.devices()[:1], **QUIET, **kwargs}
  return evaluate(task, data, out, model=model, processor=proc, **settings)


# -- flag values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-new-tokens", "0"),
                                        ("--max-new-tokens", "-1"), ("--prompt-bucket", "0"), ("--limit", "-1"),
                                        ("--batch-size", "two")])
def test_cli_refuses_out_of_range_flags(flag, value, tmp_path, capsys):
  data = write_task_data("gqa", str(tmp_path))
  with pytest.raises(SystemExit) as exit_:
    cli(["eval", "--task", "gqa", "--data", data, "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
         flag, value])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert f"argument {flag}" in err and value in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("setting,value", [("batch_size", 0), ("batch_size", -1), ("max_new_tokens", 0),
                                           ("max_new_tokens", -1), ("prompt_bucket", 0), ("limit", -1),
                                           ("batch_size", 2.5), ("limit", True)])
def test_evaluate_refuses_out_of_range_settings(setting, value, tmp_path):
  data, out = write_task_data("gqa", str(tmp_path)), str(tmp_path / "out")
  with pytest.raises(ValueError, match=f"{setting} must be an integer >= "):
    evaluate("gqa", data, out, ckpt=str(tmp_path / "never_loaded"), **{setting: value}, **QUIET)
  assert not os.path.exists(out)  # refused before anything is loaded or written


def test_max_new_tokens_none_is_the_task_default_and_limit_zero_answers_nothing(tmp_path, monkeypatch):
  data, out = write_task_data("scienceqa", str(tmp_path)), str(tmp_path / "out")
  seen = []

  def fake_generate(model, processor, questions, out, **kwargs):
    seen.append((len(questions), kwargs["max_new_tokens"]))
    return {"questions": len(questions), "already_answered": 0, "answered_now": 0, "image_errors": [],
            "seconds": 0.0, "questions_per_second": 0.0}

  monkeypatch.setattr(runner, "generate_answers", fake_generate)
  evaluate("scienceqa", data, out, model=object(), processor=object(), **QUIET)
  evaluate("scienceqa", data, out, model=object(), processor=object(), limit=0, max_new_tokens=3, **QUIET)
  assert seen == [(3, 1024), (0, 3)]


def test_generate_answers_refuses_a_zero_batch(loaded, tmp_path):
  model, proc = loaded
  with pytest.raises(ValueError, match="batch_size"):
    runner.generate_answers(model, proc, [], str(tmp_path), batch_size=0, progress=False)


# -- question and answers files ----------------------------------------------------------------------------------


def test_a_malformed_question_line_names_file_and_line(tmp_path):
  data = write_task_data("pope", str(tmp_path))
  path = os.path.join(data, "llava_pope_test.jsonl")
  rewrite_line(path, 3, '{"question_id": 2, "image": "COCO_2.jpg", "text": "tab\there"}')
  with pytest.raises(EvalInputError, match=r"llava_pope_test\.jsonl:3: not valid JSON \(column \d+: Invalid control"):
    get_task("pope").questions(data)
  rewrite_line(path, 3, '{"question_id": 2, "image": "COCO_2.jpg", "category": "random"}')
  with pytest.raises(EvalInputError, match=r"llava_pope_test\.jsonl:3: missing field 'text'"):
    get_task("pope").questions(data)
  rewrite_line(path, 3, '{"question_id": 2, "image": "COCO_2.jpg", "text": null, "category": "random"}')
  with pytest.raises(EvalInputError, match=r":3: field 'text' is null .*expected a string"):
    get_task("pope").questions(data)
  rewrite_line(path, 3, '[2, "COCO_2.jpg"]')
  with pytest.raises(EvalInputError, match=r":3: expected a JSON object, got a list"):
    get_task("pope").questions(data)


def test_annotation_and_json_question_files_name_file_and_line(tmp_path):
  pope = write_task_data("pope", str(tmp_path))
  labels = os.path.join(pope, "coco", "coco_pope_adversarial.json")
  rewrite_line(labels, 2, '{"lable": "no"}')
  with pytest.raises(EvalInputError, match=r"coco_pope_adversarial\.json:2: missing field 'label'"):
    get_task("pope").score(pope, [], str(tmp_path / "out"))
  sqa = write_task_data("scienceqa", str(tmp_path))
  path = os.path.join(sqa, "llava_test_CQM-A.json")
  with open(path) as f:
    entries = json.load(f)
  with open(path, "w") as f:
    f.write(json.dumps(entries, indent=1)[:-3] + ",\n}")
  with pytest.raises(EvalInputError, match=r"llava_test_CQM-A\.json:\d+: not valid JSON"):
    get_task("scienceqa").questions(sqa)
  del entries[1]["id"]
  with open(path, "w") as f:
    json.dump(entries, f)
  with pytest.raises(EvalInputError, match=r"llava_test_CQM-A\.json: entry 1: missing field 'id'"):
    get_task("scienceqa").questions(sqa)


def test_an_answers_file_without_question_id_is_an_error_naming_file_and_line(tmp_path, capsys):
  data, out = write_task_data("gqa", str(tmp_path)), str(tmp_path / "out")
  answers = str(tmp_path / "theirs.jsonl")
  with open(answers, "w") as f:
    f.write(json.dumps({"question_id": "200", "prompt": "p", "text": "yes"}) + "\n")
    f.write(json.dumps({"questionId": "201", "prompt": "p", "text": "red"}) + "\n")
  with pytest.raises(EvalInputError, match=r"theirs\.jsonl:2: missing field 'question_id'"):
    evaluate("gqa", data, out, answers=answers, **QUIET)
  assert cli(["eval", "--task", "gqa", "--data", data, "--answers", answers, "--out", out]) == 2
  err = capsys.readouterr().err
  assert "theirs.jsonl:2: missing field 'question_id'" in err and "Traceback" not in err
  with open(answers, "a") as f:
    f.write('{"question_id": "202", "te')  # someone else's file: a cut line is not forgiven
  with pytest.raises(EvalInputError, match=r"theirs\.jsonl:2: "):
    evaluate("gqa", data, out, answers=answers, **QUIET)
  assert cli(["eval", "--task", "gqa", "--data", data, "--answers", str(tmp_path / "nope.jsonl"), "--out", out]) == 2
  assert "nope.jsonl not found" in capsys.readouterr().err


def test_textvqa_answers_need_their_prompt(tmp_path):
  data, out = write_task_data("textvqa", str(tmp_path)), str(tmp_path / "out")
  answers = str(tmp_path / "a.jsonl")
  with open(answers, "w") as f:
    f.write(json.dumps({"question_id": "img1", "text": "abc"}) + "\n")
  with pytest.raises(EvalInputError, match=r"a\.jsonl:1: missing field 'prompt'"):
    evaluate("textvqa", data, out, answers=answers, **QUIET)


# -- resuming over our own answers files -------------------------------------------------------------------------


def _calls(monkeypatch):
  calls = []
  monkeypatch.setattr(runner, "_greedy", lambda *a, **k: (calls.append(1), REAL_GREEDY(*a, **k))[1])
  return calls


def test_a_torn_last_line_is_logged_and_answered_again(loaded, tmp_path, monkeypatch, caplog):
  data, out = write_task_data("pope", str(tmp_path)), str(tmp_path / "out")
  _run(loaded, data, out, batch_size=1)
  merged = os.path.join(out, "answers.jsonl")
  with open(merged) as f:
    lines = f.read().splitlines()
  part = os.path.join(out, "answers.part00000-of-00001.jsonl")
  with open(merged, "w") as f:  # as if killed: two answers merged earlier, the third cut short in our part
    f.write("\n".join(lines[:2]) + "\n")
  with open(part, "w") as f:
    f.write(lines[2][:25])
  calls = _calls(monkeypatch)
  with caplog.at_level(logging.WARNING, logger="llava_jax.eval"):
    _run(loaded, data, out, batch_size=1)
  assert len(calls) == 1  # only the torn one
  assert "answers.part00000-of-00001.jsonl" in caplog.text and "cut short" in caplog.text
  records = read_jsonl(merged)  # strict: no torn line survives the merge
  assert [r["question_id"] for r in records] == [0, 1, 2]
  assert records[:2] == [json.loads(line) for line in lines[:2]]


def test_a_torn_tail_is_cut_before_appending_so_a_second_kill_still_resumes(loaded, tmp_path, monkeypatch):
  data, out = write_task_data("pope", str(tmp_path)), str(tmp_path / "out")
  part = os.path.join(out, "answers.part00000-of-00001.jsonl")
  calls = []

  def dies_on_second_call(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return REAL_GREEDY(*args, **kwargs)

  monkeypatch.setattr(runner, "_greedy", dies_on_second_call)
  with pytest.raises(KeyboardInterrupt):
    _run(loaded, data, out, batch_size=1)
  with open(part, "a") as f:
    f.write('{"question_id": 1, "prompt": "cut sho')
  calls.clear()
  with pytest.raises(KeyboardInterrupt):  # answers one more, dies again
    _run(loaded, data, out, batch_size=1)
  assert len(read_jsonl(part)) == 2  # the torn line was cut off, not buried mid-file
  calls = _calls(monkeypatch)
  _run(loaded, data, out, batch_size=1)
  assert len(calls) == 1
  assert [r["question_id"] for r in read_answers(os.path.join(out, "answers.jsonl"))] == [0, 1, 2]


def test_a_whole_last_record_without_newline_is_kept(loaded, tmp_path, monkeypatch):
  data, out = write_task_data("pope", str(tmp_path)), str(tmp_path / "out")
  _run(loaded, data, out, batch_size=1, limit=1)
  part = os.path.join(out, "answers.part00000-of-00001.jsonl")
  with open(os.path.join(out, "answers.jsonl")) as f:
    record = f.read().strip()
  os.remove(os.path.join(out, "answers.jsonl"))
  with open(part, "w") as f:
    f.write(record)  # killed just before its newline
  calls = _calls(monkeypatch)
  _run(loaded, data, out, batch_size=1)
  assert len(calls) == 2
  records = read_jsonl(os.path.join(out, "answers.jsonl"))
  assert [r["question_id"] for r in records] == [0, 1, 2] and records[0] == json.loads(record)


def test_a_bad_line_inside_our_answers_is_an_error_naming_it(loaded, tmp_path, capsys):
  data, out = write_task_data("gqa", str(tmp_path)), str(tmp_path / "out")
  _run(loaded, data, out, task="gqa")
  merged = os.path.join(out, "answers.jsonl")
  with open(merged) as f:
    first = json.loads(f.readline())
  del first["question_id"]
  rewrite_line(merged, 1, json.dumps(first))
  with pytest.raises(EvalInputError, match=r"answers\.jsonl:1: missing field 'question_id'.*delete that line"):
    _run(loaded, data, out, task="gqa")
  rewrite_line(merged, 1, "{not json")
  with pytest.raises(EvalInputError, match=r"answers\.jsonl:1: not valid JSON"):
    _run(loaded, data, out, task="gqa")


# -- image paths -------------------------------------------------------------------------------------------------


def _point_images_outside(data, tmp_path):
  """Questions 0-2 of the POPE data name an image outside val2014 (absolute, climbing, a symlink out)."""
  outside = tmp_path / "img"
  outside.mkdir()
  secret = outside / "cat.png"
  os.replace(os.path.join(data, "val2014", "COCO_2.jpg"), secret)
  os.symlink(secret, os.path.join(data, "val2014", "link.jpg"))
  path = os.path.join(data, "llava_pope_test.jsonl")
  rows = read_jsonl(path)
  rows[0]["image"], rows[1]["image"], rows[2]["image"] = str(secret), "../../img/cat.png", "link.jpg"
  rows.append({**rows[1], "question_id": 3, "image": "sub/../COCO_1.jpg"})  # stays inside: allowed
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(data, "coco", "coco_pope_adversarial.json"), "a") as f:
    f.write('{"label": "no"}\n')  # the label of question 3


def test_image_paths_may_not_leave_the_image_folder(tmp_path):
  data = write_task_data("pope", str(tmp_path))
  _point_images_outside(data, tmp_path)
  errors = [q.image_error for q in get_task("pope").questions(data)]
  assert "absolute path" in errors[0] and "climbs out" in errors[1] and "symlink" in errors[2]
  assert errors[3] is None


def test_an_image_folder_that_is_itself_a_link_is_allowed(tmp_path):
  data = write_task_data("pope", str(tmp_path))
  os.replace(os.path.join(data, "val2014"), tmp_path / "elsewhere")
  os.symlink(tmp_path / "elsewhere", os.path.join(data, "val2014"))  # as the demo links its images folder
  assert all(q.image_error is None for q in get_task("pope").questions(data))


def test_outside_images_are_skipped_and_counted_like_missing_ones(loaded, tmp_path):
  data, out = write_task_data("pope", str(tmp_path)), str(tmp_path / "out")
  _point_images_outside(data, tmp_path)
  printed = []
  _run(loaded, data, out, print_fn=printed.append)
  with open(os.path.join(out, "run.json")) as f:
    errors = json.load(f)["image_errors"]
  assert [e["question_id"] for e in errors] == [0, 1, 2]
  assert all(e["error"].startswith("ImagePathError: image ") for e in errors)
  assert [r["question_id"] for r in read_answers(os.path.join(out, "answers.jsonl"))] == [3]
  assert any("3 question(s) skipped" in line for line in printed)
