"""LLaVA-NeXT batches under static shapes: tiles padded to the pinpoints' maximum, each image's own token count,
and `image_feature_rows` that place every tile feature (and `image_newline`) where the model would put it."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.config import LlavaConfig
from llava_jax.data import pipeline, synthetic
from llava_jax.data.layout import AnyresGeometry
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.train import recipes

TILE = 28  # the tiny model's tile: 4 x 4 patches of 7 px
PER_TILE = 16
GEOMETRY = AnyresGeometry(pinpoints=recipes.TINY_PINPOINTS, tile=TILE, patches_per_side=4)
MAX_TILES = 5  # base + the 2 x 2 grid of the 56 x 56 canvas, the largest of TINY_PINPOINTS
PROCESSOR = ImageProcessorConfig(shortest_edge=TILE, crop_height=TILE, crop_width=TILE)
IMAGE_TOKEN = 1024


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  # Sides 20..90 px: images smaller than a tile, and wide / tall / square canvases of the tiny pinpoints.
  return synthetic.write_shapes_corpus(str(tmp_path_factory.mktemp("shapes")), num_train=24, num_eval=2,
                                       min_size=20, max_size=90)


def _config(paths, **kw):
  defaults = dict(json_path=paths["stage2"], image_dir=paths["image_dir"], max_length=200, batch_size=4,
                  num_image_tokens=PER_TILE, image_token_index=IMAGE_TOKEN, seed=1, aspect_ratio="anyres",
                  anyres=GEOMETRY, shuffle=False)
  defaults.update(kw)
  return pipeline.DataConfig(**defaults)


def _image_sizes(paths):
  """(height, width) of each record's image (None: a text-only record), and the records."""
  with open(paths["stage2"]) as f:
    records = json.load(f)
  out = []
  for record in records:
    if "image" not in record:
      out.append(None)
      continue
    with Image.open(os.path.join(paths["image_dir"], record["image"])) as im:
      out.append((im.height, im.width))
  return out, records


def test_hand_computed_feature_index_of_a_wide_image():
  # 28 x 56 (h, w) fits the (28, 56) canvas exactly: a 1 x 2 grid, feature map 4 x 8, nothing to unpad.
  # Rows: base tile 0..15, then per map row y: tile 1's patches 16 + 4y .. 16 + 4y + 3, tile 2's 32 + 4y ..,
  # then the newline (-1). 16 + 4 * (8 + 1) = 52 tokens.
  expected = list(range(16))
  for y in range(4):
    expected += [16 + 4 * y + x for x in range(4)] + [32 + 4 * y + x for x in range(4)] + [-1]
  np.testing.assert_array_equal(GEOMETRY.feature_index((28, 56)), expected)
  assert GEOMETRY.max_tiles == MAX_TILES and GEOMETRY.max_num_image_tokens == 16 + 8 * 8 + 8


@pytest.mark.parametrize("packing", [False, True])
def test_batches_carry_tiles_and_the_rows_of_each_slot(corpus, tokenizer, packing):
  sizes, records = _image_sizes(corpus)
  by_id = {str(r["id"]): hw for r, hw in zip(records, sizes)}
  it = pipeline.make_iterator(_config(corpus, packing=packing, max_images_per_row=3), tokenizer, PROCESSOR,
                              process_index=0, process_count=1)
  batch = next(it)
  b, length = 4, 200
  slots = (b, 3) if packing else (b,)
  assert batch["pixel_values"].shape == slots + (MAX_TILES, TILE, TILE, 3)
  assert batch["image_feature_rows"].shape == (b, length) and batch["image_feature_rows"].dtype == np.int32
  per_slot = MAX_TILES * PER_TILE
  newline = int(np.prod(slots)) * per_slot
  assert batch["image_mask"].any()
  for where in zip(*np.nonzero(batch["image_mask"])):
    hw = tuple(int(x) for x in batch["image_sizes"][where])
    n_tiles = GEOMETRY.num_tiles(hw)
    assert np.all(np.abs(batch["pixel_values"][where][:n_tiles]).sum(axis=(1, 2, 3)) > 0)
    assert not np.any(batch["pixel_values"][where][n_tiles:])  # blank tile slots
    assert hw in by_id.values()
  assert not np.any(batch["pixel_values"][~batch["image_mask"]])
  rows = batch["image_feature_rows"]
  is_image = batch["input_ids"] == IMAGE_TOKEN
  assert np.all(rows[~is_image] == 0)
  # Each image's run of tokens takes, in order, its slot's base-tile rows, grid rows and newlines.
  for r in range(b):
    segments = batch["segment_ids"][r] if packing else batch["attention_mask"][r]
    k = 0
    for seg in sorted(set(segments[segments > 0].tolist())):
      inside = (segments == seg) & is_image[r]
      if not inside.any():
        continue
      where = (r, k) if packing else (r,)
      slot = int(np.ravel_multi_index(where, slots))
      index = GEOMETRY.feature_index(tuple(batch["image_sizes"][where]))
      expected = np.where(index == -1, newline, index + slot * per_slot)
      np.testing.assert_array_equal(rows[r][inside], expected)
      k += 1


def test_rows_match_the_inference_builder_and_the_model_embeds_each_row_alone(corpus, tokenizer):
  """The pipeline's rows give the same embeddings as the model's own per-image path (`image_sizes`)."""
  import jax.numpy as jnp
  from flax import nnx

  from llava_jax.models.llava import Llava, image_feature_rows
  from llava_jax.train.step import step_feature_rows

  model_dict = recipes.tiny_next("stage2").model.to_dict()
  model_dict["text"]["vocab_size"] = model_dict["image_token_index"] = IMAGE_TOKEN
  cfg = LlavaConfig.from_dict(model_dict)
  model = Llava(cfg, rngs=nnx.Rngs(0))
  batch = next(pipeline.make_iterator(_config(corpus), tokenizer, PROCESSOR, process_index=0, process_count=1))
  embeds = model.embed(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                       jnp.asarray(batch["image_mask"]), jnp.asarray(batch["image_feature_rows"]))
  for r in np.flatnonzero(batch["image_mask"]):
    ids, pixels, size = batch["input_ids"][r:r + 1], batch["pixel_values"][r:r + 1], batch["image_sizes"][r:r + 1]
    alone = image_feature_rows(cfg, ids, size, MAX_TILES)
    expected = model.embed(jnp.asarray(ids), jnp.asarray(pixels), None, jnp.asarray(alone))
    np.testing.assert_allclose(np.asarray(embeds[r]), np.asarray(expected[0]), rtol=1e-6, atol=1e-6)
  # The train step's row-local splice: rows renumbered within each row, each row gathering its own features.
  rows = step_feature_rows(jnp.asarray(batch["image_feature_rows"]), jnp.asarray(batch["pixel_values"]),
                           cfg, host_rows=batch["input_ids"].shape[0])
  by_row = model.embed(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                       jnp.asarray(batch["image_mask"]), rows, images_by_row=True)
  np.testing.assert_allclose(np.asarray(by_row), np.asarray(embeds), rtol=1e-6, atol=1e-6)


def test_each_image_has_its_own_token_count_and_cut_images_are_skipped(corpus, tokenizer):
  sizes, records = _image_sizes(corpus)
  counts = {GEOMETRY.num_image_tokens(hw) for hw in sizes if hw}
  assert len(counts) > 2, counts  # the corpus really exercises several token counts
  it = pipeline.make_iterator(_config(corpus, num_epochs=1, batch_size=8), tokenizer, PROCESSOR,
                              process_index=0, process_count=1)
  image_rows = []  # (index after the image's last token, sample length) of each image sample
  for batch in it:
    for r in np.flatnonzero(batch["image_mask"]):
      is_image = batch["input_ids"][r] == IMAGE_TOKEN
      assert is_image.sum() == GEOMETRY.num_image_tokens(batch["image_sizes"][r])
      image_rows.append((int(np.flatnonzero(is_image)[-1]) + 1, int(batch["attention_mask"][r].sum())))
  assert len(image_rows) == sum(hw is not None for hw in sizes)
  # A max_length that cuts into some images: exactly those are skipped (as image_truncated), the others come.
  limit = int(np.median([image_end for image_end, _ in image_rows])) + 12  # room for some reply tokens
  it = pipeline.make_iterator(_config(corpus, num_epochs=1, max_length=limit, max_skip_fraction=1.0,
                                      max_consecutive_skips=0), tokenizer, PROCESSOR, process_index=0,
                              process_count=1)
  kept = sum(int(batch["image_mask"].sum()) for batch in it)
  cut = sum(image_end > limit for image_end, _ in image_rows)
  assert it.skip_counts.get("image_truncated", 0) == cut > 0
  assert 0 < kept <= len(image_rows) - cut  # (a kept image whose reply is cut away is a no_targets skip)


def test_length_grouping_and_an_anyres_setting_without_geometry(corpus, tokenizer):
  it = pipeline.make_iterator(_config(corpus, group_by_modality_length=True, shuffle=True), tokenizer, PROCESSOR,
                              process_index=0, process_count=1)
  assert next(it)["pixel_values"].shape == (4, MAX_TILES, TILE, TILE, 3)
  with pytest.raises(ValueError, match="anyres"):
    _config(corpus, anyres=None)
