"""LLaVA-OneVision through the data pipeline and the train step under static shapes: each image token's four
feature rows and weights (the bilinear shrink) as the model computes them from image_sizes, records of several
images base-only in their own slots, the row-local splice equal to the batch-wide one, and stage-2 steps on
batches of many image sizes with one compile, the loss falling and the vision tower at its own learning rate;
then video records (folders of frames) beside image ones: static frame slots, the model's video taps, the
row-local splice with videos, and steps on such batches.

A tiny model: 28-px tiles of 4 x 4 features (a CLIP stand-in for SigLIP, CLS dropped), pinpoints up to 2 x 2
tiles and anyres_max_1, so grids over 1.21 tiles' features are shrunk; images of 20..90 px give both."""

import dataclasses
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import train_util
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.data import onevision, pipeline, synthetic
from llava_jax.data import text as text_lib
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.data.layout import layout_for
from llava_jax.models.llava import Llava, image_feature_rows, image_feature_weights, video_feature_taps
from llava_jax.train import recipes
from llava_jax.train.optim import OptimConfig
from llava_jax.train.step import Trainer, step_feature_rows

TILE, IMAGE_TOKEN, B, LENGTH, M = 28, 1024, 4, 128, 2
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
PROCESSOR = ImageProcessorConfig(shortest_edge=TILE, crop_height=TILE, crop_width=TILE,
                                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def _model_config() -> LlavaConfig:
  vision = VisionConfig(image_size=TILE, patch_size=7, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                        num_attention_heads=2)
  text = TextConfig(vocab_size=IMAGE_TOKEN, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  return LlavaConfig(vision=vision, text=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                     image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1")


CFG = _model_config()
LAYOUT = layout_for(CFG)
P = LAYOUT.max_tiles  # base + the 2 x 2 grid


def _keep_several_tags(turns, original=text_lib.move_image_to_front):
  """LLaVA-NeXT's `preprocess_multimodal`: a turn of several "<image>" tags keeps them where they are (the
  conversation templates' own handling of several images is not this test's subject)."""
  if any(value.count("<image>") > 1 for _, value in turns):
    return list(turns)
  return original(turns)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The shapes corpus (sides 20..90 px) with every fourth record turned into one of two images."""
  root = str(tmp_path_factory.mktemp("ov"))
  paths = synthetic.write_shapes_corpus(root, num_train=24, num_eval=2, min_size=20, max_size=90)
  with open(paths["stage2"]) as f:
    records = json.load(f)
  names = [r["image"] for r in records if "image" in r]
  for i in range(0, len(records), 4):
    records[i] = {"id": f"pair-{i}", "image": [names[i % len(names)], names[(i + 1) % len(names)]],
                  "conversations": [{"from": "human", "value": "<image>\n<image>\nWhich shapes are these?"},
                                    {"from": "gpt", "value": "Two shapes on plain backgrounds."}]}
  paths["mixed"], paths["pairs"] = os.path.join(root, "mixed.json"), len(range(0, len(records), 4))
  with open(paths["mixed"], "w") as f:
    json.dump(records, f)
  return paths


def _batches(paths, tokenizer, n=None, **kw):
  """The first `n` batches (all with n None) of the mixed corpus."""
  settings = dict(json_path=paths["mixed"], image_dir=paths["image_dir"], max_length=LENGTH, batch_size=B,
                  image_token_index=IMAGE_TOKEN, num_image_tokens=16, aspect_ratio="anyres", anyres=LAYOUT,
                  max_images_per_sample=M, shuffle=False, seed=0)
  settings.update(kw)
  with mock.patch.object(text_lib, "move_image_to_front", _keep_several_tags):
    it = pipeline.make_iterator(pipeline.DataConfig(**settings), tokenizer, PROCESSOR, process_index=0,
                                process_count=1)
    out = []
    for batch in it:
      out.append(batch)
      if n is not None and len(out) == n:
        break
  return out, it


def test_batches_carry_tiles_rows_and_weights_of_fixed_shapes(corpus, tokenizer):
  batches, it = _batches(corpus, tokenizer, num_epochs=1)
  shrunk = several = 0
  for batch in batches:
    assert batch["pixel_values"].shape == (B, M, P, TILE, TILE, 3)
    assert batch["image_mask"].shape == (B, M) and batch["image_sizes"].shape == (B, M, 2)
    assert batch["image_feature_rows"].shape == (B, LENGTH, 4) and batch["image_feature_rows"].dtype == np.int32
    assert batch["image_feature_weights"].shape == (B, LENGTH, 4)
    assert batch["image_feature_weights"].dtype == np.float32
    is_image = batch["input_ids"] == IMAGE_TOKEN
    weights = batch["image_feature_weights"]
    np.testing.assert_allclose(weights[is_image].sum(-1), 1.0, rtol=1e-6)  # bilinear, or one row
    assert not weights[~is_image].any() and not batch["image_feature_rows"][~is_image].any()
    shrunk += int(np.sum((weights[is_image] > 0) & (weights[is_image] < 1)) > 0)
    for r in range(B):
      k = int(batch["image_mask"][r].sum())
      assert not batch["image_mask"][r, k:].any()  # real images first
      assert not batch["pixel_values"][r, k:].any()
      sizes = batch["image_sizes"][r, :k]
      tiles = [1] * k if k > 1 else [LAYOUT.num_tiles(hw) for hw in sizes]
      for j, n in enumerate(tiles):
        assert np.abs(batch["pixel_values"][r, j, :n]).sum(axis=(1, 2, 3)).min() > 0
        assert not batch["pixel_values"][r, j, n:].any()  # blank tile slots
      expected = (k * (LAYOUT.tile_features + 1) if k > 1 else
                  sum(LAYOUT.num_image_tokens(hw) for hw in sizes))
      assert is_image[r].sum() == expected
      several += k > 1
  assert shrunk and several == corpus["pairs"]  # downsampling happens, and every record of two images came
  assert not it.skip_counts
  # One image slot a row: records of two images are skipped as malformed, the rest keep their shapes.
  batches, it = _batches(corpus, tokenizer, num_epochs=1, max_images_per_sample=1, max_skip_fraction=1.0)
  assert batches[0]["pixel_values"].shape == (B, P, TILE, TILE, 3)
  assert batches[0]["image_feature_rows"].shape == (B, LENGTH, 4)
  assert it.skip_counts == {"malformed_record": corpus["pairs"]}
  with pytest.raises(ValueError, match="OneVision"):
    pipeline.DataConfig(json_path="x", max_images_per_sample=2)


def test_packed_batches_number_each_image_slot(corpus, tokenizer):
  (batch,), _ = _batches(corpus, tokenizer, 1, packing=True, max_images_per_row=3, max_length=200)
  assert batch["pixel_values"].shape == (B, 3, P, TILE, TILE, 3)
  assert batch["image_feature_rows"].shape == batch["image_feature_weights"].shape == (B, 200, 4)
  newline = B * 3 * LAYOUT.slot_features()
  rows = batch["image_feature_rows"][batch["input_ids"] == IMAGE_TOKEN]
  assert (rows == newline).any() and rows.max() == newline


def test_rows_and_weights_are_the_models_from_image_sizes(corpus, tokenizer):
  batches, _ = _batches(corpus, tokenizer, 3)
  for batch in batches:
    local = LAYOUT.row_local_rows(batch["image_feature_rows"], M * P, B)
    is_image = batch["input_ids"] == IMAGE_TOKEN
    for r in np.flatnonzero(batch["image_mask"].any(axis=1)):
      k = int(batch["image_mask"][r].sum())
      ids, sizes = batch["input_ids"][r:r + 1], batch["image_sizes"][r, :k]
      alone = image_feature_rows(CFG, ids, sizes, P)  # the model's: k images of P tile slots
      alone = LAYOUT.with_blank_slots(alone, is_image[r:r + 1], k, M, P)  # ... in a row of M slots
      np.testing.assert_array_equal(local[r][is_image[r]], alone[0][is_image[r]])  # elsewhere: clipped, unused
      np.testing.assert_array_equal(batch["image_feature_weights"][r:r + 1], image_feature_weights(CFG, ids, sizes))


def test_the_row_local_splice_with_weights_equals_the_batch_wide_one(corpus, tokenizer):
  (batch,), _ = _batches(corpus, tokenizer, 1)
  model = Llava(CFG, rngs=nnx.Rngs(0))
  ids, pixels, mask = (jnp.asarray(batch[k]) for k in ("input_ids", "pixel_values", "image_mask"))
  weights = jnp.asarray(batch["image_feature_weights"])
  wide = model.embed(ids, pixels, mask, jnp.asarray(batch["image_feature_rows"]), image_feature_weights=weights)
  rows = step_feature_rows(jnp.asarray(batch["image_feature_rows"]), pixels, CFG, host_rows=B)
  by_row = model.embed(ids, pixels, mask, rows, images_by_row=True, image_feature_weights=weights)
  np.testing.assert_allclose(np.asarray(by_row), np.asarray(wide), rtol=1e-6, atol=1e-6)
  # The same as the model's own path for each row alone, from its image sizes.
  for r in range(B):
    k = int(batch["image_mask"][r].sum())
    if k:
      alone = model(ids[r:r + 1], pixels[r, :k], image_sizes=np.asarray(batch["image_sizes"][r, :k]), head=False)
      full = model(ids[r:r + 1], pixels[r:r + 1], image_feature_rows=rows[r:r + 1], images_by_row=True,
                   image_feature_weights=weights[r:r + 1], head=False)
      np.testing.assert_allclose(np.asarray(full), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_stage2_steps_compile_once_the_loss_falls_and_the_tower_trains_at_its_rate(corpus, tokenizer):
  batches, _ = _batches(corpus, tokenizer, 3)
  assert len({tuple(map(tuple, b["image_sizes"].reshape(-1, 2))) for b in batches}) == 3
  optim = OptimConfig(lr=3e-3, vision_tower_lr=3e-5, warmup_ratio=0.0,
                      groups=recipes.stage_groups("stage2", train_vision_tower=True))
  trainer = Trainer(CFG, "stage2", optim, 1000, train_util.mesh_of((1, 1, 1)))
  state = trainer.init_state()
  initial = train_util.flat(jax.device_get(state["params"]["model"]))
  state, metrics = trainer.step(state, batches[0])
  after = train_util.flat(jax.device_get(state["params"]["model"]))

  # Adam's first update is lr * g / (|g| + eps): each group's largest change is its own rate.
  def largest_change(prefix):
    return max(float(np.max(np.abs(after[k] - initial[k]))) for k in initial if k.startswith(prefix))

  np.testing.assert_allclose(largest_change("vision_tower"), 3e-5, rtol=1e-2)
  np.testing.assert_allclose(largest_change("multi_modal_projector"), 3e-3, rtol=1e-2)
  np.testing.assert_allclose(largest_change("language_model"), 3e-3, rtol=1e-2)
  losses = [float(metrics["loss"])]
  for i in range(1, 9):
    state, metrics = trainer.step(state, batches[i % 3])
    losses.append(float(metrics["loss"]))
  assert len(trainer._compiled) == 1  # pylint: disable=protected-access  # batches of other image sizes: one shape
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_synthetic_batches_carry_taps_and_weights():
  from llava_jax.train.batches import SyntheticIterator  # pylint: disable=import-outside-toplevel

  batch = next(SyntheticIterator(B, 96, CFG, seed=0))
  assert batch["pixel_values"].shape == (B, P, TILE, TILE, 3)
  assert batch["image_feature_rows"].shape == batch["image_feature_weights"].shape == (B, 96, 4)
  is_image = batch["input_ids"] == IMAGE_TOKEN
  np.testing.assert_allclose(batch["image_feature_weights"][is_image].sum(-1), 1.0, rtol=1e-6)
  for r in np.flatnonzero(batch["image_mask"]):
    ids, sizes = batch["input_ids"][r:r + 1], batch["image_sizes"][r:r + 1]
    np.testing.assert_array_equal(batch["image_feature_weights"][r:r + 1], image_feature_weights(CFG, ids, sizes))


# -- videos: records of frame folders beside image records ------------------------------------------------------

VIDEO_TOKEN, F = IMAGE_TOKEN + 1, 3
VCFG = dataclasses.replace(CFG, video_token_index=VIDEO_TOKEN)
FRAME_COUNTS = [2, 5, 3, 1, 4, 6]  # more than F: sampled uniformly; fewer: zero frames after them


@pytest.fixture(scope="module")
def video_corpus(corpus):
  """The mixed corpus with a video record after every second record (a folder of random frames, one given as a
  list of frame files), and one record of two videos (malformed)."""
  rng = np.random.default_rng(0)
  with open(corpus["mixed"]) as f:
    records = json.load(f)[:12]
  videos = []
  for i, count in enumerate(FRAME_COUNTS):
    folder = os.path.join(corpus["image_dir"], "videos", f"v{i}")
    os.makedirs(folder, exist_ok=True)
    names = []
    for k in range(count):
      side = int(rng.integers(20, 41))
      Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), np.uint8)).save(os.path.join(folder, f"{k:03d}.png"))
      names.append(f"videos/v{i}/{k:03d}.png")
    videos.append({"id": f"video-{i}", "video": names if i == 2 else f"videos/v{i}",
                   "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                     {"from": "gpt", "value": "Colours flicker."}]})
  videos.append({"id": "two-videos", "video": [["videos/v0/000.png"], ["videos/v1/000.png"]],
                 "conversations": [{"from": "human", "value": "<video>\n<video>\nAnd?"},
                                   {"from": "gpt", "value": "Two."}]})
  out = []
  for i, record in enumerate(records):
    out.append(record)
    if i % 2 and videos:
      out.append(videos.pop(0))
  out += videos
  path = os.path.join(os.path.dirname(corpus["mixed"]), "videos.json")
  with open(path, "w") as f:
    json.dump(out, f)
  return dict(corpus, mixed=path)


def _video_batches(paths, tokenizer, n=None, **kw):
  settings = dict(max_frames=F, video_token_index=VIDEO_TOKEN, max_skip_fraction=1.0)
  settings.update(kw)
  return _batches(paths, tokenizer, n, **settings)


def test_video_batches_carry_frames_rows_and_weights_of_fixed_shapes(video_corpus, tokenizer):
  batches, it = _video_batches(video_corpus, tokenizer, num_epochs=1)
  seen = []
  for batch in batches:
    assert batch["pixel_values"].shape == (B, M, P, TILE, TILE, 3)
    assert batch["pixel_values_videos"].shape == (B, F, TILE, TILE, 3)
    assert batch["video_feature_rows"].shape == batch["video_feature_weights"].shape == (B, LENGTH, 4)
    assert batch["video_feature_rows"].dtype == np.int32 and batch["video_feature_weights"].dtype == np.float32
    is_video = batch["input_ids"] == VIDEO_TOKEN
    assert (batch["labels"][is_video] == text_lib.IGNORE_INDEX).all()
    assert not batch["video_feature_weights"][~is_video].any() and not batch["video_feature_rows"][~is_video].any()
    local = LAYOUT.row_local_rows(batch["video_feature_rows"], F, B)
    for r in range(B):
      frames = int(np.abs(batch["pixel_values_videos"][r]).sum(axis=(1, 2, 3)).astype(bool).sum())
      assert not batch["pixel_values_videos"][r, frames:].any()
      if not is_video[r].any():
        assert frames == 0
        continue
      assert not batch["image_mask"][r].any() and is_video[r].sum() == LAYOUT.num_video_tokens(frames)
      rows, weights = video_feature_taps(VCFG, batch["input_ids"][r:r + 1], (1, F))  # the model's, row alone
      np.testing.assert_array_equal(local[r][is_video[r]], rows[0][is_video[r]])
      np.testing.assert_array_equal(batch["video_feature_weights"][r], weights[0])
      seen.append((frames, batch["pixel_values_videos"][r]))
  assert sorted(f for f, _ in seen) == sorted(min(c, F) for c in FRAME_COUNTS)
  assert it.skip_counts == {"malformed_record": 1}  # the record of two videos
  # Five frames sampled down to three: frames 0, 2 and 4 (np.linspace, rounded), as the processor makes them.
  folder = os.path.join(video_corpus["image_dir"], "videos", "v1")
  expected = onevision.video_frames([Image.open(os.path.join(folder, f"{k:03d}.png")).convert("RGB")
                                     for k in (0, 2, 4)], PROCESSOR)
  assert any(np.array_equal(pixels, expected) for _, pixels in seen)


def _video_batch(video_corpus, tokenizer):
  """The first batch holding a video and an image."""
  batches, _ = _video_batches(video_corpus, tokenizer, 4)
  return next(b for b in batches if (b["input_ids"] == VIDEO_TOKEN).any() and b["image_mask"].any())


def test_the_row_local_splice_with_videos_equals_the_batch_wide_one(video_corpus, tokenizer):
  batch = _video_batch(video_corpus, tokenizer)
  model = Llava(VCFG, rngs=nnx.Rngs(0))
  ids, pixels, mask, videos = (jnp.asarray(batch[k]) for k in ("input_ids", "pixel_values", "image_mask",
                                                                "pixel_values_videos"))
  image_rows, image_weights = jnp.asarray(batch["image_feature_rows"]), jnp.asarray(batch["image_feature_weights"])
  # Batch-wide: the real videos only, in token order, with the model's own rows and weights from input_ids.
  has_video = np.asarray(batch["input_ids"] == VIDEO_TOKEN).any(axis=1)
  computed = model.feature_inputs(np.asarray(ids), pixel_values_videos=videos[has_video])
  np.testing.assert_array_equal(np.asarray(computed["video_feature_weights"]), batch["video_feature_weights"])
  wide = model.embed(ids, pixels, mask, image_rows, image_feature_weights=image_weights,
                     pixel_values_videos=videos[has_video], video_feature_rows=computed["video_feature_rows"],
                     video_feature_weights=computed["video_feature_weights"])
  by_row = model.embed(ids, pixels, mask, step_feature_rows(image_rows, pixels, VCFG, host_rows=B), images_by_row=True,
                       image_feature_weights=image_weights, pixel_values_videos=videos,
                       video_feature_rows=step_feature_rows(jnp.asarray(batch["video_feature_rows"]), videos, VCFG,
                                                            host_rows=B),
                       video_feature_weights=jnp.asarray(batch["video_feature_weights"]))
  np.testing.assert_allclose(np.asarray(by_row), np.asarray(wide), rtol=1e-6, atol=1e-6)
  is_video = np.asarray(ids == VIDEO_TOKEN)
  assert np.abs(np.asarray(by_row)[is_video]).sum() > 0


def test_video_steps_compile_once_and_the_loss_falls(video_corpus, tokenizer):
  batches, _ = _video_batches(video_corpus, tokenizer, 3)
  assert all((b["input_ids"] == VIDEO_TOKEN).any() for b in batches)
  optim = OptimConfig(lr=3e-3, warmup_ratio=0.0, groups=recipes.stage_groups("stage2"))
  trainer = Trainer(VCFG, "stage2", optim, 1000, train_util.mesh_of((1, 1, 1)))
  state = trainer.init_state()
  losses = []
  for i in range(9):
    state, metrics = trainer.step(state, batches[i % 3])
    losses.append(float(metrics["loss"]))
  assert len(trainer._compiled) == 1  # pylint: disable=protected-access
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
