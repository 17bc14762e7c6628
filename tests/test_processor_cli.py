"""The processor (text + image -> inputs) and the generate / chat commands on a tiny converted checkpoint."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import hf_tiny
from llava_jax import load_checkpoint
from llava_jax.cli import main as cli
from llava_jax.data.text import encode_prompt
from llava_jax import generate
from llava_jax.processor import Processor


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny llava-hf directory with a real SentencePiece tokenizer and a CLIP preprocessor config, converted."""
  root = tmp_path_factory.mktemp("proc")
  hf_tiny.converted_checkpoint(root)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
  image.save(root / "cat.png")
  return root


def test_processor_left_pads_and_expands_image_tags(ckpt):
  model = load_checkpoint(str(ckpt / "ckpt"))
  assert Processor.from_model(model).tokenization == "hf"  # a llava-hf checkpoint (test_processor_files: its ids)
  proc = Processor.from_model(model, tokenization="reference")
  prompts = [proc.prompt(["What is this?"], image=True), proc.prompt(["Hi", "Hello!", "Describe it, please."],
                                                                      image=True)]
  inputs = proc(prompts, [str(ckpt / "cat.png"), Image.open(ckpt / "cat.png")])
  ids, mask = inputs["input_ids"], inputs["attention_mask"]
  for row, prompt in zip(range(2), prompts):
    expected = encode_prompt(prompt, proc.tokenizer, 16, model.config.image_token_index)
    np.testing.assert_array_equal(ids[row, ids.shape[1] - len(expected):], expected)
    assert mask[row].sum() == len(expected) and mask[row, -1] == 1
  assert (ids == model.config.image_token_index).sum() == 2 * 16
  assert inputs["pixel_values"].shape == (2, 28, 28, 3)
  with pytest.raises(ValueError, match="1 <image> tags but 0 images"):
    proc(prompts[0])


def test_generate_command_streams_the_greedy_reply(ckpt, capsys):
  assert cli(["generate", "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / "cat.png"), "--prompt",
              "What is in the image?", "--temperature", "0", "--max-new-tokens", "12"]) == 0
  printed = capsys.readouterr().out
  model = load_checkpoint(str(ckpt / "ckpt"))
  proc = Processor.from_model(model)
  inputs = proc(proc.prompt(["What is in the image?"], image=True), [str(ckpt / "cat.png")])
  tokens = generate(model, inputs["input_ids"], jnp.asarray(inputs["pixel_values"]), inputs["attention_mask"],
                    max_new_tokens=12, eos_token_id=proc.tokenizer.eos_token_id)[0]
  eos = np.flatnonzero(tokens == proc.tokenizer.eos_token_id)
  tokens = tokens[:eos[0]] if len(eos) else tokens
  expected = proc.decode(tokens)
  # A random model emits stray byte tokens whose decoding can rewrite text a whole-reply decoder already showed
  # ("Orange un" -> "Orange u\ufffd\ufffd..."); the streamed text must still end as the full decode.
  assert printed == expected + "\n"

  from llava_jax.cli import _reply  # the reply the chat keeps in its history is the full decode

  class Args:
    max_new_tokens, temperature, top_p, seed = 12, 0.0, 1.0, 0

  reply = _reply(model, proc, ["What is in the image?"], str(ckpt / "cat.png"), Args, out=io.StringIO())
  assert reply == expected.strip()


def test_chat_command_keeps_the_conversation(ckpt, monkeypatch, capsys):
  monkeypatch.setattr("sys.stdin", io.StringIO("What shape?\nAnd the colour?\n\n"))
  assert cli(["chat", "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / "cat.png"), "--max-new-tokens", "6",
              "--temperature", "0.7", "--seed", "1"]) == 0
  out = capsys.readouterr().out
  assert out.count("ASSISTANT: ") == 2 and "template vicuna_v1" in out


def test_missing_image_is_a_clear_error(ckpt, capsys):
  assert cli(["generate", "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / "nope.png"), "--prompt", "x"]) == 2
  assert "nope.png does not exist" in capsys.readouterr().err
