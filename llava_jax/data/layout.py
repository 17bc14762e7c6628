"""Image layout: how many tile slots and tokens an image takes, and which feature row each image token takes.

The one owner of the feature-row convention that the processor, the data pipeline, the synthetic batches, the
model, the train step and evaluation share. A batch's N image slots each hold P tile slots (the image's tiles,
then blank ones) of F features each; through the tower and projector they become rows `[N * P * F, D]`, image
in slot s owning rows [s * P * F, (s + 1) * P * F). The model gathers each image token's row from those rows
with the `image_newline` vector appended, so the newline's row is one past all slots' features (`newline_row`).

One class per image family (`LAYOUTS`), each answering per image: `num_tiles`, `max_tiles` (the slots a
static-shape pipeline pads to), `num_image_tokens` and `feature_index` (the row of each image token within its
own slot, `NEWLINE` for the newline). A family whose tokens mix features (OneVision's bilinear shrink, `taps` > 1)
gives `taps` rows per token ([tokens, taps]) and their weights (`feature_weights`); one row a token needs no
weights (None: weight 1), so NeXT's batches stay as they were. The batch operations on top are defined once,
here, in `ImageLayout`, for either form.
`layout_for(cfg)` picks the family from a model config; a new family is one more class in `LAYOUTS`.
Host side: numpy only (the device-side operations take the array module, `xp`, as an argument).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llava_jax.data import onevision
from llava_jax.data.anyres import (NEWLINE, anyres_tiles, check_semantics, grid_shape, max_num_image_tokens, max_tiles,
                                   num_image_tokens, num_tiles, tile_features, unpadded_grid)
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.data.onevision_batch import OneVisionBatch



def feature_index(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                  strategy: str = "default", semantics: str = "hf") -> np.ndarray:
  """int32 [num_image_tokens]: for each image-token position, the row of this image's features, or `NEWLINE`.

  The features are tile-major, flattened: `[n_tiles * per_tile, D]`, tile 0 the base tile, tile
  k >= 1 grid tile k - 1 (row-major), row k * per_tile + j patch j of tile k (per_tile =
  patches_per_side**2, + 1 for a leading CLS with strategy "full").

  Order as transformers' `pack_image_features`: the base tile's features as they are (CLS
  included with "full"), then the grid tiles' patches reassembled into a (rows * pps, cols * pps)
  map (tile (r, c) patch (i, j) at (r * pps + i, c * pps + j)), the map cropped centred to
  `unpadded_grid`, a newline after each row, row by row. With "full" the grid tiles' CLS features
  are left out: transformers' `view` of such features into the map is not meaningful (and the
  reference asserts on it), so only the count there is a contract.
  """
  pps = patches_per_side
  per_tile, offset = tile_features(pps, strategy)
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


class ImageLayout:
  """The batch operations every family shares, on top of its per-image answers (see the module docstring).

  `tiles` arguments are the tile slots per image slot P (default `max_tiles`); `places_features` says whether the
  model splices by host-computed rows (`image_feature_rows`), as opposed to in token order by `image_mask`."""

  places_features = False
  taps = 1  # feature rows a token mixes: 1 gives [tokens] rows and no weights, more [tokens, taps] and weights

  # -- per image: each family's own ---------------------------------------------------------------------------

  @property
  def tile_features(self) -> int:
    """F: features one tile slot gives."""
    raise NotImplementedError

  @property
  def max_tiles(self) -> int:
    raise NotImplementedError

  @property
  def max_num_image_tokens(self) -> int:
    raise NotImplementedError

  def num_tiles(self, image_hw: Sequence[int]) -> int:
    raise NotImplementedError

  def num_image_tokens(self, image_hw: Sequence[int]) -> int:
    raise NotImplementedError

  def feature_index(self, image_hw: Sequence[int]) -> np.ndarray:
    raise NotImplementedError

  def feature_weights(self, image_hw: Sequence[int]) -> np.ndarray | None:
    """float32 [num_image_tokens, taps] beside `feature_index`, or None where every token takes one row."""
    del image_hw
    return None

  def _per_image(self, method, image_hw, base_only: bool):
    """`method(image_hw)`, with `base_only` passed only where asked (only OneVision has base-only images)."""
    return method(image_hw, base_only=True) if base_only else method(image_hw)

  # -- a batch: defined once ----------------------------------------------------------------------------------

  def slot_features(self, tiles: int | None = None) -> int:
    """Feature rows of one image slot: P tile slots of F features."""
    return (self.max_tiles if tiles is None else tiles) * self.tile_features

  def newline_row(self, slots: int, tiles: int | None = None) -> int:
    """The `image_newline` row of a batch of `slots` image slots: one past all their features."""
    return slots * self.slot_features(tiles)

  def slot_rows(self, index, slot: int, slots: int, tiles: int | None = None) -> np.ndarray:
    """int32: an image's `feature_index` placed in slot `slot` of `slots`."""
    index = np.asarray(index)
    return np.where(index == NEWLINE, self.newline_row(slots, tiles),
                    index + slot * self.slot_features(tiles)).astype(np.int32)

  def batch_rows(self, image_sizes: Sequence[Sequence[int]], tiles: int | None = None,
                 base_only: Sequence[bool] | None = None) -> np.ndarray:
    """int32 [sum of num_image_tokens] (x taps): the rows of each image's tokens, image i in slot i of N, in turn.

    Images come in "<image>"-tag order, which is the order of the image tokens in the row-major input_ids.
    `base_only[i]`: image i takes its base tile only (OneVision's images in a prompt of several)."""
    tiles = self.max_tiles if tiles is None else tiles
    base_only = base_only or [False] * len(image_sizes)
    parts = [np.zeros((0,) if self.taps == 1 else (0, self.taps), np.int32)]
    for i, hw in enumerate(image_sizes):
      need = self._per_image(self.num_tiles, hw, base_only[i])
      if need > tiles:
        raise ValueError(f"image {i} of size {tuple(hw)} needs {need} tiles, more than {tiles} slots")
      parts.append(self.slot_rows(self._per_image(self.feature_index, hw, base_only[i]), i, len(image_sizes), tiles))
    return np.concatenate(parts)

  def batch_weights(self, image_sizes: Sequence[Sequence[int]],
                    base_only: Sequence[bool] | None = None) -> np.ndarray | None:
    """float32 [sum of num_image_tokens, taps] beside `batch_rows`; None for a one-tap family."""
    if self.taps == 1:
      return None
    base_only = base_only or [False] * len(image_sizes)
    parts = [np.zeros((0, self.taps), np.float32)]
    parts += [self._per_image(self.feature_weights, hw, only) for hw, only in zip(image_sizes, base_only)]
    return np.concatenate(parts)

  def batch_feature_index(self, image_sizes: Sequence[Sequence[int]], slots: int) -> np.ndarray:
    """`batch_rows` with `slots` tile slots per image and `NEWLINE` for the newline, for a gather from
    `concatenate([features, newline[None]])`."""
    rows = self.batch_rows(image_sizes, slots)
    return np.where(rows == self.newline_row(len(image_sizes), slots), NEWLINE, rows).astype(np.int32)

  def token_rows(self, input_ids, image_token: int, image_sizes, tiles: int | None = None,
                 base_only: Sequence[bool] | None = None) -> np.ndarray:
    """int32 [B, T] (x taps): `batch_rows` at the image-token positions of input_ids, 0 elsewhere."""
    input_ids, image_sizes = np.asarray(input_ids), np.asarray(image_sizes).reshape(-1, 2)
    rows = self.batch_rows(image_sizes, tiles, base_only)
    return self._at_tokens(rows, input_ids == image_token, image_token, image_sizes)

  def token_weights(self, input_ids, image_token: int, image_sizes,
                    base_only: Sequence[bool] | None = None) -> np.ndarray | None:
    """float32 [B, T, taps]: `batch_weights` at the image-token positions, 0 elsewhere; None for one tap."""
    input_ids, image_sizes = np.asarray(input_ids), np.asarray(image_sizes).reshape(-1, 2)
    weights = self.batch_weights(image_sizes, base_only)
    return None if weights is None else self._at_tokens(weights, input_ids == image_token, image_token, image_sizes)

  @staticmethod
  def _at_tokens(rows, is_image, image_token, image_sizes) -> np.ndarray:
    if int(is_image.sum()) != len(rows):
      raise ValueError(f"Image features and image tokens do not match: {int(is_image.sum())} image tokens "
                       f"(id {image_token}) in input_ids, {len(rows)} features for the {len(image_sizes)} "
                       f"images of sizes {image_sizes.tolist()}")
    out = np.zeros(is_image.shape + rows.shape[1:], rows.dtype)
    out[is_image] = rows
    return out

  def with_blank_slots(self, rows, is_image, slots: int, total: int, tiles: int | None = None) -> np.ndarray:
    """Rows of `slots` image slots as rows of `total` >= slots, blank ones appended: only the newline moves."""
    out, is_image = np.array(rows), np.asarray(is_image)
    is_image = is_image.reshape(is_image.shape + (1,) * (out.ndim - is_image.ndim))  # over the taps too
    out[is_image & (out == self.newline_row(slots, tiles))] = self.newline_row(total, tiles)
    return out

  def row_local_rows(self, rows, tiles_per_row: int, host_rows: int, xp=np):
    """[B, T] rows numbered over a host's block of `host_rows` rows -> numbered within each row (each row one
    slot of `tiles_per_row` tiles: its features from 0, the newline one past them), for a gather per row.

    Each host's rows are one contiguous block of the global batch, so row b is row b % host_rows of its host's
    block; counted within the row they hold for any micro-batch of rows too. `xp`: numpy, or jax.numpy on device.
    """
    local_row = xp.arange(rows.shape[0], dtype=rows.dtype).reshape((-1,) + (1,) * (rows.ndim - 1)) % host_rows
    return xp.where(rows == self.newline_row(host_rows, tiles_per_row), self.newline_row(1, tiles_per_row),
                    rows - local_row * self.slot_features(tiles_per_row))

  def gather(self, features, newline, rows, xp=np, weights=None):
    """[G, R, D]: per group g, the features [G, slots * P * F, D] with `newline` [D] one past them, taken at
    rows [G, R] (clipped, so positions that are not image tokens take any row). `xp`: numpy or jax.numpy.

    With rows [G, R, K] each token is the sum over its K taps of weights [G, R, K] times the rows' features
    (summed in float32): a bilinear resize of the features as a fixed-shape gather. Without weights, tap 0."""
    groups, _, dim = features.shape
    newline = xp.broadcast_to(newline.astype(features.dtype), (groups, 1, dim))
    flat = xp.concatenate([features, newline], axis=1)
    rows = xp.clip(rows, 0, flat.shape[1] - 1)
    if rows.ndim == 2:
      return xp.take_along_axis(flat, rows[..., None], axis=1)
    if weights is None:
      return xp.take_along_axis(flat, rows[..., 0, None], axis=1)
    taken = xp.take_along_axis(flat, rows.reshape(groups, -1)[..., None], axis=1).reshape(*rows.shape, dim)
    mixed = (taken.astype(xp.float32) * weights.astype(xp.float32)[..., None]).sum(axis=2)
    return mixed.astype(features.dtype)


@dataclasses.dataclass(frozen=True)
class SingleTileLayout(ImageLayout):
  """LLaVA-1.0 / 1.5: one tile per image, its `tokens` features in order, no newline. The model splices these
  in token order (`image_mask`), which is what `batch_rows` describes."""
  tokens: int

  @classmethod
  def from_config(cls, cfg, pinpoints=None) -> SingleTileLayout:
    del pinpoints
    return cls(cfg.num_image_tokens)

  @property
  def tile_features(self) -> int:
    return self.tokens

  @property
  def max_tiles(self) -> int:
    return 1

  @property
  def max_num_image_tokens(self) -> int:
    return self.tokens

  def num_tiles(self, image_hw: Sequence[int] | None = None) -> int:
    return 1

  def num_image_tokens(self, image_hw: Sequence[int] | None = None) -> int:
    return self.tokens

  def feature_index(self, image_hw: Sequence[int] | None = None) -> np.ndarray:
    return np.arange(self.tokens, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class AnyresLayout(ImageLayout):
  """LLaVA-NeXT (1.6) anyres: the base tile and the grid of the best pinpoint, unpadded, a newline per row
  (geometry in `data/anyres.py`). `from_config` reads a `LlavaConfig` (`image_grid_pinpoints`,
  `anyres_semantics`, `vision.image_size`, `vision.patch_size`, `vision_feature_select_strategy`)."""
  pinpoints: tuple[tuple[int, int], ...]
  tile: int
  patches_per_side: int
  strategy: str = "default"
  semantics: str = "hf"

  places_features = True

  def __post_init__(self):
    object.__setattr__(self, "pinpoints", tuple((int(a), int(b)) for a, b in self.pinpoints))
    check_semantics(self.semantics)
    tile_features(self.patches_per_side, self.strategy)
    max_tiles(self.pinpoints, self.tile)  # every pinpoint a multiple of the tile

  @classmethod
  def from_config(cls, cfg, pinpoints=None) -> AnyresLayout | None:
    """A `LlavaConfig`'s anyres settings (`pinpoints` overrides its `image_grid_pinpoints`); None when there are
    no pinpoints (not this family)."""
    pinpoints = pinpoints or cfg.image_grid_pinpoints
    if not pinpoints:
      return None
    vision = cfg.vision
    return cls(pinpoints=pinpoints, tile=vision.image_size, patches_per_side=vision.image_size // vision.patch_size,
               strategy=cfg.vision_feature_select_strategy, semantics=cfg.anyres_semantics)

  @property
  def tile_features(self) -> int:
    return tile_features(self.patches_per_side, self.strategy)[0]

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

  def tiles(self, image, image_config: ImageProcessorConfig) -> np.ndarray:
    return anyres_tiles(image, image_config, self.pinpoints, self.semantics)


AnyresGeometry = AnyresLayout  # the earlier name


@dataclasses.dataclass(frozen=True)
class OneVisionLayout(OneVisionBatch, ImageLayout):
  """LLaVA-OneVision: anyres tiles whose unpadded grid map is shrunk bilinearly to about `max_grid_tiles` tiles'
  area, so a token mixes up to four features (`taps` rows and `feature_weights`); an image in a prompt of several
  takes its base tile only (`base_only`), a video frame one tile pooled to half a side (`video_*`). The geometry
  and the taps are `data/onevision.py`'s, the batch operations (which images are base-only, each video's frames)
  `data/onevision_batch.py`'s. A tile gives pps^2 features (SigLIP: no CLS)."""
  pinpoints: tuple[tuple[int, int], ...]
  tile: int
  patches_per_side: int
  max_grid_tiles: int = 9

  places_features = True
  taps = onevision.TAPS

  def __post_init__(self):
    object.__setattr__(self, "pinpoints", tuple((int(a), int(b)) for a, b in self.pinpoints))
    max_tiles(self.pinpoints, self.tile)  # every pinpoint a multiple of the tile

  @classmethod
  def from_config(cls, cfg, pinpoints=None) -> OneVisionLayout | None:
    """A `LlavaConfig` with `vision_aspect_ratio` ("anyres_max_9"); None without (not this family)."""
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    if aspect is None:
      return None
    vision = cfg.vision
    return cls(pinpoints=pinpoints or cfg.image_grid_pinpoints or onevision.PINPOINTS_ONEVISION,
               tile=vision.image_size, patches_per_side=vision.image_size // vision.patch_size,
               max_grid_tiles=onevision.max_grid_tiles(aspect))

  @property
  def tile_features(self) -> int:
    return self.patches_per_side**2

  @property
  def max_tiles(self) -> int:
    return max_tiles(self.pinpoints, self.tile)

  @property
  def max_num_image_tokens(self) -> int:
    return onevision.max_num_image_tokens(self.pinpoints, self.tile, self.patches_per_side, self.max_grid_tiles)

  def num_tiles(self, image_hw: Sequence[int], base_only: bool = False) -> int:
    return 1 if base_only else num_tiles(image_hw, self.pinpoints, self.tile)

  def num_image_tokens(self, image_hw: Sequence[int], base_only: bool = False) -> int:
    if base_only:
      return self.tile_features + 1
    return onevision.num_image_tokens(image_hw, self.pinpoints, self.tile, self.patches_per_side,
                                      self.max_grid_tiles)

  def image_taps(self, image_hw: Sequence[int], base_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rows int32 [tokens, taps], weights float32 [tokens, taps]) of one image, within its own slot."""
    if base_only:
      return onevision.base_only_taps(self.patches_per_side)
    return onevision.image_taps(image_hw, self.pinpoints, self.tile, self.patches_per_side, self.max_grid_tiles)

  def feature_index(self, image_hw: Sequence[int], base_only: bool = False) -> np.ndarray:
    return self.image_taps(image_hw, base_only)[0]

  def feature_weights(self, image_hw: Sequence[int], base_only: bool = False) -> np.ndarray:
    return self.image_taps(image_hw, base_only)[1]

  def num_video_tokens(self, frames: int) -> int:
    return onevision.num_video_tokens(frames, self.patches_per_side)

  def video_taps(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A video of `frames` tiles (one a frame) in one slot: (rows, weights) of its pooled tokens + newline."""
    return onevision.video_taps(frames, self.patches_per_side)

  def tiles(self, image, image_config: ImageProcessorConfig, base_only: bool = False) -> np.ndarray:
    if base_only:
      return onevision.base_only_tile(image, image_config)
    return onevision.image_tiles(image, image_config, self.pinpoints)


# The families, most specific first: `layout_for` takes the first whose `from_config` accepts the config.
LAYOUTS = (OneVisionLayout, AnyresLayout, SingleTileLayout)


def layout_for(cfg, pinpoints=None) -> ImageLayout:
  """The image layout of a `LlavaConfig` (`pinpoints` overriding its `image_grid_pinpoints`)."""
  for cls in LAYOUTS:
    layout = cls.from_config(cfg, pinpoints)
    if layout is not None:
      return layout
  raise ValueError("no image layout accepts this config")
