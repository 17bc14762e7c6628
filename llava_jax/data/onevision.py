"""LLaVA-OneVision: the host side of its images and videos (pixels, token counts, and each token's feature taps).

OneVision tiles a single image as LLaVA-NeXT does (the base tile, then the grid of the best of 36 canvases), but
after the unpad it shrinks a grid map larger than 1.1^2 times nine tiles' area bilinearly to about nine tiles'
area ("anyres_max_9"); an image in a prompt of several images is padded to a square and takes its base tile only;
a video frame is one tile whose 27x27 features are pooled bilinearly to 14x14. Bilinear resizing is linear, so every
output feature is a weighted sum of at most four projected features: each token is described here by `TAPS` rows
and weights (`NEWLINE` in tap 0 for the newline), and the device does one fixed-shape weighted gather
(`ImageLayout.gather`) whatever the sizes. The weights are torch's `interpolate(mode="bilinear",
align_corners=False)` without antialias, which transformers' `LlavaOnevisionModel` applies. Pure numpy / PIL.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.anyres import (NEWLINE, anyres_canvas, base_size, grid_shape, select_best_resolution,
                                   unpadded_grid)
from llava_jax.data.image import ImageProcessorConfig, preprocess_image, to_rgb

TAPS = 4      # features one token mixes at most (bilinear: 2 x 2)
# OneVision's canvases: every (height, width) in {384, ..., 2304}^2, as its config lists them.
PINPOINTS_ONEVISION = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))


def max_grid_tiles(vision_aspect_ratio: str) -> int:
  """"anyres_max_9" -> 9: the grid area, in tiles, above which the grid map is shrunk."""
  prefix = "anyres_max_"
  if not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix):].isdigit():
    raise ValueError(f"vision_aspect_ratio must be 'anyres_max_<n>', got {vision_aspect_ratio!r}")
  return int(vision_aspect_ratio[len(prefix):])


# -- bilinear resizing as taps ------------------------------------------------------------------------------------


def bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(i0, i1, w0, w1), each [n_out]: output j = w0 * in[i0] + w1 * in[i1], as torch's bilinear kernel along one
  axis without align_corners: source = (j + 0.5) * n_in / n_out - 0.5, clamped at 0; floor and the next index,
  clamped at n_in - 1. As torch's CPU kernel computes them for float32 features: the scale in float32, the source
  index one fused multiply-add rounded to float32 (exact in float64 here), the weights in float32."""
  if n_in <= 0 or n_out <= 0:
    raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
  scale = np.float64(np.float32(n_in) / np.float32(n_out))
  src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def bilinear_taps(in_hw: Sequence[int], out_hw: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(rows int64 [out_h * out_w, 4], weights float32 [..., 4]): for each output position (row-major) the positions
  of the row-major input map it mixes and their weights (y0x0, y0x1, y1x0, y1x1)."""
  y0, y1, wy0, wy1 = bilinear_weights(in_hw[0], out_hw[0])
  x0, x1, wx0, wx1 = bilinear_weights(in_hw[1], out_hw[1])
  width = int(in_hw[1])
  rows = np.stack([y0[:, None] * width + x0, y0[:, None] * width + x1,
                   y1[:, None] * width + x0, y1[:, None] * width + x1], axis=-1)
  weights = np.stack([wy0[:, None] * wx0, wy0[:, None] * wx1, wy1[:, None] * wx0, wy1[:, None] * wx1], axis=-1)
  return rows.reshape(-1, TAPS), weights.reshape(-1, TAPS).astype(np.float32)


def identity_taps(rows) -> tuple[np.ndarray, np.ndarray]:
  """Tokens that take one row each: the row in every tap, weight 1 in tap 0 (0 elsewhere)."""
  rows = np.asarray(rows, np.int64).reshape(-1)
  weights = np.zeros((len(rows), TAPS), np.float32)
  weights[:, 0] = 1
  return np.repeat(rows[:, None], TAPS, axis=1), weights


def _with_newlines(rows, weights, height: int) -> tuple[np.ndarray, np.ndarray]:
  """A newline token after each of `height` map rows of the row-major taps."""
  rows, weights = rows.reshape(height, -1, TAPS), weights.reshape(height, -1, TAPS)
  nl_rows, nl_weights = identity_taps(np.full(height, NEWLINE))
  rows = np.concatenate([rows, nl_rows[:, None]], axis=1)
  weights = np.concatenate([weights, nl_weights[:, None]], axis=1)
  return rows.reshape(-1, TAPS), weights.reshape(-1, TAPS)


# -- a single image: base tile + the (shrunk) grid ----------------------------------------------------------------


def downsampled_grid(map_hw: Sequence[int], patches_per_side: int, max_tiles: int) -> tuple[int, int]:
  """The grid map's size after the "anyres_max" shrink: as it is unless sqrt(h * w / (max_tiles * pps^2)) > 1.1,
  else (int(h // ratio), int(w // ratio)). Float arithmetic as transformers' model and processor."""
  height, width = int(map_hw[0]), int(map_hw[1])
  ratio = math.sqrt(height * width / (max_tiles * patches_per_side**2))
  if ratio > 1.1:
    return int(height // ratio), int(width // ratio)
  return height, width


def image_grid(image_hw: Sequence[int], pinpoints, tile: int, patches_per_side: int,
               max_tiles: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """(unpadded map size, final map size) of a single image's grid features ("hf" semantics)."""
  unpadded = unpadded_grid(image_hw, pinpoints, tile, patches_per_side, "hf")
  return unpadded, downsampled_grid(unpadded, patches_per_side, max_tiles)


def num_image_tokens(image_hw: Sequence[int], pinpoints, tile: int, patches_per_side: int, max_tiles: int) -> int:
  """A single image's tokens: the base tile's pps^2 features + h * w map features + h newlines (the final map).

  Equals `LlavaOnevisionProcessor._get_number_of_features` (7,371 for a 2304x2304 image)."""
  _, (height, width) = image_grid(image_hw, pinpoints, tile, patches_per_side, max_tiles)
  return patches_per_side**2 + height * width + height


def max_num_image_tokens(pinpoints, tile: int, patches_per_side: int, max_tiles: int) -> int:
  """An upper bound of `num_image_tokens` over all image sizes: every map an unpad can leave of every canvas."""
  best = 0
  for canvas_h, canvas_w in pinpoints:
    full_h, full_w = canvas_h // tile * patches_per_side, canvas_w // tile * patches_per_side
    for map_hw in [(h, full_w) for h in range(1, full_h + 1)] + [(full_h, w) for w in range(1, full_w + 1)]:
      height, width = downsampled_grid(map_hw, patches_per_side, max_tiles)
      best = max(best, height * width + height)
  return patches_per_side**2 + best


def image_taps(image_hw: Sequence[int], pinpoints, tile: int, patches_per_side: int,
               max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows int32 [num_image_tokens, 4], weights float32 [..., 4]) of a single image, rows counted in its own
  tile-major features (tile 0 the base, k >= 1 grid tile k - 1 row-major; pps^2 features a tile, no CLS).

  Order as `LlavaOnevisionModel.pack_image_features`: the base tile's features; the grid tiles reassembled into a
  (rows * pps, cols * pps) map, cropped centred to the unpadded size, shrunk bilinearly if over the cap; a newline
  after each map row."""
  pps, per_tile = patches_per_side, patches_per_side**2
  rows, cols = grid_shape(image_hw, pinpoints, tile, "hf")
  tile_id = 1 + np.arange(rows)[:, None, None, None] * cols + np.arange(cols)[None, None, :, None]
  patch = np.arange(pps)[None, :, None, None] * pps + np.arange(pps)[None, None, None, :]
  feature_map = (tile_id * per_tile + patch).reshape(rows * pps, cols * pps)
  (new_h, new_w), out_hw = image_grid(image_hw, pinpoints, tile, pps, max_tiles)
  top, left = (rows * pps - new_h) // 2, (cols * pps - new_w) // 2
  cropped = feature_map[top:top + new_h, left:left + new_w].reshape(-1)
  if out_hw == (new_h, new_w):
    grid_rows, grid_weights = identity_taps(cropped)
  else:
    at, grid_weights = bilinear_taps((new_h, new_w), out_hw)
    grid_rows = cropped[at]
  grid_rows, grid_weights = _with_newlines(grid_rows, grid_weights, out_hw[0])
  base_rows, base_weights = identity_taps(np.arange(per_tile))
  return (np.concatenate([base_rows, grid_rows]).astype(np.int32),
          np.concatenate([base_weights, grid_weights]).astype(np.float32))


def base_only_taps(patches_per_side: int) -> tuple[np.ndarray, np.ndarray]:
  """An image in a prompt of several: its base tile's pps^2 features, then one newline."""
  return [a.astype(t) for a, t in zip(identity_taps(np.append(np.arange(patches_per_side**2), NEWLINE)),
                                      (np.int32, np.float32))]


# -- a video: each frame a tile, pooled -----------------------------------------------------------------------------


def pooled_side(patches_per_side: int) -> int:
  return math.ceil(patches_per_side / 2)


def num_video_tokens(frames: int, patches_per_side: int) -> int:
  """frames * ceil(pps / 2)^2 + one newline for the whole video (`LlavaOnevisionProcessor`'s video count)."""
  return frames * pooled_side(patches_per_side) ** 2 + 1


def video_taps(frames: int, patches_per_side: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows int32 [num_video_tokens, 4], weights) of a video whose frame f is tile f (pps^2 features): each frame's
  map pooled bilinearly to ceil(pps / 2) a side (`LlavaOnevisionModel.apply_pooling`), frame after frame, then one
  newline."""
  pps, side = patches_per_side, pooled_side(patches_per_side)
  at, weights = bilinear_taps((pps, pps), (side, side))
  rows = (np.arange(frames)[:, None, None] * pps * pps + at[None]).reshape(-1, TAPS)
  weights = np.tile(weights, (frames, 1))
  nl_rows, nl_weights = identity_taps([NEWLINE])
  return (np.concatenate([rows, nl_rows]).astype(np.int32),
          np.concatenate([weights, nl_weights]).astype(np.float32))


# -- pixels -------------------------------------------------------------------------------------------------------


def _plain(config: ImageProcessorConfig) -> ImageProcessorConfig:
  """The config resizing to exactly `size`, without a centre crop (OneVision's processor has none)."""
  height, width = base_size(config)
  return dataclasses.replace(config, shortest_edge=None, height=height, width=width, crop_height=height,
                             crop_width=width, do_center_crop=False)


def _normalised(piece, config: ImageProcessorConfig) -> np.ndarray:
  """Resize to `size` (the identity for a piece already of that size), rescale, normalise."""
  return preprocess_image(piece, _plain(config), aspect_ratio="crop")


def image_tiles(image, config: ImageProcessorConfig, pinpoints=PINPOINTS_ONEVISION) -> np.ndarray:
  """A single image -> float32 [n_tiles, H, W, 3] (NHWC): the base tile, then the grid row-major.

  Equals `LlavaOnevisionImageProcessorPil`'s pixel_values for an image alone in its prompt (its first n_tiles)."""
  image = to_rgb(image)
  tile, _ = base_size(config)
  canvas_hw = select_best_resolution((image.height, image.width), pinpoints, "hf")
  canvas = anyres_canvas(image, canvas_hw, config.resample)
  base_h, base_w = base_size(config)
  base = np.asarray(image.resize((base_w, base_h), resample=Image.Resampling(config.resample)))
  pieces = [base] + [canvas[r:r + tile, c:c + tile]
                     for r in range(0, canvas_hw[0], tile) for c in range(0, canvas_hw[1], tile)]
  return np.stack([_normalised(p, config) for p in pieces])


def base_only_tile(image, config: ImageProcessorConfig) -> np.ndarray:
  """An image in a prompt of several -> float32 [1, H, W, 3]: padded to a square of the mean colour
  (`int(m * 255)`), resized to `size`, normalised (the processor's multi-image path)."""
  return preprocess_image(image, _plain(config), aspect_ratio="pad")[None]


def video_frames(frames, config: ImageProcessorConfig) -> np.ndarray:
  """Frames (uint8 [F, h, w, 3] or PIL images) -> float32 [F, H, W, 3]: each resized to `size` (PIL bicubic,
  antialiased) and normalised, as the video processor's published steps (torchvision's resize there differs from
  PIL's by rounding only)."""
  return np.stack([_normalised(frame, config) for frame in frames])
