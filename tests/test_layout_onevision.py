"""The OneVision layout against transformers' llava_onevision: token counts against the processor's own count
functions, each token's taps against `pack_image_features` and `apply_pooling` run on stand-in features, the
bilinear weights against torch's `interpolate`, and the pixels against `LlavaOnevisionImageProcessorPil`."""

import functools
import math
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov
from transformers.models.llava_onevision import processing_llava_onevision as hf_proc

import hf_tiny
from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.data import onevision
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.data.layout import NEWLINE, AnyresLayout, OneVisionLayout, layout_for

PINPOINTS = [list(p) for p in onevision.PINPOINTS_ONEVISION]
LAYOUT = OneVisionLayout(onevision.PINPOINTS_ONEVISION, tile=384, patches_per_side=27)
PPS, DIM = 27, 3
# 1x1-tile, extreme aspect ratios, large; the cap's both sides are found below.
SIZES = [(2304, 2304), (384, 384), (1, 1), (20, 30), (100, 2000), (2000, 100), (1000, 1300), (3000, 500),
         (768, 1536), (5000, 4000), (385, 383), (1152, 1152)]


def _stub_model():
  """What `LlavaOnevisionModel`'s packing and pooling read of `self`: SigLIP's 384 px, 14 px patches (27 a side)."""
  vision = types.SimpleNamespace(image_size=384, patch_size=14)
  return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision, image_grid_pinpoints=PINPOINTS))


def _stub_processor():
  stub = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=PINPOINTS),
                               num_image_tokens=PPS * PPS, vision_aspect_ratio="anyres_max_9")
  stub._get_unpadded_features = functools.partial(hf_proc.LlavaOnevisionProcessor._get_unpadded_features, stub)
  return stub


def _hf_pack(features, hw, base_only=False):
  """transformers' packing of one image's tile features [n_tiles, pps^2, D] (just the base tile: an image in a
  prompt of several)."""
  with torch.no_grad():
    packed, lens = hf_ov.LlavaOnevisionModel.pack_image_features(
        _stub_model(), [torch.from_numpy(features[:1] if base_only else features)], torch.tensor([hw]),
        image_newline=torch.from_numpy(NEWLINE_VECTOR), vision_aspect_ratio="anyres_max_9")
  assert int(lens[0]) == len(packed[0])
  return packed[0].numpy()


NEWLINE_VECTOR = np.float32([-7.0, 3.5, 0.25])


def _ours(layout, features, rows, weights):
  """Our weighted gather of one slot's features [n_tiles, pps^2, D], its rows placed as slot 0 of 1."""
  rows = layout.slot_rows(rows, 0, 1, tiles=len(features))
  return layout.gather(features.reshape(1, -1, DIM), NEWLINE_VECTOR, rows[None], weights=weights[None])[0]


def _features(tiles, seed=0):
  return np.random.default_rng(seed).standard_normal((tiles, PPS * PPS, DIM)).astype(np.float32)


def _cap_sizes():
  """An image whose unpadded map is over nine tiles' area but within the 1.1 soft cap, and one just over it."""
  under = over = None
  for w in range(1200, 1600, 7):
    hw = (1000, w)
    (h_, w_), out = onevision.image_grid(hw, PINPOINTS, 384, PPS, 9)
    area = h_ * w_
    if under is None and 9 * PPS**2 < area <= 1.21 * 9 * PPS**2:
      assert out == (h_, w_)
      under = hw
    if over is None and area > 1.21 * 9 * PPS**2 and area < 1.5 * 9 * PPS**2:
      assert out != (h_, w_)
      over = hw
  assert under and over
  return [under, over]


# ---------------------------------------------------------------- bilinear weights


@pytest.mark.parametrize("in_hw,out_hw", [((162, 162), (81, 81)), ((40, 40), (29, 29)), ((27, 27), (14, 14)),
                                          ((40, 97), (23, 57)), ((108, 81), (91, 68)), ((7, 3), (5, 2))])
def test_bilinear_taps_equal_torch_interpolate(in_hw, out_hw):
  x = torch.randn(1, 4, *in_hw, generator=torch.Generator().manual_seed(1))
  expected = torch.nn.functional.interpolate(x, list(out_hw), mode="bilinear")[0].reshape(4, -1).T.numpy()
  rows, weights = onevision.bilinear_taps(in_hw, out_hw)
  flat = x[0].reshape(4, -1).T.numpy()
  np.testing.assert_allclose((flat[rows] * weights[..., None]).sum(1), expected, atol=1e-6, rtol=0)


def test_bilinear_weights_are_torchs_exactly():
  """One-hot inputs give torch's own weights: ours are the same floats, over many sizes."""
  for n_in in range(2, 60, 5):
    for n_out in range(1, n_in):
      eye = torch.eye(n_in).reshape(n_in, 1, n_in, 1)
      torch_w = torch.nn.functional.interpolate(eye, [n_out, 1], mode="bilinear")[:, 0, :, 0].numpy()
      i0, i1, w0, w1 = onevision.bilinear_weights(n_in, n_out)
      ours = np.zeros((n_in, n_out), np.float32)
      np.add.at(ours, (i0, np.arange(n_out)), w0)
      np.add.at(ours, (i1, np.arange(n_out)), w1)
      np.testing.assert_array_equal(ours, torch_w)


# ---------------------------------------------------------------- counts and taps


@pytest.mark.parametrize("hw", SIZES + _cap_sizes())
def test_image_tokens_equal_pack_image_features(hw):
  n_tiles = LAYOUT.num_tiles(hw)
  features = _features(n_tiles)
  expected = _hf_pack(features, hw)
  proc = hf_proc.LlavaOnevisionProcessor._get_number_of_features(_stub_processor(), *hw, 384, 384)
  assert LAYOUT.num_image_tokens(hw) == len(expected) == proc
  rows, weights = LAYOUT.image_taps(hw)
  assert rows.shape == weights.shape == (len(expected), 4) and rows.max() < n_tiles * PPS * PPS
  np.testing.assert_allclose(_ours(LAYOUT, features, rows, weights), expected, atol=1e-5, rtol=0)
  assert LAYOUT.num_image_tokens(hw) <= LAYOUT.max_num_image_tokens


def test_the_largest_image_is_shrunk_to_81_by_81():
  assert onevision.image_grid((2304, 2304), PINPOINTS, 384, PPS, 9) == ((162, 162), (81, 81))
  assert LAYOUT.num_image_tokens((2304, 2304)) == 729 + 81 * 81 + 81 == 7371
  assert LAYOUT.max_tiles == 37
  rows, weights = LAYOUT.image_taps((384, 384))  # 1x1 grid: 27x27, one tap each
  assert LAYOUT.num_image_tokens((384, 384)) == 729 + 27 * 28
  assert (weights[:, 1:] == 0).all() and (weights[:, 0] == 1).all()


def test_image_in_a_multi_image_prompt_takes_its_base_tile():
  features = _features(1)
  expected = _hf_pack(features, (500, 900), base_only=True)
  assert len(expected) == LAYOUT.num_image_tokens((500, 900), base_only=True) == 730
  assert LAYOUT.num_tiles((500, 900), base_only=True) == 1
  rows, weights = LAYOUT.image_taps((500, 900), base_only=True)
  assert rows[-1, 0] == NEWLINE
  np.testing.assert_allclose(_ours(LAYOUT, features, rows, weights), expected, atol=0, rtol=0)


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_video_tokens_equal_apply_pooling(frames):
  features = _features(frames, seed=frames)
  with torch.no_grad():
    pooled = hf_ov.LlavaOnevisionModel.apply_pooling(_stub_model(), torch.from_numpy(features))
  expected = np.concatenate([pooled.numpy().reshape(-1, DIM), NEWLINE_VECTOR[None]])  # get_video_features' order
  counts = hf_proc.LlavaOnevisionProcessor._get_num_multimodal_tokens(
      _stub_processor(), video_sizes=[(frames, 384, 384)])["num_video_tokens"]
  assert LAYOUT.num_video_tokens(frames) == len(expected) == frames * 196 + 1 == counts[0]
  rows, weights = LAYOUT.video_taps(frames)
  np.testing.assert_allclose(_ours(LAYOUT, features, rows, weights), expected, atol=1e-6, rtol=0)


def test_a_batch_of_images_gathers_each_in_its_slot():
  """Token rows and weights of a batch (one image alone, two sharing a prompt), placed in slots of 37 tiles,
  row-local renumbering and blank slots too: each image's tokens equal its own packing."""
  sizes, base_only = [(900, 1700), (300, 200), (2304, 600)], [False, True, True]
  counts = [LAYOUT.num_image_tokens(hw, only) for hw, only in zip(sizes, base_only)]
  input_ids = np.zeros((2, max(counts[0], counts[1] + counts[2]) + 3), np.int64)
  input_ids[0, 1:1 + counts[0]] = 9
  input_ids[1, 2:2 + counts[1] + counts[2]] = 9
  rows = LAYOUT.token_rows(input_ids, 9, sizes, base_only=base_only)
  weights = LAYOUT.token_weights(input_ids, 9, sizes, base_only=base_only)
  assert rows.shape == weights.shape == input_ids.shape + (4,)
  tiles = LAYOUT.max_tiles
  features = np.zeros((3, tiles, PPS * PPS, DIM), np.float32)
  expected = []
  for slot, (hw, only) in enumerate(zip(sizes, base_only)):
    own = _features(LAYOUT.num_tiles(hw, only), seed=slot)
    features[slot, :len(own)] = own
    expected.append(_hf_pack(own, hw, base_only=only))
  # batch-wide: one group over all slots, then with a blank fourth slot
  out = LAYOUT.gather(features.reshape(1, -1, DIM), NEWLINE_VECTOR, rows.reshape(1, -1, 4),
                      weights=weights.reshape(1, -1, 4))[0].reshape(*input_ids.shape, DIM)
  is_image = input_ids == 9
  got = out[is_image]
  np.testing.assert_allclose(got, np.concatenate(expected), atol=1e-5, rtol=0)
  blank = LAYOUT.with_blank_slots(rows, is_image, 3, 4)
  padded = np.concatenate([features, np.zeros_like(features[:1])]).reshape(1, -1, DIM)
  out = LAYOUT.gather(padded, NEWLINE_VECTOR, blank.reshape(1, -1, 4), weights=weights.reshape(1, -1, 4))[0]
  np.testing.assert_allclose(out.reshape(*input_ids.shape, DIM)[is_image], got, atol=1e-6, rtol=0)


def test_row_local_rows_with_taps():
  """Row b's rows renumbered within the row: newline and taps alike (each row one slot, as the train step)."""
  sizes = [(900, 1700), (300, 2000)]
  counts = [LAYOUT.num_image_tokens(hw) for hw in sizes]
  input_ids = np.zeros((2, max(counts)), np.int64)
  for b, n in enumerate(counts):
    input_ids[b, :n] = 9
  rows = LAYOUT.token_rows(input_ids, 9, sizes)
  local = LAYOUT.row_local_rows(rows, LAYOUT.max_tiles, host_rows=2)
  for b, hw in enumerate(sizes):
    own = LAYOUT.slot_rows(LAYOUT.feature_index(hw), 0, 1)
    np.testing.assert_array_equal(local[b, :counts[b]], own)


def test_one_tap_families_keep_their_rows_and_no_weights():
  anyres = AnyresLayout([[56, 112], [112, 112]], tile=56, patches_per_side=4)
  assert anyres.taps == 1 and anyres.batch_weights([(60, 100)]) is None
  assert anyres.token_weights(np.full((1, anyres.num_image_tokens((60, 100))), 5), 5, [(60, 100)]) is None
  features = np.arange(40, dtype=np.float32).reshape(1, 20, 2)
  rows = np.int32([[3, 19, 20, 0]])
  taps = np.repeat(rows[..., None], 4, axis=-1)
  plain = anyres.gather(features, np.float32([-1, -2]), rows)
  np.testing.assert_array_equal(anyres.gather(features, np.float32([-1, -2]), taps), plain)
  one = np.zeros(taps.shape, np.float32)
  one[..., 0] = 1
  np.testing.assert_array_equal(LAYOUT.gather(features, np.float32([-1, -2]), taps, weights=one), plain)


def test_layout_is_picked_from_a_onevision_config():
  vision = VisionConfig(image_size=384, patch_size=14, num_hidden_layers=2)
  cfg = LlavaConfig(vision=vision, image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full",
                    vision_aspect_ratio="anyres_max_9", image_token_index=151646, video_token_index=151647)
  layout = layout_for(cfg)
  assert isinstance(layout, OneVisionLayout) and layout.places_features and cfg.is_onevision and cfg.is_next
  assert (layout.patches_per_side, layout.max_grid_tiles, layout.tile_features) == (27, 9, 729)
  assert not LlavaConfig(vision=vision).is_onevision
  with pytest.raises(ValueError, match="anyres_max"):
    LlavaConfig(vision=vision, vision_aspect_ratio="anyres")


# ---------------------------------------------------------------- pixels

OV_PROCESSOR = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
OV_CONFIG = ImageProcessorConfig.from_dict(OV_PROCESSOR)
SMALL = dict(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
             image_grid_pinpoints=[[h, w] for h in range(64, 385, 64) for w in range(64, 385, 64)])
SMALL_CONFIG = ImageProcessorConfig.from_dict(SMALL)


def _hf_tiles(processor_kw, images):
  out = transformers.LlavaOnevisionImageProcessorPil(**processor_kw)(images, return_tensors="np")
  return out["pixel_values"], out["image_sizes"]


def test_single_image_tiles_equal_the_image_processor():
  images = hf_tiny.photographs() + hf_tiny.random_images([(1, 1), (20, 30), (64, 64), (500, 40), (40, 500),
                                                          (70, 390), (400, 400), (999, 1001), (65, 63)])
  pinpoints = SMALL["image_grid_pinpoints"]
  for image in images:
    pixels, sizes = _hf_tiles(SMALL, [image])
    tiles = onevision.image_tiles(image, SMALL_CONFIG, pinpoints)
    assert tuple(sizes[0]) == (image.height, image.width)
    assert len(tiles) == OneVisionLayout(pinpoints, 64, 4).num_tiles(sizes[0]) == len(pixels[0])
    np.testing.assert_allclose(tiles, pixels[0].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_single_image_tiles_at_384():
  for image in hf_tiny.random_images([(2304, 2304), (300, 1200)])[:2] + hf_tiny.photographs()[:1]:
    pixels, _ = _hf_tiles(OV_PROCESSOR, [image])
    tiles = LAYOUT.tiles(image, OV_CONFIG)
    np.testing.assert_allclose(tiles, pixels[0].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_multi_image_base_tiles_equal_the_image_processor():
  images = hf_tiny.photographs()[:2] + hf_tiny.random_images([(30, 90), (90, 30), (64, 64)])
  pixels, sizes = _hf_tiles(SMALL, [images])  # one prompt of several images
  for image, expected, hw in zip(images, pixels, sizes):
    assert tuple(hw) == (image.height, image.width)
    tile = onevision.base_only_tile(image, SMALL_CONFIG)
    np.testing.assert_allclose(tile, expected[:1].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert not expected[1:].any()
  assert tuple(int(x * 255) for x in SMALL["image_mean"]) == (127, 127, 127)


def test_video_frames_are_resized_and_normalised():
  """The video processor's steps (resize to size, bicubic, antialiased; rescale; normalise) restated with PIL and
  numpy, and the image processor's base tile of each frame, which is the same."""
  frames = np.random.default_rng(3).integers(0, 256, (3, 90, 120, 3), dtype=np.uint8)
  ours = onevision.video_frames(frames, SMALL_CONFIG)
  restated = np.stack([(np.asarray(Image.fromarray(f).resize((64, 64), Image.Resampling.BICUBIC), np.float32)
                        / 255 - 0.5) / 0.5 for f in frames])
  np.testing.assert_allclose(ours, restated, atol=1e-5, rtol=0)
  pixels, _ = _hf_tiles(SMALL, [Image.fromarray(f) for f in frames])
  np.testing.assert_allclose(ours, pixels[:, 0].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
  assert math.ceil(27 / 2) ** 2 == 196


def test_model_splice_mixes_the_taps():
  """`Llava.__call__` from image_sizes: the weights computed beside the rows, each token the weighted sum of its
  tiles' projected features (a CLIP stand-in for SigLIP, CLS dropped; a 2x2 grid shrunk under anyres_max_1)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from llava_jax.config import TextConfig  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import Llava  # pylint: disable=import-outside-toplevel

  vision = VisionConfig(image_size=56, patch_size=14, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                        num_attention_heads=2)
  text = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=8)
  cfg = LlavaConfig(vision=vision, text=text, image_token_index=60, vision_feature_layer=-1,
                    image_grid_pinpoints=[[56, 56], [56, 112], [112, 112]], vision_aspect_ratio="anyres_max_1")
  layout, model = layout_for(cfg), Llava(cfg)
  hw = (100, 110)
  assert layout.num_tiles(hw) == 5 and onevision.image_grid(hw, cfg.image_grid_pinpoints, 56, 4, 1)[1] != (8, 8)
  n = layout.num_image_tokens(hw)
  input_ids = jnp.asarray(np.concatenate([[1, 2], np.full(n, 60), [3]])[None])
  pixels = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 56, 56, 3)), jnp.float32)
  rows_weights = dict(image_feature_rows=jnp.asarray(layout.token_rows(input_ids, 60, [hw])),
                      image_feature_weights=jnp.asarray(layout.token_weights(input_ids, 60, [hw])))
  embeds = model.embed(input_ids, pixels, **rows_weights)
  features = np.asarray(model.image_features(pixels[0])).reshape(-1, 16)
  rows, weights = layout.image_taps(hw)
  flat = np.concatenate([features, np.asarray(model.image_newline[...])[None]])
  expected = (flat[np.where(rows == NEWLINE, len(features), rows)] * weights[..., None]).sum(1)
  np.testing.assert_allclose(np.asarray(embeds[0, 2:2 + n]), expected, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(model(input_ids, pixels, image_sizes=jnp.asarray([hw]))),
                                np.asarray(model(input_ids, pixels, **rows_weights)))
