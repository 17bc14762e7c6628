"""LLaVA-NeXT (1.6) "anyres": tiles of a high-resolution image, and where each tile feature goes.

An image is fitted into the best of a few canvases ("pinpoints", e.g. 672x672 or 336x1008),
resized keeping its aspect ratio, pasted centred on black, and cut row-major into square tiles
of the vision tower's size; the whole image resized to one tile comes first (the base tile).
The model encodes every tile, reassembles the grid tiles' features into one map, crops the
map back to the image's aspect ratio ("unpad"), appends an `image_newline` vector after every
row and flattens it after the base tile's features. The variable part of that, which depends
only on the image size, is computed on the host, so that the device does fixed-shape work: the
geometry (canvas, grid, unpadded map, token counts) is here, and where each feature goes (the
feature rows, the newline) is `data/layout.py`'s `AnyresLayout`.

Two semantics, which differ only for some sizes:

  "hf"        transformers' `llava_next` (the llava-hf checkpoints, our parity oracle): pinpoint
              pairs are (height, width); unpad rounds with `int(round(x, 7))`.
  "original"  the reference LLaVA's `mm_utils.py` / `llava_arch.py`: the same pairs are read as
              (width, height), which changes the tie-break for images no larger than a tile (the
              1.6 list then picks 336 wide x 672 high first, transformers 672 wide x 336 high),
              and unpad truncates with `int()`.

`pinpoints` is always the checkpoint's literal list (`image_grid_pinpoints` of its config);
image sizes here are always (height, width). Pure numpy / PIL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.image import ImageProcessorConfig, preprocess_image, to_rgb

SEMANTICS = ("hf", "original")
# The feature row of a token that takes the `image_newline` vector (`data/layout.py` resolves it to a real row).
NEWLINE = -1


def check_semantics(semantics: str) -> None:
  if semantics not in SEMANTICS:
    raise ValueError(f"anyres semantics must be one of {SEMANTICS}, got {semantics!r}")


def canvases(pinpoints: Sequence[Sequence[int]], semantics: str = "hf") -> list[tuple[int, int]]:
  """The candidate canvases as (height, width), in the order the selection visits them."""
  check_semantics(semantics)
  if not pinpoints:
    raise ValueError("image_grid_pinpoints is empty")
  pairs = [(int(a), int(b)) for a, b in pinpoints]
  return pairs if semantics == "hf" else [(b, a) for a, b in pairs]


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]],
                           semantics: str = "hf") -> tuple[int, int]:
  """The canvas (height, width) that keeps the most of the image's pixels, then wastes the least.

  For each canvas, scale = min(W / w, H / h); effective = min(int(w * s) * int(h * s), w * h);
  wasted = W * H - effective. Ties keep the first canvas visited (see `canvases`).
  """
  height, width = int(image_hw[0]), int(image_hw[1])
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {(height, width)}")
  best, best_effective, best_wasted = None, 0, float("inf")
  for canvas_h, canvas_w in canvases(pinpoints, semantics):
    scale = min(canvas_w / width, canvas_h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = canvas_w * canvas_h - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (canvas_h, canvas_w), effective, wasted
  return best


def fitted_size(image_hw: Sequence[int], canvas_hw: Sequence[int]) -> tuple[int, int]:
  """(height, width) of the image resized into the canvas keeping its aspect ratio (ceil, capped)."""
  height, width = int(image_hw[0]), int(image_hw[1])
  canvas_h, canvas_w = int(canvas_hw[0]), int(canvas_hw[1])
  scale_w, scale_h = canvas_w / width, canvas_h / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), canvas_h), canvas_w
  return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def _check_tiles(canvas_hw: tuple[int, int], tile: int) -> None:
  if canvas_hw[0] % tile or canvas_hw[1] % tile:
    raise ValueError(f"pinpoint {canvas_hw} is not a multiple of the tile size {tile}")


def grid_shape(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int,
               semantics: str = "hf") -> tuple[int, int]:
  """(rows, cols) of grid tiles: the best canvas divided by the tile size."""
  canvas = select_best_resolution(image_hw, pinpoints, semantics)
  _check_tiles(canvas, tile)
  return canvas[0] // tile, canvas[1] // tile


def num_tiles(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int,
              semantics: str = "hf") -> int:
  """Tiles this image needs: the base tile + rows * cols grid tiles."""
  rows, cols = grid_shape(image_hw, pinpoints, tile, semantics)
  return 1 + rows * cols


def max_tiles(pinpoints: Sequence[Sequence[int]], tile: int) -> int:
  """1 + the largest grid over the pinpoints: the tile slots a static-shape pipeline pads every image to."""
  best = 0
  for canvas in canvases(pinpoints):
    _check_tiles(canvas, tile)
    best = max(best, (canvas[0] // tile) * (canvas[1] // tile))
  return 1 + best


def anyres_canvas(image, canvas_hw: Sequence[int], resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
  """uint8 [H, W, 3]: the image resized into the canvas keeping its aspect ratio, centred on black.

  An odd pixel of padding goes right / bottom: paste offset = (canvas - fitted) // 2, as both
  transformers' `_pad_for_patching` and the reference's `resize_and_pad_image` place it.
  """
  image = to_rgb(image)
  canvas_h, canvas_w = int(canvas_hw[0]), int(canvas_hw[1])
  new_h, new_w = fitted_size((image.height, image.width), (canvas_h, canvas_w))
  resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling(resample)))
  out = np.zeros((canvas_h, canvas_w, 3), np.uint8)
  top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
  out[top:top + new_h, left:left + new_w] = resized
  return out


def base_size(config: ImageProcessorConfig) -> tuple[int, int]:
  """(height, width) the whole image is resized to for the base tile (`size`, squared if shortest_edge)."""
  if config.shortest_edge is None:
    return config.height, config.width
  return config.shortest_edge, config.shortest_edge


def anyres_tiles(image, image_config: ImageProcessorConfig, pinpoints: Sequence[Sequence[int]],
                 semantics: str = "hf") -> np.ndarray:
  """One image -> float32 [n_tiles, H, W, 3] (NHWC, CLIP-normalised), base tile first, then the grid row-major.

  Equals `LlavaNextImageProcessorPil`'s pixel_values for this image (its first n_tiles, NCHW there)
  and, with semantics="original", the reference's `process_anyres_image`. The tile size is the
  processor's crop height; every tile then goes through CLIP preprocessing (resize, centre crop,
  rescale, normalise), which is the identity on pixels when size == crop == tile.
  """
  image = to_rgb(image)
  tile = image_config.crop_height
  canvas_hw = select_best_resolution((image.height, image.width), pinpoints, semantics)
  _check_tiles(canvas_hw, tile)
  canvas = anyres_canvas(image, canvas_hw, image_config.resample)
  base_h, base_w = base_size(image_config)
  base = np.asarray(image.resize((base_w, base_h), resample=Image.Resampling(image_config.resample)))
  pieces = [base] + [canvas[r:r + tile, c:c + tile]
                     for r in range(0, canvas_hw[0], tile) for c in range(0, canvas_hw[1], tile)]
  return np.stack([preprocess_image(p, image_config, aspect_ratio="crop") for p in pieces])


def unpadded_grid(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                  semantics: str = "hf") -> tuple[int, int]:
  """(rows, cols) of the grid feature map after unpad, in features.

  The map is (grid rows * patches_per_side, grid cols * patches_per_side); the side that the
  image's aspect ratio leaves padded loses `(current - new) // 2` features at each end, with
  new = h * (W / w) rounded as transformers does (`int(round(x, 7))`) or as the reference (`int()`).
  """
  height, width = int(image_hw[0]), int(image_hw[1])
  rows, cols = grid_shape(image_hw, pinpoints, tile, semantics)
  current_h, current_w = rows * patches_per_side, cols * patches_per_side
  to_int = (lambda x: int(round(x, 7))) if semantics == "hf" else int
  if width / height > current_w / current_h:
    new_h = to_int(height * (current_w / width))
    current_h -= 2 * ((current_h - new_h) // 2)
  else:
    new_w = to_int(width * (current_h / height))
    current_w -= 2 * ((current_w - new_w) // 2)
  return current_h, current_w


def tile_features(patches_per_side: int, strategy: str) -> tuple[int, int]:
  """(features per tile, offset of patch 0 among them) for the vision feature select strategy."""
  pp = patches_per_side * patches_per_side
  if strategy == "default":  # CLS dropped
    return pp, 0
  if strategy == "full":  # CLS kept, first
    return pp + 1, 1
  raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")


def num_image_tokens(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                     strategy: str = "default", semantics: str = "hf") -> int:
  """Image tokens of one image: the base tile's features + h' * w' unpadded grid features + h' newlines.

  Equals what `LlavaNextProcessor` expands "<image>" to (2,928 for a 672x672 image at 336 px).
  """
  per_tile, _ = tile_features(patches_per_side, strategy)
  rows, cols = unpadded_grid(image_hw, pinpoints, tile, patches_per_side, semantics)
  return per_tile + rows * cols + rows


def max_num_image_tokens(pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                         strategy: str = "default") -> int:
  """An upper bound of `num_image_tokens` over all image sizes (reached by an image of a pinpoint's shape)."""
  per_tile, _ = tile_features(patches_per_side, strategy)
  best = 0
  for canvas in canvases(pinpoints):
    _check_tiles(canvas, tile)
    rows, cols = canvas[0] // tile * patches_per_side, canvas[1] // tile * patches_per_side
    best = max(best, rows * cols + rows)
  return per_tile + best
