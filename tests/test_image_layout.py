"""The image layouts' batch operations (slot placement, the newline row, row-local renumbering, blank slots) against
a plain construction: stand-in features whose value names (slot, tile, patch), looked up image by image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.data.layout import LAYOUTS, NEWLINE, AnyresLayout, SingleTileLayout, layout_for

PINPOINTS_56 = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # the 1.6 list * 56 / 336
LAYOUT = AnyresLayout(PINPOINTS_56, tile=56, patches_per_side=4)  # up to 5 tiles of 16 features
SIZES = [(57, 113), (20, 30), (112, 112), (170, 40), (56, 56)]
NEWLINE_VALUE = -7.0


def _config(**kw):
  return LlavaConfig(vision=VisionConfig(image_size=56, patch_size=14, num_hidden_layers=2), **kw)


def _features(slots, layout=LAYOUT, tiles=None):
  """float [slots * P * F, 1]: feature (s, k, j) holds s * 10000 + k * 100 + j."""
  tiles = tiles or layout.max_tiles
  s, k, j = np.meshgrid(np.arange(slots), np.arange(tiles), np.arange(layout.tile_features), indexing="ij")
  return (s * 10000 + k * 100 + j).reshape(-1, 1).astype(np.float32)


def _expected(layout, hw, slot):
  """What each of an image's tokens takes, read off its own `feature_index` (tile-major within the image)."""
  index = layout.feature_index(hw)
  own = slot * 10000 + index // layout.tile_features * 100 + index % layout.tile_features
  return np.where(index == NEWLINE, NEWLINE_VALUE, own).astype(np.float32)


def _gather(layout, features, rows):
  """The batch-wide splice (one group) of a flat row list."""
  return layout.gather(features[None], np.float32([NEWLINE_VALUE]), np.asarray(rows)[None])[0, :, 0]


def test_layouts_are_picked_from_the_config():
  next_cfg = _config(image_grid_pinpoints=PINPOINTS_56)
  assert layout_for(next_cfg) == LAYOUT and layout_for(next_cfg).places_features
  assert layout_for(next_cfg.replace(anyres_semantics="original")).semantics == "original"
  old = layout_for(_config())
  assert old == SingleTileLayout(16) and not old.places_features
  assert (old.num_tiles(), old.max_tiles, old.num_image_tokens(), old.max_num_image_tokens) == (1, 1, 16, 16)
  np.testing.assert_array_equal(old.feature_index(), np.arange(16))
  assert layout_for(_config(), PINPOINTS_56) == LAYOUT  # pinpoints given beside a 1.5 config
  assert layout_for(_config(vision_feature_select_strategy="full")).tile_features == 17
  assert LAYOUTS[-1] is SingleTileLayout  # the fallback comes last


def test_single_tile_rows_are_the_features_in_order():
  layout = SingleTileLayout(6)
  rows = layout.batch_rows([None] * 3)
  np.testing.assert_array_equal(rows, np.arange(18))  # the token order the model splices 1.5 images in
  features = _features(3, layout)
  np.testing.assert_array_equal(_gather(layout, features, rows), features[:, 0])


def test_images_in_slots_take_their_own_tiles_and_the_newline_one_past_all_slots():
  rows = LAYOUT.batch_rows(SIZES)
  assert len(rows) == sum(LAYOUT.num_image_tokens(hw) for hw in SIZES)
  newline = len(SIZES) * LAYOUT.max_tiles * LAYOUT.tile_features
  assert rows.max() == newline and (rows == newline).sum() > len(SIZES)
  expected = np.concatenate([_expected(LAYOUT, hw, i) for i, hw in enumerate(SIZES)])
  np.testing.assert_array_equal(_gather(LAYOUT, _features(len(SIZES)), rows), expected)
  # The same with fewer tile slots, as the processor pads to the batch's maximum.
  tiles = max(LAYOUT.num_tiles(hw) for hw in SIZES[:2])
  got = _gather(LAYOUT, _features(2, tiles=tiles), LAYOUT.batch_rows(SIZES[:2], tiles))
  np.testing.assert_array_equal(got, np.concatenate([_expected(LAYOUT, hw, i) for i, hw in enumerate(SIZES[:2])]))
  with pytest.raises(ValueError, match="more than 2 slots"):
    LAYOUT.batch_rows(SIZES[:1], tiles=2)
  # `batch_feature_index` is the same with the newline left marked.
  index = LAYOUT.batch_feature_index(SIZES, LAYOUT.max_tiles)
  np.testing.assert_array_equal(index, np.where(rows == newline, NEWLINE, rows))


def test_one_image_in_any_slot_of_a_batch():
  slots = 7
  for slot, hw in [(0, SIZES[0]), (4, SIZES[2]), (6, SIZES[3])]:
    rows = LAYOUT.slot_rows(LAYOUT.feature_index(hw), slot, slots)
    np.testing.assert_array_equal(_gather(LAYOUT, _features(slots), rows), _expected(LAYOUT, hw, slot))


def _host_batch(layout, images_by_row, length=400):
  """A host's packed batch as the pipeline builds it: row b's k-th image in slot b * M + k of B * M."""
  b, m = len(images_by_row), max(len(r) for r in images_by_row)
  rows = np.zeros((b, length), np.int32)
  is_image = np.zeros((b, length), bool)
  expected = np.zeros((b, length), np.float32)  # the value each position takes, counted within its row
  for r, images in enumerate(images_by_row):
    start = 2
    for k, hw in enumerate(images):
      n = layout.num_image_tokens(hw)
      rows[r, start:start + n] = layout.slot_rows(layout.feature_index(hw), r * m + k, b * m)
      is_image[r, start:start + n] = True
      expected[r, start:start + n] = _expected(layout, hw, k)  # "slot" k of the row's own features
      start += n + 3
  return rows, is_image, expected, m


def test_host_rows_renumbered_within_each_row_give_the_batch_wide_splice():
  hosts = [[[SIZES[0], SIZES[1]], [], [SIZES[2]]], [[SIZES[3]], [SIZES[4], SIZES[0]], [SIZES[1]]]]
  batches = [_host_batch(LAYOUT, h) for h in hosts]
  m, host_rows = batches[0][3], len(hosts[0])
  assert all(batch[3] == m for batch in batches)
  per_row = m * LAYOUT.max_tiles * LAYOUT.tile_features
  # Each host alone, batch-wide: its rows numbered from its first, its own features.
  for rows, is_image, expected, _ in batches:
    wide = LAYOUT.gather(_features(host_rows * m)[None], np.float32([NEWLINE_VALUE]), rows.reshape(1, -1))
    wide = wide.reshape(rows.shape)
    np.testing.assert_array_equal(np.where(is_image, wide, 0), np.where(is_image, _row_values(expected, m), 0))
  # The global batch (hosts' blocks in order), renumbered within each row: each row gathers its own features.
  rows = np.concatenate([batch[0] for batch in batches])
  is_image = np.concatenate([batch[1] for batch in batches])
  expected = np.concatenate([batch[2] for batch in batches])
  local = LAYOUT.row_local_rows(rows, m * LAYOUT.max_tiles, host_rows)
  on_device = jax.jit(lambda x: LAYOUT.row_local_rows(x, m * LAYOUT.max_tiles, host_rows, xp=jnp))(rows)
  np.testing.assert_array_equal(np.asarray(on_device), local)
  assert local[is_image].max() == per_row and local[is_image].min() >= 0
  own = np.broadcast_to(_features(m)[None], (len(rows), per_row, 1))  # every row's slots k = 0..M-1
  by_row = LAYOUT.gather(own, np.float32([NEWLINE_VALUE]), local)[..., 0]
  np.testing.assert_array_equal(np.where(is_image, by_row, 0), np.where(is_image, expected, 0))


def _row_values(expected, m):
  """`expected` (slot k of each row) as batch-wide values: row b's slot k is slot b * M + k of the host."""
  offset = np.arange(len(expected))[:, None] * m * 10000
  return np.where(expected == NEWLINE_VALUE, NEWLINE_VALUE, expected + offset)


def test_blank_slots_appended_move_only_the_newline():
  present, total = SIZES[:2], 6
  ids = np.zeros((2, 300), np.int32)
  ids[0, 5:5 + LAYOUT.num_image_tokens(present[0])] = 9
  ids[1, 1:1 + LAYOUT.num_image_tokens(present[1])] = 9
  rows = LAYOUT.token_rows(ids, 9, present)
  moved = LAYOUT.with_blank_slots(rows, ids == 9, len(present), total)
  features = _features(total)
  features[len(present) * LAYOUT.slot_features():] = 0  # the blank slots' features
  expected = np.concatenate([_expected(LAYOUT, hw, i) for i, hw in enumerate(present)])
  np.testing.assert_array_equal(_gather(LAYOUT, features, moved[ids == 9]), expected)
  newline = rows == LAYOUT.newline_row(len(present))
  assert newline.any()
  np.testing.assert_array_equal(moved[newline], total * LAYOUT.slot_features())
  np.testing.assert_array_equal(moved[~newline], rows[~newline])
  with pytest.raises(ValueError, match="do not match"):
    LAYOUT.token_rows(ids[:1], 9, present)
