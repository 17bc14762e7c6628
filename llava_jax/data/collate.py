"""Examples -> fixed-shape batches: padding one sample per row, or packing several.

The batch layout is the contract written in `pipeline`'s docstring. Skip markers are
taken out of the stream here and ride along with the batch (under `SKIPPED_KEY`, with
their `SkipRuns` under `SKIP_RUNS_KEY`) so that the iterator can count them. A batch
can thus carry skips and no sample: it then holds only those two keys. A batch is
closed after `max_skips_per_batch` skips even if its rows are not full, so that a
stream of bad samples never makes a worker hold an unbounded list or stay silent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from llava_jax.data.layout import ImageLayout, SingleTileLayout
from llava_jax.data.records import SKIP_KEY, SKIP_RUNS_KEY, SKIPPED_KEY, SkipRuns
from llava_jax.data.text import IGNORE_INDEX

MAX_SKIPS_PER_BATCH = 256  # a batch is handed on after this many skips, full or not


def pad_token_id(tokenizer) -> int:
  """The padding id: the tokenizer's pad, else unk (what LLaVA sets), else 0."""
  for name in ("pad_token_id", "unk_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  return 0


@dataclasses.dataclass(frozen=True)
class Collate:
  """Rows of examples -> one fixed-shape batch; the fields are `DataConfig`'s, plus the pad id and (H, W).

  A `layout` that places features (LLaVA-NeXT) gives every image slot `layout.max_tiles` tiles (the image's,
  then zeros) and `image_feature_rows`, each image token's row of the batch's tile features: image slot s is
  the row for padded batches, row * M + k packed, and `ImageLayout.slot_rows` numbers its rows. A layout whose
  tokens mix several rows (OneVision, `taps` > 1) gives rows [B, L, taps] and `image_feature_weights` beside them;
  `max_images_per_sample` > 1 (OneVision's records of several images) gives padded rows M image slots too."""
  batch_size: int
  max_length: int
  packing: bool
  max_images_per_row: int
  pad_id: int
  image_size: tuple[int, int]
  layout: ImageLayout = SingleTileLayout(1)  # the model's image layout (`data/layout.py`); default one tile (1.5)
  image_token_index: int = -1  # LLaVA-NeXT: where the image's features go
  max_images_per_sample: int = 1  # padded rows: image slots per row (M) when above 1
  max_frames: int = 0  # OneVision: F frame slots of one video a row (0: no videos)
  video_token_index: int = -1

  def fits(self, row: list[dict], example: dict) -> bool:
    used = sum(len(e["input_ids"]) for e in row)
    images = sum(len(_images(e)) for e in row)
    videos = any("video" in e for e in row) and "video" in example  # one video slot a row
    return (used + len(example["input_ids"]) <= self.max_length and not videos and
            images + len(_images(example)) <= self.max_images_per_row)

  @property
  def image_slots(self) -> int | None:
    """M, the image slots of a row; None: one image a row, no slot axis."""
    if self.packing:
      return self.max_images_per_row
    return self.max_images_per_sample if self.max_images_per_sample > 1 else None

  def __call__(self, rows: list[list[dict]], skipped: list[tuple[str, str, str]],
               runs: SkipRuns | None = None) -> dict:
    if runs is None:  # all skips before the samples
      n = len(skipped)
      runs = SkipRuns(sum(len(row) for row in rows), n, n, 0 if rows else n)
    if not rows:
      return {SKIPPED_KEY: list(skipped), SKIP_RUNS_KEY: runs}
    b, length = self.batch_size, self.max_length
    h, w = self.image_size
    batch = {
        "input_ids": np.full((b, length), self.pad_id, np.int32),
        "labels": np.full((b, length), IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
    }
    places = self.layout.places_features
    tiles = (self.layout.max_tiles,) if places else ()
    slots = (b,) if self.image_slots is None else (b, self.image_slots)
    batch.update(pixel_values=np.zeros(slots + tiles + (h, w, 3), np.float32), image_mask=np.zeros(slots, bool))
    if self.packing:
      batch.update(segment_ids=np.zeros((b, length), np.int32), positions=np.zeros((b, length), np.int32))
    if places:
      taps = () if self.layout.taps == 1 else (self.layout.taps,)
      batch.update(image_feature_rows=np.zeros((b, length) + taps, np.int32),
                   image_sizes=np.zeros(slots + (2,), np.int32))
      if taps:
        batch["image_feature_weights"] = np.zeros((b, length) + taps, np.float32)
    if self.max_frames:  # every batch carries the video slots, so that the shapes never change
      taps = (self.layout.taps,)
      batch.update(pixel_values_videos=np.zeros((b, self.max_frames, h, w, 3), np.float32),
                   video_feature_rows=np.zeros((b, length) + taps, np.int32),
                   video_feature_weights=np.zeros((b, length) + taps, np.float32))
    for r, row in enumerate(rows):
      start, slot = 0, 0
      for segment, ex in enumerate(row, 1):
        n = len(ex["input_ids"])
        end = start + n
        batch["input_ids"][r, start:end] = ex["input_ids"]
        batch["labels"][r, start:end] = ex["labels"]
        batch["attention_mask"][r, start:end] = 1
        if self.packing:
          batch["labels"][r, start] = IGNORE_INDEX
          batch["segment_ids"][r, start:end] = segment
          batch["positions"][r, start:end] = np.arange(n, dtype=np.int32)
        if ex["pixel_values"] is not None:
          slot = self._place_images(batch, r, slot, ex, start)
        if "video" in ex:
          self._place_video(batch, r, ex, start)
        start = end
    batch[SKIPPED_KEY] = list(skipped)
    batch[SKIP_RUNS_KEY] = runs
    return batch

  def _place_images(self, batch: dict, r: int, slot: int, ex: dict, start: int) -> int:
    """Puts an example's images into row r's slots from `slot` on (for LLaVA-NeXT and OneVision also their
    tiles' feature rows, and OneVision's weights); returns the next free slot."""
    images = _images(ex)
    if slot + len(images) > (self.image_slots or 1):
      raise ValueError(f"sample {ex['id']}: {len(images)} images do not fit the row's image slots")
    rows, weights = [], []
    for k, (tiles, size, index, taps_weights) in enumerate(images):
      where = (r,) if self.image_slots is None else (r, slot + k)
      batch["image_mask"][where] = True
      if not self.layout.places_features:
        batch["pixel_values"][where] = tiles
        continue
      batch["pixel_values"][where][:len(tiles)] = tiles
      batch["image_sizes"][where] = size
      flat_slot = int(np.ravel_multi_index(where, batch["image_mask"].shape))
      rows.append(self.layout.slot_rows(index, flat_slot, batch["image_mask"].size))
      weights.append(taps_weights)
    if rows:
      rows = np.concatenate(rows)
      positions = start + np.flatnonzero(ex["input_ids"] == self.image_token_index)
      if len(positions) != len(rows):  # preprocessing guarantees it; a mismatch would misplace every feature
        raise ValueError(f"sample {ex['id']}: {len(positions)} image tokens for {len(rows)} image features")
      batch["image_feature_rows"][r, positions] = rows
      if "image_feature_weights" in batch:
        batch["image_feature_weights"][r, positions] = np.concatenate(weights)
    return slot + len(images)


  def _place_video(self, batch: dict, r: int, ex: dict, start: int) -> None:
    """Puts an example's video frames into row r's video slot (zero frames after them) and its tokens' taps,
    numbered over the batch's B slots of F frame tiles (the newline one past them) as image rows are."""
    frames = ex["video"]
    if not self.max_frames or len(frames) > self.max_frames:
      raise ValueError(f"sample {ex['id']}: {len(frames)} frames for {self.max_frames} frame slots")
    batch["pixel_values_videos"][r, :len(frames)] = frames
    rows = self.layout.slot_rows(ex["video_index"], r, batch["input_ids"].shape[0], self.max_frames)
    positions = start + np.flatnonzero(ex["input_ids"] == self.video_token_index)
    if len(positions) != len(rows):
      raise ValueError(f"sample {ex['id']}: {len(positions)} video tokens for {len(rows)} video features")
    batch["video_feature_rows"][r, positions] = rows
    batch["video_feature_weights"][r, positions] = ex["video_weights"]


def _images(ex: dict) -> list[tuple]:
  """An example's images as (tiles, size, feature_index, feature_weights): OneVision's fields are lists (one
  entry per image), the others hold at most one image."""
  pixels = ex["pixel_values"]
  if pixels is None:
    return []
  if isinstance(pixels, list):
    return list(zip(pixels, ex["image_size"], ex["feature_index"], ex["feature_weights"]))
  return [(pixels, ex.get("image_size"), ex.get("feature_index"), None)]


class BatchIterator(grain.DatasetIterator):
  """Drops skipped-sample markers (keeping them for the batch) and fills rows."""

  def __init__(self, parent: grain.DatasetIterator, collate: Collate,
               max_skips_per_batch: int = MAX_SKIPS_PER_BATCH):
    super().__init__(parent)
    self._collate = collate
    self._max_skips = max(1, max_skips_per_batch)
    self._pending = None        # an example read but left for the next batch (packing)
    self._pending_state = None  # the parent's state before that example was read

  def __next__(self) -> dict:
    packing = self._collate.packing
    batch_size = self._collate.batch_size
    rows: list[list[dict]] = []
    skipped: list[tuple[str, str, str]] = []
    samples = leading = longest = run = 0  # the `SkipRuns` of this batch
    while len(skipped) < self._max_skips:
      if self._pending is not None:
        example, state_before = self._pending, self._pending_state
        self._pending = self._pending_state = None
      else:
        state_before = self._parent.get_state() if packing else None
        try:
          example = next(self._parent)
        except StopIteration:
          break
      if SKIP_KEY in example:
        skipped.append((example[SKIP_KEY], example["id"], example["message"]))
        run += 1
        longest = max(longest, run)
        leading = run if not samples else leading
        continue
      if packing and rows and self._collate.fits(rows[-1], example):
        rows[-1].append(example)
      elif len(rows) < batch_size:
        rows.append([example])
      else:  # packing, and the batch is full: the example starts the next one
        self._pending, self._pending_state = example, state_before
        break
      samples, run = samples + 1, 0
      if not packing and len(rows) == batch_size:
        break
    if not rows and not skipped:
      raise StopIteration
    return self._collate(rows, skipped, SkipRuns(samples, leading, longest, run))

  def get_state(self) -> dict[str, Any]:
    if self._pending is not None:
      return {"parent": self._pending_state}
    return {"parent": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._pending = self._pending_state = None
    self._parent.set_state(state["parent"])

  def __str__(self) -> str:
    return "LlavaBatch"


class BatchIterDataset(grain.IterDataset):
  """Batches a sample dataset made by `make_samples(worker_index, worker_count)`.

  It rebuilds its parent when `mp_prefetch` gives it a worker slice, so that workers
  split the host's stream by whole batches (blocks) rather than by sample: a
  worker's batch is then one block of the order, as with no workers.
  """

  def __init__(self, make_samples: Callable[[int, int], grain.IterDataset], collate: Collate,
               max_skips_per_batch: int = MAX_SKIPS_PER_BATCH):
    super().__init__(make_samples(0, 1))
    self._make_samples = make_samples
    self._collate = collate
    self._max_skips = max_skips_per_batch

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._parents = (self._make_samples(sl.start or 0, sl.step or 1),)

  def __iter__(self) -> grain.DatasetIterator:
    return BatchIterator(self._parent.__iter__(), self._collate, self._max_skips)

  def __str__(self) -> str:
    return "LlavaBatchDataset"
