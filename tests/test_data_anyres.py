"""LLaVA-NeXT anyres geometry, tiles and feature placement against transformers' `llava_next` and the reference.

The "hf" semantics is checked against transformers' own functions (`select_best_resolution`,
`get_anyres_image_grid_shape`, `image_size_to_num_patches`, `unpad_image`, `pack_image_features`,
`LlavaNextImageProcessorPil`); the "original" semantics against the reference LLaVA's `mm_utils.py` /
`llava_arch.py`, written below from their published definitions.
"""

import math
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf_next

import hf_tiny
from llava_jax.data import anyres, layout
from llava_jax.data.image import ImageProcessorConfig

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # the 1.6 checkpoints'
PINPOINTS_56 = [[h * 56 // 336, w * 56 // 336] for h, w in PINPOINTS_336]  # scaled for a 56-px tiny CLIP
PROCESSOR_56 = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56},
                "image_grid_pinpoints": PINPOINTS_56}

# Odd sizes, extreme aspect ratios, smaller than a tile, each pinpoint exactly (scaled to the tile).
SIZES_56 = [(20, 30), (1, 1), (500, 40), (40, 500), (57, 113), (3, 200), (300, 451), (400, 600), (512, 512),
            (99, 57)] + [tuple(p) for p in PINPOINTS_56]


def random_sizes(n, high, seed=0):
  return [tuple(s) for s in np.random.default_rng(seed).integers(1, high, (n, 2)).tolist()]


# ---------------------------------------------------------------- the reference's definitions (original)
# llava/mm_utils.py and llava/model/llava_arch.py: sizes are PIL (width, height), pinpoints (width, height).

def ref_select_best_resolution(original_size, possible_resolutions):
  original_width, original_height = original_size
  best_fit, max_effective, min_wasted = None, 0, float("inf")
  for width, height in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
    effective = min(downscaled_width * downscaled_height, original_width * original_height)
    wasted = width * height - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      max_effective, min_wasted, best_fit = effective, wasted, (width, height)
  return best_fit


def ref_resize_and_pad_image(image, target_resolution):
  original_width, original_height = image.size
  target_width, target_height = target_resolution
  scale_w, scale_h = target_width / original_width, target_height / original_height
  if scale_w < scale_h:
    new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
  else:
    new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
  resized = image.resize((new_width, new_height))  # PIL's default resample: bicubic
  new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
  new_image.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
  return new_image


def ref_divide_to_patches(image, patch_size):
  width, height = image.size
  return [image.crop((j, i, j + patch_size, i + patch_size))
          for i in range(0, height, patch_size) for j in range(0, width, patch_size)]


def ref_process_anyres_image(image, processor, grid_pinpoints):
  best_resolution = ref_select_best_resolution(image.size, grid_pinpoints)
  padded = ref_resize_and_pad_image(image, best_resolution)
  patches = ref_divide_to_patches(padded, processor.crop_size["height"])
  original_resized = image.resize((processor.size["shortest_edge"], processor.size["shortest_edge"]))
  return np.stack([processor(p, return_tensors="np")["pixel_values"][0] for p in [original_resized] + patches])


def ref_get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
  width, height = ref_select_best_resolution(image_size, grid_pinpoints)
  return width // patch_size, height // patch_size


def ref_unpad_image(tensor, original_size):
  original_width, original_height = original_size
  current_height, current_width = tensor.shape[1:]
  if original_width / original_height > current_width / current_height:
    new_height = int(original_height * (current_width / original_width))
    padding = (current_height - new_height) // 2
    return tensor[:, padding:current_height - padding, :]
  new_width = int(original_width * (current_height / original_height))
  padding = (current_width - new_width) // 2
  return tensor[:, :, padding:current_width - padding]


def ref_spatial_unpad(image_feature, image_size, grid_pinpoints, vision_image_size, patches_per_side, newline):
  """`prepare_inputs_labels_for_multimodal`'s anyres + spatial_unpad branch, for one image, in numpy."""
  base, grid = image_feature[0], image_feature[1:]
  height = width = patches_per_side
  assert height * width == base.shape[0]
  num_patch_width, num_patch_height = ref_get_anyres_image_grid_shape(image_size, grid_pinpoints, vision_image_size)
  grid = grid.reshape(num_patch_height, num_patch_width, height, width, -1).transpose(4, 0, 2, 1, 3)
  grid = grid.reshape(grid.shape[0], num_patch_height * height, num_patch_width * width)
  grid = ref_unpad_image(grid, image_size)
  grid = np.concatenate([grid, np.broadcast_to(newline[:, None, None], grid.shape[:-1] + (1,))], axis=-1)
  grid = grid.reshape(grid.shape[0], -1).T
  return np.concatenate([base, grid], axis=0)


def hf_pack(features, image_hw, pinpoints, image_size, patch_size, newline, strategy="default"):
  """transformers' own `LlavaNextModel.pack_image_features`, called on a config alone (it uses only that)."""
  cfg = transformers.LlavaNextConfig(vision_config={"model_type": "clip_vision_model", "image_size": image_size,
                                                    "patch_size": patch_size}, image_grid_pinpoints=pinpoints)
  packed, _ = hf_next.LlavaNextModel.pack_image_features(
      types.SimpleNamespace(config=cfg), [torch.from_numpy(features)], torch.tensor([list(image_hw)]), strategy,
      image_newline=torch.from_numpy(newline))
  return packed[0].numpy()


def gather(features, newline, index):
  """What the model does with `feature_index`: the tile features, flattened, plus the newline as row -1."""
  flat = features.reshape(-1, features.shape[-1])
  return np.concatenate([flat, newline[None]], axis=0)[index]


# ---------------------------------------------------------------- geometry, transformers semantics

def test_geometry_equals_transformers_on_the_1_6_pinpoints():
  sizes = [(672, 672), (336, 336), (336, 672), (672, 336), (1008, 336), (336, 1008), (10, 10), (500, 40),
           (40, 500), (337, 1001), (2000, 7)] + random_sizes(400, 2500)
  for hw in sizes:
    assert anyres.select_best_resolution(hw, PINPOINTS_336) == hf_select_best_resolution(hw, PINPOINTS_336), hw
    rows, cols = hf_next.get_anyres_image_grid_shape(list(hw), PINPOINTS_336, 336)
    assert anyres.grid_shape(hw, PINPOINTS_336, 336) == (rows, cols), hw
    assert anyres.num_tiles(hw, PINPOINTS_336, 336) == hf_next.image_size_to_num_patches(list(hw), PINPOINTS_336, 336)
    unpadded = hf_next.unpad_image(torch.zeros(1, rows * 24, cols * 24), list(hw)).shape[1:]
    assert anyres.unpadded_grid(hw, PINPOINTS_336, 336, 24) == tuple(unpadded), hw


def test_token_counts_by_hand_on_the_1_6_pinpoints():
  # 672x672: the 2x2 grid, 48x48 features, nothing to unpad: 576 + 48 * 48 + 48 newlines.
  assert anyres.num_image_tokens((672, 672), PINPOINTS_336, 336, 24) == 576 + 48 * 48 + 48 == 2928
  # 336 high x 1008 wide: the 1x3 grid, 24x72, exact fit.
  assert anyres.num_image_tokens((336, 1008), PINPOINTS_336, 336, 24) == 576 + 24 * 72 + 24
  # 500 high x 40 wide: every canvas holds all 20,000 pixels, 672 high x 336 wide wastes the least (2x1 grid, a
  # 48x24 map); new width = 40 * 48 / 500 = 3.84 -> 3, padding (24 - 3) // 2 = 10 a side, 4 columns kept.
  assert anyres.select_best_resolution((500, 40), PINPOINTS_336) == (672, 336)
  assert anyres.unpadded_grid((500, 40), PINPOINTS_336, 336, 24) == (48, 4)
  assert anyres.num_image_tokens((500, 40), PINPOINTS_336, 336, 24) == 576 + 48 * 4 + 48 == 816
  assert anyres.num_image_tokens((336, 336), PINPOINTS_336, 336, 24, strategy="full") == 577 + 24 * 24 + 24
  assert anyres.max_tiles(PINPOINTS_336, 336) == 1 + 4  # the 2x2 grid of 672x672
  assert anyres.max_tiles(PINPOINTS_56, 56) == 5
  assert anyres.max_num_image_tokens(PINPOINTS_336, 336, 24) == 2928  # 48 * 48 + 48 beats 24 * 72 + 24


def test_semantics_differ_in_the_tie_break_and_the_unpad_rounding():
  # An image no larger than one tile keeps all its pixels on both 2-tile canvases: the first visited wins,
  # transformers reading [336, 672] as (height, width), the reference as (width, height).
  for hw in [(336, 336), (100, 300), (20, 20)]:
    assert anyres.select_best_resolution(hw, PINPOINTS_336, "hf") == (336, 672)
    assert anyres.select_best_resolution(hw, PINPOINTS_336, "original") == (672, 336)
    assert anyres.grid_shape(hw, PINPOINTS_336, 336, "original") == (2, 1)
  # 47 high x 1128 wide on the 1x3 grid (24x72): new height = 47 * 72 / 1128 = 3 exactly, but in floats
  assert 47 * (72 / 1128) < 3
  # so transformers rounds to 3 (padding (24 - 3) // 2 = 10, 4 rows kept) and the reference truncates to 2
  # (padding 11, 2 rows kept).
  assert anyres.unpadded_grid((47, 1128), PINPOINTS_336, 336, 24, "hf") == (4, 72)
  assert anyres.unpadded_grid((47, 1128), PINPOINTS_336, 336, 24, "original") == (2, 72)
  with pytest.raises(ValueError, match="semantics"):
    anyres.select_best_resolution((10, 10), PINPOINTS_336, "llava")
  with pytest.raises(ValueError, match="multiple of the tile"):
    anyres.grid_shape((10, 10), [[300, 600]], 336)


def test_geometry_equals_the_reference_with_original_semantics():
  for height, width in [(336, 336), (10, 10), (500, 40), (40, 500), (47, 1128), (672, 672)] + random_sizes(400, 2500):
    best_w, best_h = ref_select_best_resolution((width, height), PINPOINTS_336)
    assert anyres.select_best_resolution((height, width), PINPOINTS_336, "original") == (best_h, best_w)
    cols, rows = ref_get_anyres_image_grid_shape((width, height), PINPOINTS_336, 336)
    assert anyres.grid_shape((height, width), PINPOINTS_336, 336, "original") == (rows, cols)
    unpadded = ref_unpad_image(np.zeros((1, rows * 24, cols * 24)), (width, height)).shape[1:]
    assert anyres.unpadded_grid((height, width), PINPOINTS_336, 336, 24, "original") == unpadded


# ---------------------------------------------------------------- feature placement

@pytest.mark.parametrize("pinpoints,image_size,patch", [(PINPOINTS_336, 336, 14), (PINPOINTS_56, 56, 14)])
def test_feature_index_equals_transformers_pack_image_features(pinpoints, image_size, patch):
  pps = image_size // patch
  rng = np.random.default_rng(1)
  scale = image_size / 56
  sizes = [(max(1, int(h * scale)), max(1, int(w * scale))) for h, w in SIZES_56] + random_sizes(6, 1500, 2)
  for hw in sizes:
    n = anyres.num_tiles(hw, pinpoints, image_size)
    index = layout.feature_index(hw, pinpoints, image_size, pps)
    assert index.dtype == np.int32 and len(index) == anyres.num_image_tokens(hw, pinpoints, image_size, pps)
    # Features whose value is their own row: transformers' packing then spells out the index itself.
    ids = np.arange(n * pps * pps, dtype=np.float64).reshape(n, pps * pps, 1)
    packed = hf_pack(ids, hw, pinpoints, image_size, patch, np.array([-1.0]))
    np.testing.assert_array_equal(index, packed[:, 0].astype(np.int64), err_msg=str(hw))
    features = rng.standard_normal((n, pps * pps, 3))
    newline = rng.standard_normal(3)
    np.testing.assert_array_equal(gather(features, newline, index),
                                  hf_pack(features, hw, pinpoints, image_size, patch, newline))


def test_feature_index_equals_the_reference_spatial_unpad():
  rng = np.random.default_rng(3)
  for height, width in [(336, 336), (20, 20), (500, 40), (40, 500), (47, 1128), (337, 1001), (672, 672)]:
    n = anyres.num_tiles((height, width), PINPOINTS_336, 336, "original")
    features, newline = rng.standard_normal((n, 576, 2)), rng.standard_normal(2)
    expected = ref_spatial_unpad(features, (width, height), PINPOINTS_336, 336, 24, newline)
    index = layout.feature_index((height, width), PINPOINTS_336, 336, 24, semantics="original")
    assert len(index) == anyres.num_image_tokens((height, width), PINPOINTS_336, 336, 24, semantics="original")
    np.testing.assert_array_equal(gather(features, newline, index), expected, err_msg=str((height, width)))


def test_feature_index_with_the_full_strategy_keeps_the_base_cls_and_skips_grid_cls():
  index = layout.feature_index((56, 112), PINPOINTS_56, 56, 4, strategy="full")  # 1x2 grid, 4x8 map, no unpad
  per_tile = 17  # CLS + 16 patches
  np.testing.assert_array_equal(index[:per_tile], np.arange(per_tile))
  first_row = index[per_tile:per_tile + 9]
  np.testing.assert_array_equal(first_row, [18, 19, 20, 21, 35, 36, 37, 38, -1])  # tile 1 then tile 2, patches 0..3
  assert len(index) == 17 + 4 * 8 + 4


def test_geometry_reads_a_model_config():
  from llava_jax.config import LlavaConfig, VisionConfig

  cfg = LlavaConfig(vision=VisionConfig(image_size=56, patch_size=14, num_hidden_layers=2),
                    image_grid_pinpoints=PINPOINTS_56)
  geometry = layout.AnyresGeometry.from_config(cfg)
  assert (geometry.tile, geometry.patches_per_side, geometry.semantics, geometry.max_tiles) == (56, 4, "hf", 5)
  assert geometry.num_image_tokens((112, 112)) == 16 + 8 * 8 + 8
  assert layout.AnyresGeometry.from_config(cfg.replace(image_grid_pinpoints=None)) is None
  assert layout.AnyresGeometry.from_config(cfg.replace(image_grid_pinpoints=None), PINPOINTS_56).max_tiles == 5
  assert layout.AnyresGeometry.from_config(cfg.replace(anyres_semantics="original")).num_tiles((20, 20)) == 3


# ---------------------------------------------------------------- pixels

photographs, synthetic = hf_tiny.photographs, hf_tiny.random_images


def test_tiles_equal_llava_next_image_processor_pil():
  images = photographs() + synthetic(SIZES_56)
  hf = transformers.LlavaNextImageProcessorPil(**PROCESSOR_56)(images, return_tensors="np")
  config = ImageProcessorConfig.from_dict(PROCESSOR_56)
  for image, expected, hw in zip(images, hf["pixel_values"], hf["image_sizes"]):
    tiles = anyres.anyres_tiles(image, config, PINPOINTS_56)
    assert tiles.dtype == np.float32 and tiles.shape == (anyres.num_tiles(hw, PINPOINTS_56, 56), 56, 56, 3)
    np.testing.assert_allclose(tiles, expected[:len(tiles)].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert not expected[len(tiles):].any()


def test_tiles_equal_llava_next_image_processor_pil_at_336():
  images = photographs()[:2] + synthetic([(100, 700)])
  processor = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336})
  hf = processor(images, return_tensors="np")
  config = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}})
  for image, expected in zip(images, hf["pixel_values"]):
    tiles = anyres.anyres_tiles(image, config, PINPOINTS_336)
    np.testing.assert_allclose(tiles, expected[:len(tiles)].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_tiles_equal_the_reference_process_anyres_image():
  clip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
  config = ImageProcessorConfig.from_dict(PROCESSOR_56)
  for image in photographs() + synthetic([(20, 30), (56, 56), (500, 40), (40, 500), (57, 113), (56, 168)]):
    expected = ref_process_anyres_image(image, clip, PINPOINTS_56).transpose(0, 2, 3, 1)
    tiles = anyres.anyres_tiles(image, config, PINPOINTS_56, semantics="original")
    assert tiles.shape == expected.shape, image.size
    np.testing.assert_allclose(tiles, expected, atol=1e-5, rtol=0)


def test_canvas_pads_the_odd_pixel_right_and_bottom():
  # 5 high x 20 wide into 16 x 16: fitted to 4 high (ceil(5 * 0.8)) x 16, 12 rows of padding: 6 above, 6 below;
  # 20 high x 5 wide into 16 x 17: width ceil(5 * 0.8) = 4, 13 columns of padding: 6 left, 7 right.
  canvas = anyres.anyres_canvas(Image.new("RGB", (20, 5), (255, 255, 255)), (16, 16))
  assert np.flatnonzero(canvas[:, 8, 0]).tolist() == list(range(6, 10))
  canvas = anyres.anyres_canvas(Image.new("RGB", (5, 20), (255, 255, 255)), (16, 17))
  assert np.flatnonzero(canvas[8, :, 0]).tolist() == list(range(6, 10))
