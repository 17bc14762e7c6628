"""CLI failures: bad generate / chat inputs, a prompt longer than the context and a tokenizer path that is
not a local folder are named errors with exit 2, never tracebacks or Hub requests."""

import time

import numpy as np
import pytest
import transformers
from PIL import Image

import hf_tiny
import train_util
from llava_jax import load_checkpoint
from llava_jax.cli import main as cli
from llava_jax.processor import Processor, PromptTooLongError
from llava_jax.train import cli as train_cli

CONTEXT = 64  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny converted checkpoint with a 64-position context, a real tokenizer and a CLIP preprocessor config."""
  root = tmp_path_factory.mktemp("cli")
  hf_tiny.converted_checkpoint(root, max_position_embeddings=CONTEXT)
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "ok.png")
  (root / "notes.png").write_text("not an image at all")
  whole = (root / "ok.png").read_bytes()
  (root / "cut.png").write_bytes(whole[:len(whole) // 2])
  return root


def _generate(ckpt, *extra):
  return cli(["generate", "--ckpt", str(ckpt / "ckpt"), "--prompt", "What is it?", "--temperature", "0"] +
             list(extra))


@pytest.mark.parametrize("value", ["-5", "0", "ten"])
def test_max_new_tokens_must_be_a_positive_integer(ckpt, capsys, value):
  with pytest.raises(SystemExit) as e:
    _generate(ckpt, "--image", str(ckpt / "ok.png"), "--max-new-tokens", value)
  assert e.value.code == 2
  assert "--max-new-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("name, message", [("notes.png", ": not a readable image"),
                                           ("cut.png", ": not a readable image"), ("missing.png", " does not exist")])
def test_a_bad_image_exits_2_naming_the_file(ckpt, capsys, command, name, message):
  args = [command, "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / name)]
  args += ["--prompt", "What is it?"] if command == "generate" else []
  assert cli(args) == 2
  err = capsys.readouterr().err
  assert f"--image {ckpt / name}{message}" in err and "Traceback" not in err


def test_a_prompt_longer_than_the_context_says_by_how_much(ckpt, capsys):
  model = load_checkpoint(str(ckpt / "ckpt"))
  proc = Processor.from_model(model)
  prompt = proc.prompt([" ".join(["elephant"] * 40)], image=False)
  length = len(proc.tokenizer(prompt)["input_ids"])  # the tokenizer's own count, BOS included (text only)
  assert length > CONTEXT
  with pytest.raises(PromptTooLongError) as e:
    proc(prompt)
  assert (e.value.length, e.value.limit) == (length, CONTEXT)
  assert f"{length} tokens" in str(e.value) and f"{length - CONTEXT} more than the model's context of {CONTEXT}" \
      in str(e.value)
  assert cli(["generate", "--ckpt", str(ckpt / "ckpt"), "--prompt", " ".join(["elephant"] * 40)]) == 2
  assert f"more than the model's context of {CONTEXT}" in capsys.readouterr().err


def test_a_reply_is_cut_at_the_end_of_the_context(ckpt, capsys):
  assert _generate(ckpt, "--template", "plain", "--max-new-tokens", "500") == 0
  assert "--max-new-tokens 500 lowered to" in capsys.readouterr().err


def test_a_tokenizer_path_that_is_not_a_local_folder_is_an_error_not_a_hub_request(tmp_path, capsys):
  (tmp_path / "train.json").write_text("[]")
  start = time.time()
  code = train_cli.main(["--config", train_util.TINY + ":stage1", "--workdir", str(tmp_path / "w"),
                         "--config.data.kind=llava", f"--config.data.json_path={tmp_path / 'train.json'}",
                         "--config.data.tokenizer=lmsys/vicuna-7b-v1.5", "--config.log.progress=False"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert "'lmsys/vicuna-7b-v1.5' is not a local folder" in err and "Traceback" not in err
  assert time.time() - start < 30  # no minute of Hub retries


def test_processor_loads_its_tokenizer_from_the_local_folder_only(ckpt, monkeypatch):
  seen = {}
  original = transformers.AutoTokenizer.from_pretrained

  def spy(path, *args, **kwargs):
    seen.update(kwargs)
    return original(path, *args, **kwargs)

  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
  Processor.from_model(load_checkpoint(str(ckpt / "ckpt")))
  assert seen.get("local_files_only") is True
