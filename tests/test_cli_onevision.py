"""`llava-jax generate` on a converted tiny LLaVA-OneVision checkpoint: `--image` repeated (each image read as its
base tile) and `--video DIR` (a folder of frames, sorted) reach the model with their sizes and frames; the printed
reply is `llava_jax.generate`'s greedy reply for the same prompt and inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import hf_tiny
from llava_jax import generate, generation, load_checkpoint
from llava_jax.cli import main as cli
from llava_jax.decoding import stop_at
from llava_jax.processor import Processor

MAX_NEW = 10
QUESTION = "What happens here?"
TEMPLATE = "chatml_direct"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("ov_cli")
  hf_tiny.onevision_directory(root / "hf")
  assert cli(["convert", "--hf", str(root / "hf"), "--out", str(root / "ckpt"), "--quiet"]) == 0
  rng = np.random.default_rng(0)
  for name, hw in (("tall", (90, 40)), ("wide", (40, 120))):
    Image.fromarray(rng.integers(0, 256, hw + (3,), np.uint8)).save(root / f"{name}.png")
  (root / "clip").mkdir()
  for i in (2, 0, 1):  # written out of order: the folder's frames are read sorted by name
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(root / "clip" / f"frame_{i:02d}.png")
  return root


def expected_reply(ckpt, images=(), videos=()):
  """(greedy tokens, text) of `llava_jax.generate` on the prompt the CLI renders: cut at EOS and the stop string."""
  model = load_checkpoint(str(ckpt / "ckpt"))
  proc = Processor.from_model(model, template=TEMPLATE)
  prompt = proc.prompt([QUESTION], image=len(images), videos=len(videos))
  inputs = proc([prompt], list(images) or None, videos=list(videos) or None)
  pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
  eos = proc.tokenizer.eos_token_id
  tokens = generate(model, inputs["input_ids"], pixels, inputs["attention_mask"], max_new_tokens=MAX_NEW,
                    eos_token_id=eos, image_sizes=inputs["image_sizes"],
                    pixel_values_videos=inputs["pixel_values_videos"])[0]
  cut = np.flatnonzero(tokens == eos)
  text = stop_at(proc.decode(tokens[:cut[0]] if len(cut) else tokens), [proc.template.stop_str])[0]
  return tokens, inputs, text


@pytest.mark.parametrize("media", ["two_images", "video"])
def test_generate_prints_the_greedy_reply(ckpt, media, monkeypatch, capsys):
  streamed, original_stream = [], generation.stream

  def recording_stream(*args, **kwargs):  # the command's own stream, its tokens noted on the way
    for token in original_stream(*args, **kwargs):
      streamed.append(int(token[0]))
      yield token

  monkeypatch.setattr(generation, "stream", recording_stream)
  if media == "two_images":
    images, videos = [str(ckpt / "tall.png"), str(ckpt / "wide.png")], []
    flags = ["--image", images[0], "--image", images[1]]
  else:
    images, videos = [], [str(ckpt / "clip")]
    flags = ["--video", videos[0]]
  assert cli(["generate", "--ckpt", str(ckpt / "ckpt"), *flags, "--prompt", QUESTION, "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW), "--template", TEMPLATE]) == 0
  printed = capsys.readouterr().out
  tokens, inputs, text = expected_reply(ckpt, images, videos)
  if media == "two_images":
    assert inputs["image_base_only"].tolist() == [True, True] and inputs["image_sizes"].tolist() == [[90, 40],
                                                                                                   [40, 120]]
  else:
    assert inputs["pixel_values"] is None and inputs["pixel_values_videos"].shape[:2] == (1, 3)
  assert streamed and streamed == tokens[:len(streamed)].tolist()
  assert text.strip() and printed.strip() == text.strip()


def test_several_images_need_a_onevision_checkpoint(tmp_path, capsys):
  root = tmp_path
  hf_tiny.converted_checkpoint(root)
  Image.new("RGB", (30, 20)).save(root / "a.png")
  assert cli(["generate", "--ckpt", str(root / "ckpt"), "--image", str(root / "a.png"), "--image",
              str(root / "a.png"), "--prompt", "Hi"]) == 2
  assert "2 --image given, but this checkpoint takes one image" in capsys.readouterr().err
