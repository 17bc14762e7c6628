"""`llava-jax chat` / `generate` on a converted tiny LLaVA-NeXT checkpoint (Mistral backbone, mistral_instruct).

The checkpoint carries a SentencePiece tokenizer with "<image>" and a llava-next preprocessor_config.json, so the
CLI's processor tiles each image (anyres) and passes its `image_sizes` on; the streamed reply must be the greedy
tokens `llava_jax.generate` gives for the same prompt and image.
"""

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from PIL import Image

import hf_tiny
from llava_jax.cli import main as cli
from llava_jax.data.synthetic import build_tokenizer
from llava_jax import generate, generation, load_checkpoint
from llava_jax.decoding import stop_at
from llava_jax.processor import Processor

MAX_NEW = 8
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("next_cli")
  build_tokenizer(str(root / "hf"), legacy=True, special_tokens=["<image>"])
  tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
  hf = hf_tiny.llava_next_model(text=hf_tiny.mistral_text_config(vocab_size=len(tok)),
                                image_token_index=tok.convert_tokens_to_ids("<image>"))
  hf.save_pretrained(root / "hf")
  (root / "hf" / "preprocessor_config.json").write_text(json.dumps(hf_tiny.NEXT_PROCESSOR_56))
  assert cli(["convert", "--hf", str(root / "hf"), "--out", str(root / "ckpt"), "--quiet"]) == 0
  rng = np.random.default_rng(0)
  for name, hw in (("tall", (200, 40)), ("wide", (40, 200))):
    Image.fromarray(rng.integers(0, 256, hw + (3,), np.uint8)).save(root / f"{name}.png")
  return root


@pytest.mark.parametrize("image", ["tall", "wide"])
def test_chat_streams_the_greedy_reply(ckpt, image, monkeypatch, capsys):
  streamed, original_stream = [], generation.stream

  def recording_stream(*args, **kwargs):  # the chat's own stream, its tokens noted on the way
    for token in original_stream(*args, **kwargs):
      streamed.append(int(token[0]))
      yield token

  monkeypatch.setattr(generation, "stream", recording_stream)
  monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n\n"))
  path = str(ckpt / f"{image}.png")
  assert cli(["chat", "--ckpt", str(ckpt / "ckpt"), "--image", path, "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW), "--template", "mistral_instruct"]) == 0
  out = capsys.readouterr().out
  assert "template mistral_instruct" in out and out.count("ASSISTANT: ") == 1

  model = load_checkpoint(str(ckpt / "ckpt"))
  proc = Processor.from_model(model, template="mistral_instruct")
  inputs = proc(proc.prompt([QUESTION], image=True), [path])
  hw = Image.open(path).size[::-1]
  np.testing.assert_array_equal(inputs["image_sizes"], [hw])
  assert (inputs["input_ids"] == model.config.image_token_index).sum() == proc.anyres.num_image_tokens(hw)
  tokens = generate(model, inputs["input_ids"], jnp.asarray(inputs["pixel_values"]), inputs["attention_mask"],
                    max_new_tokens=MAX_NEW, eos_token_id=proc.tokenizer.eos_token_id,
                    image_sizes=inputs["image_sizes"])[0]
  assert streamed and streamed == tokens[:len(streamed)].tolist()
  eos, stops = proc.tokenizer.eos_token_id, [s for s in (proc.template.stop_str,) if s]
  reply = [t for t in streamed if t != eos]
  text, stopped = stop_at(proc.decode(reply), stops)
  # The chat stops at EOS, at the template's stop string, or after MAX_NEW tokens: whichever comes first.
  assert len(streamed) == MAX_NEW or streamed[-1] == eos or stopped
  shown = out.split("ASSISTANT: ", 1)[1].split("\nUSER: ")[0]
  assert shown.strip() == text.strip() or "\ufffd" in proc.decode(reply)  # byte tokens may rewrite shown text
