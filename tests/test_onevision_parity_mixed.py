"""LLaVA-OneVision beyond one image a prompt: our logits and greedy tokens against transformers'
LlavaOnevisionForConditionalGeneration (PyTorch, CPU, fp32) on two and three images in one prompt, videos (one or
two a prompt, apart or adjacent, beside an image), and left-padded batches mixing a single image (a shrunk grid),
several images, a video and text only.

Our inputs come from our Processor (a byte-level Qwen2 tokenizer with <image> / <video>, the model's own image
processor config); transformers gets the same ids and pixels (NHWC -> NCHW), plus what it is told rather than
infers: `batch_num_images` per prompt (1: tiled in full, 2 or more: base tile only, as its processor returns for
images nested per prompt) and videos as [videos, frames, C, H, W], all of one frame count. It takes a batch
mixing single- and multi-image rows in one call, so both sides run the mixed batch whole (logits and generate);
videos of different frame counts it cannot batch, so there each of our batch's rows is compared with
transformers run on that row alone.
"""

import itertools
import json

import numpy as np
import pytest
import torch

import hf_tiny
from llava_jax import generate, load_hf_checkpoint
from llava_jax.data import onevision
from llava_jax.data.layout import layout_for
from llava_jax.processor import Processor

TOL = 1e-4
IMAGE, VIDEO, MAX = hf_tiny.OV_IMAGE, hf_tiny.OV_VIDEO, 2
PREPROCESSOR = {"size": {"height": 56, "width": 56}, "image_grid_pinpoints": hf_tiny.PINPOINTS_OV_56,
                "resample": 3, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True}
SHRUNK, PAIR, THREE = (150, 130), [(50, 110), (70, 40)], [(30, 40), (20, 330), (90, 90)]
PROMPTS = {"single": "describe <image> please", "pair": "compare <image> and <image> now",
           "video": "<video> what happened?", "text": "hi there, no picture", "both": "<image> or <video>?",
           "three": "<image>, <image> or <image>", "videos": "<video> then <video>", "adjacent": "<video><video>!"}


@pytest.fixture(scope="module", params=["untied", "tied"])
def models(request, tmp_path_factory):
  """(transformers model, ours loaded from its save_pretrained directory, our Processor from the same files)."""
  hf = hf_tiny.onevision_model(
      request.param == "tied", seed=len(request.param), image_token=IMAGE, video_token=VIDEO, max_grid_tiles=MAX,
      text=hf_tiny.qwen2_text_config(tie_word_embeddings=request.param == "tied", vocab_size=264))
  folder = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(folder)
  hf_tiny.qwen2_byte_tokenizer().save_pretrained(str(folder))
  (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
  ours = load_hf_checkpoint(str(folder))
  return hf, ours, Processor.from_model(ours)


def video(frames, nth=0):
  """Random frames: the `nth` video of this frame count in a batch is the same wherever it sits."""
  return np.random.default_rng((frames, nth)).integers(0, 256, (frames, 48, 64, 3), np.uint8)


def inputs(proc, kinds, frames=(3,), **slots):
  """Our Processor's batch for prompts of these kinds (PROMPTS' keys), in order, with their images and videos;
  beside it, the images each prompt holds (transformers' `batch_num_images`). `slots`: the processor's
  max_tiles / max_frames."""
  images, videos, shown = [], [], iter(frames)
  for kind in kinds:
    images += {"single": [SHRUNK], "both": [SHRUNK], "pair": PAIR, "three": THREE}.get(kind, [])
    for f in itertools.islice(shown, PROMPTS[kind].count("<video>")):
      videos.append(video(f, nth=sum(len(v) == f for v in videos)))
  batch = proc([PROMPTS[k] for k in kinds], images=hf_tiny.random_images(images) or None, videos=videos or None,
                **slots)
  return {**batch, "images_per_prompt": [PROMPTS[k].count("<image>") for k in kinds]}


def transformers_inputs(batch) -> dict:
  """transformers' model inputs from ours: the same ids and pixels, NCHW, and the image counts per prompt (what
  its processor returns for images nested per prompt)."""
  ids, mask = torch.as_tensor(batch["input_ids"], dtype=torch.long), torch.as_tensor(batch["attention_mask"])
  out = dict(input_ids=ids, attention_mask=mask)
  if batch["pixel_values"] is not None:
    out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"].transpose(0, 1, 4, 2, 3)))
    out["image_sizes"] = torch.as_tensor(batch["image_sizes"], dtype=torch.long)
    out["batch_num_images"] = torch.as_tensor(batch["images_per_prompt"])
  if batch["pixel_values_videos"] is not None:
    out["pixel_values_videos"] = torch.from_numpy(
        np.ascontiguousarray(batch["pixel_values_videos"].transpose(0, 1, 4, 2, 3)))
  return out


def reference_logits(hf, batch):
  kw = transformers_inputs(batch)
  with torch.no_grad():
    return hf(position_ids=(kw["attention_mask"].cumsum(-1) - 1).clamp(min=0), **kw).logits.numpy()


def ours_logits(model, batch):
  return np.asarray(model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                          image_sizes=batch["image_sizes"], pixel_values_videos=batch["pixel_values_videos"]),
                    np.float32)


def max_error(hf, model, batch):
  on = batch["attention_mask"].astype(bool)
  return np.abs(reference_logits(hf, batch) - ours_logits(model, batch))[on].max()


def test_the_inputs_cover_each_reading(models):
  _, ours, proc = models
  layout = layout_for(ours.config)
  grid = onevision.image_grid(SHRUNK, hf_tiny.PINPOINTS_OV_56, 56, 4, MAX)
  assert grid[0] != grid[1]  # the single image's grid map is shrunk
  batch = inputs(proc, ["single", "pair", "video", "text"])
  assert batch["image_base_only"].tolist() == [False, True, True]
  counts = (batch["input_ids"] == IMAGE).sum(1).tolist()
  assert counts == [layout.num_image_tokens(SHRUNK), 2 * 17, 0, 0]
  assert (batch["input_ids"] == VIDEO).sum(1).tolist() == [0, 0, 3 * 4 + 1, 0]
  assert transformers_inputs(batch)["batch_num_images"].tolist() == [1, 2, 0, 0]


def test_two_images_in_one_prompt(models):
  hf, ours, proc = models
  assert max_error(hf, ours, inputs(proc, ["pair"])) <= TOL


def test_a_video(models):
  hf, ours, proc = models
  batch = inputs(proc, ["video"])
  assert batch["pixel_values"] is None and batch["pixel_values_videos"].shape == (1, 3, 56, 56, 3)
  assert max_error(hf, ours, batch) <= TOL


@pytest.mark.parametrize("kinds, frames", [(["videos"], (2, 2)), (["adjacent"], (2, 2)),
                                           (["video", "videos", "text"], (1, 1, 1))])
def test_several_videos(models, kinds, frames):
  """Videos of one frame count (transformers' one shape), two in a prompt, apart or adjacent (one run of video
  tokens, told apart as the frame slots are full)."""
  hf, ours, proc = models
  batch = inputs(proc, kinds, frames)
  assert batch["pixel_values_videos"].shape[:2] == (len(frames), frames[0])
  assert max_error(hf, ours, batch) <= TOL


@pytest.mark.parametrize("kinds", [["single", "pair", "video", "text"], ["text", "video", "pair", "single"],
                                   ["pair", "both", "three", "text"]])
def test_left_padded_mixed_batch(models, kinds):
  """Several orders (the rows' images are read in tag order whichever row holds them); an image with a video in
  one prompt, three images in one."""
  hf, ours, proc = models
  assert max_error(hf, ours, inputs(proc, kinds)) <= TOL


@pytest.mark.parametrize("static", [False, True])
def test_greedy_generation_on_the_mixed_batch(models, static):
  """`static`: ours with the layout's tile slots and spare frame slots (fixed shapes, as serving batches them);
  transformers with the batch's own."""
  hf, ours, proc = models
  kinds, new = ["single", "pair", "video", "text"], 6
  batch = reference = inputs(proc, kinds)
  if static:
    batch = inputs(proc, kinds, max_tiles=layout_for(ours.config).max_tiles, max_frames=5)
    assert batch["pixel_values"].shape[1] > reference["pixel_values"].shape[1]
    assert batch["pixel_values_videos"].shape[1] == 5
  with torch.no_grad():
    ref = hf.generate(**transformers_inputs(reference), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[:, batch["input_ids"].shape[1]:]
  got = generate(ours, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                 image_sizes=batch["image_sizes"], pixel_values_videos=batch["pixel_values_videos"],
                 max_new_tokens=new, eos_token_id=(), pad_token_id=0)
  np.testing.assert_array_equal(got, ref.numpy())


def test_videos_of_different_lengths(models):
  """Ours batches videos of 3 and 2 frames (the shorter zero-padded to 3 frame slots); transformers takes one
  frame count a call, so each row is compared with transformers on that row alone."""
  hf, ours, proc = models
  kinds, frames = ["video", "text", "video"], (3, 2)
  batch = inputs(proc, kinds, frames)
  assert batch["pixel_values_videos"].shape[:2] == (2, 3) and not batch["pixel_values_videos"][1, 2].any()
  got = ours_logits(ours, batch)
  shown = iter(frames)
  for b, kind in enumerate(kinds):
    alone = inputs(proc, [kind], (next(shown),) if kind == "video" else ())
    n = alone["input_ids"].shape[1]
    np.testing.assert_array_equal(batch["input_ids"][b, -n:], alone["input_ids"][0])
    assert np.abs(reference_logits(hf, alone)[0] - got[b, -n:]).max() <= TOL
