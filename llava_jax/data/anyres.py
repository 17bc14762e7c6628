"""LLaVA-NeXT (1.6) "anyres": tiles of a high-resolution image, and where each tile feature goes.

An image is fitted into the best of a few canvases ("pinpoints", e.g. 672x672 or 336x1008),
resized keeping its aspect ratio, pasted centred on black, and cut row-major into square tiles
of the vision tower's size; the whole image resized to one tile comes first (the base tile).
The model encodes every tile, reassembles the grid tiles' features into one map, crops the
map back to the image's aspect ratio ("unpad"), appends an `image_newline` vector after every
row and flattens it after the base tile's features. The variable part of that, which depends
only on the image size, is computed here on the host, so that the device does fixed-shape work:
`feature_index` says, for each image-token position, which tile feature (or the newline) goes
there.

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

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.image import ImageProcessorConfig, preprocess_image, to_rgb

SEMANTICS = ("hf", "original")
NEWLINE = -1  # `feature_index` value of a position that takes the `image_newline` vector


def _check_semantics(semantics: str) -> None:
  if semantics not in SEMANTICS:
    raise ValueError(f"anyres semantics must be one of {SEMANTICS}, got {semantics!r}")


def canvases(pinpoints: Sequence[Sequence[int]], semantics: str = "hf") -> list[tuple[int, int]]:
  """The candidate canvases as (height, width), in the order the selection visits them."""
  _check_semantics(semantics)
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


def _base_size(config: ImageProcessorConfig) -> tuple[int, int]:
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
  base_h, base_w = _base_size(image_config)
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


def _tile_features(patches_per_side: int, strategy: str) -> tuple[int, int]:
  """(features per tile, offset of patch 0) for the vision feature select strategy."""
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
  per_tile, _ = _tile_features(patches_per_side, strategy)
  rows, cols = unpadded_grid(image_hw, pinpoints, tile, patches_per_side, semantics)
  return per_tile + rows * cols + rows


def max_num_image_tokens(pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                         strategy: str = "default") -> int:
  """An upper bound of `num_image_tokens` over all image sizes (reached by an image of a pinpoint's shape)."""
  per_tile, _ = _tile_features(patches_per_side, strategy)
  best = 0
  for canvas in canvases(pinpoints):
    _check_tiles(canvas, tile)
    rows, cols = canvas[0] // tile * patches_per_side, canvas[1] // tile * patches_per_side
    best = max(best, rows * cols + rows)
  return per_tile + best


def feature_index(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                  strategy: str = "default", semantics: str = "hf") -> np.ndarray:
  """int32 [num_image_tokens]: for each image-token position, the row of this image's features, or -1.

  The features are tile-major, flattened: `[n_tiles * per_tile, D]`, tile 0 the base tile, tile
  k >= 1 grid tile k - 1 (row-major), row k * per_tile + j patch j of tile k (per_tile =
  patches_per_side**2, + 1 for a leading CLS with strategy "full"). -1 marks where the
  `image_newline` vector goes, so the model gathers `concatenate([features, newline[None]])[index]`.

  Order as transformers' `pack_image_features`: the base tile's features as they are (CLS
  included with "full"), then the grid tiles' patches reassembled into a (rows * pps, cols * pps)
  map (tile (r, c) patch (i, j) at (r * pps + i, c * pps + j)), the map cropped centred to
  `unpadded_grid`, a newline after each row, row by row. With "full" the grid tiles' CLS features
  are left out: transformers' `view` of such features into the map is not meaningful (and the
  reference asserts on it), so only the count there is a contract.
  """
  pps = patches_per_side
  per_tile, offset = _tile_features(pps, strategy)
  rows, cols = grid_shape(image_hw, pinpoints, tile, semantics)
  # feature_map[y, x] = row of the feature at map position (y, x)
  tile_id = 1 + np.arange(rows)[:, None, None, None] * cols + np.arange(cols)[None, None, :, None]
  patch = np.arange(pps)[None, :, None, None] * pps + np.arange(pps)[None, None, None, :]
  feature_map = (tile_id * per_tile + offset + patch).reshape(rows * pps, cols * pps)
  new_h, new_w = unpadded_grid(image_hw, pinpoints, tile, pps, semantics)
  top, left = (rows * pps - new_h) // 2, (cols * pps - new_w) // 2
  cropped = feature_map[top:top + new_h, left:left + new_w]
  with_newlines = np.concatenate([cropped, np.full((new_h, 1), NEWLINE, cropped.dtype)], axis=1)
  return np.concatenate([np.arange(per_tile), with_newlines.reshape(-1)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class AnyresGeometry:
  """The anyres settings of one model, so callers pass an image size only.

  `from_config` reads a `LlavaConfig` (`image_grid_pinpoints`, `anyres_semantics`,
  `vision.image_size`, `vision.patch_size`, `vision_feature_select_strategy`).
  """
  pinpoints: tuple[tuple[int, int], ...]
  tile: int
  patches_per_side: int
  strategy: str = "default"
  semantics: str = "hf"

  def __post_init__(self):
    object.__setattr__(self, "pinpoints", tuple((int(a), int(b)) for a, b in self.pinpoints))
    _check_semantics(self.semantics)
    _tile_features(self.patches_per_side, self.strategy)
    max_tiles(self.pinpoints, self.tile)  # every pinpoint a multiple of the tile

  @classmethod
  def from_config(cls, cfg, pinpoints=None) -> AnyresGeometry | None:
    """A `LlavaConfig`'s anyres settings (`pinpoints` overrides its `image_grid_pinpoints`); None when there are
    no pinpoints (LLaVA-1.5)."""
    pinpoints = pinpoints or cfg.image_grid_pinpoints
    if not pinpoints:
      return None
    vision = cfg.vision
    return cls(pinpoints=pinpoints, tile=vision.image_size, patches_per_side=vision.image_size // vision.patch_size,
               strategy=cfg.vision_feature_select_strategy, semantics=cfg.anyres_semantics)

  @property
  def max_tiles(self) -> int:
    return max_tiles(self.pinpoints, self.tile)

  @property
  def max_num_image_tokens(self) -> int:
    return max_num_image_tokens(self.pinpoints, self.tile, self.patches_per_side, self.strategy)

  def num_tiles(self, image_hw: Sequence[int]) -> int:
    return num_tiles(image_hw, self.pinpoints, self.tile, self.semantics)

  def num_image_tokens(self, image_hw: Sequence[int]) -> int:
    return num_image_tokens(image_hw, self.pinpoints, self.tile, self.patches_per_side, self.strategy,
                            self.semantics)

  def feature_index(self, image_hw: Sequence[int]) -> np.ndarray:
    return feature_index(image_hw, self.pinpoints, self.tile, self.patches_per_side, self.strategy, self.semantics)

  def batch_feature_index(self, image_sizes: Sequence[Sequence[int]], slots: int) -> np.ndarray:
    """int32 [sum of num_image_tokens]: `feature_index` of each image in turn, for a batch's features
    `[N * slots * per_tile, D]` (pixel_values [N, slots, H, W, 3] through the tower, flattened); -1 = newline.

    Images come in "<image>"-tag order, which is the order of the image tokens in the row-major input_ids."""
    per_tile, _ = _tile_features(self.patches_per_side, self.strategy)
    parts = [np.zeros(0, np.int32)]
    for i, hw in enumerate(image_sizes):
      if self.num_tiles(hw) > slots:
        raise ValueError(f"image {i} of size {tuple(hw)} needs {self.num_tiles(hw)} tiles, more than {slots} slots")
      index = self.feature_index(hw)
      parts.append(np.where(index == NEWLINE, NEWLINE, index + i * slots * per_tile).astype(np.int32))
    return np.concatenate(parts)

  def tiles(self, image, image_config: ImageProcessorConfig) -> np.ndarray:
    return anyres_tiles(image, image_config, self.pinpoints, self.semantics)
