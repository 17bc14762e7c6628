"""LLaVA-OneVision batches: which images of a batch take their base tile only, and each video's frames and taps.

transformers learns that a prompt holds several images from its nested input (`batch_num_images`); our inputs are
flat (images in tag order, a left-padded [B, T] batch), so the decision is made from the token counts alone, here,
once, for the processor (which knows) and the model (which infers) to agree on:

- Images: rows are walked in order, consuming images in tag order. A row whose image-token count equals the next
  image's single-image count takes that one image whole; a row with k >= 2 times the base-only count (pps^2 + 1)
  takes k base-only images. Where a row could be read both ways, the reading that consumes all images exactly wins
  (a search over the rows); still ambiguous, or impossible, is a ValueError naming the row.
- Videos: each contiguous run of video tokens is one video of (run - 1) / pooled^2 frames (one newline a video).
  k adjacent videos make a run of k (mod pooled^2) extra tokens; their frames are told apart only when every one
  fills the frame slots, else a ValueError asks for text between them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from llava_jax.data import onevision


def _runs(mask_row: np.ndarray) -> list[int]:
  """Lengths of the contiguous True runs of a 1-D bool array, in order."""
  padded = np.concatenate([[False], mask_row, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return list(edges[1::2] - edges[0::2])


def assign_images(row_counts: Sequence[int], single_counts: Sequence[int], base_count: int) -> list[bool]:
  """Per image (tag order): True where it takes its base tile only. `row_counts[b]`: row b's image tokens;
  `single_counts[i]`: image i's tokens alone in its prompt; `base_count`: one base-only image's tokens."""
  n, rows = len(single_counts), [int(c) for c in row_counts]

  def readings(b: int, i: int) -> list[tuple[int, bool]]:
    """(images taken, base-only) for row b starting at image i."""
    count, out = rows[b], []
    if count == 0:
      return [(0, False)]
    if i < n and single_counts[i] == count:
      out.append((1, False))
    if count % base_count == 0 and count // base_count >= 2 and i + count // base_count <= n:
      out.append((count // base_count, True))
    return out

  @functools.lru_cache(maxsize=None)
  def ways(b: int, i: int) -> int:
    """Readings of rows b.. from image i that consume every image (capped at 2)."""
    if b == len(rows):
      return int(i == n)
    return min(2, sum(ways(b + 1, i + k) for k, _ in readings(b, i)))

  if ways(0, 0) == 0:
    _raise_impossible(rows, single_counts, base_count, readings, n)
  flags, i = [], 0
  for b in range(len(rows)):
    viable = [(k, only) for k, only in readings(b, i) if ways(b + 1, i + k)]
    if len(viable) > 1:
      raise ValueError(f"row {b}: its {rows[b]} image tokens can be read as one whole image or as "
                       f"{rows[b] // base_count} images of {base_count} tokens, and both readings use all {n} "
                       "images; the batch is ambiguous (split it)")
    k, only = viable[0]
    flags += [only] * k
    i += k
  return flags


def _raise_impossible(rows, single_counts, base_count, readings, n):
  """The first row no reading reaches past, else the image total that does not add up."""
  starts = {0}
  for b in range(len(rows)):
    nxt = {i + k for i in starts for k, _ in readings(b, i)}
    if not nxt:
      nexts = sorted({int(single_counts[i]) for i in starts if i < n})
      raise ValueError(f"row {b}: its {rows[b]} image tokens match neither the next image's single-image count "
                       f"({nexts or 'no image left'}) nor k >= 2 images of {base_count} tokens")
    starts = nxt
  raise ValueError(f"the rows' image tokens take {sorted(starts)} images, but {n} images were given")


def assign_videos(input_ids, video_token: int, per_frame: int, frame_slots: int | None = None) -> list[int]:
  """Real frames of each video, in token order: a run of video tokens is one video, or k videos filling
  `frame_slots` frames each (see the module docstring)."""
  frames = []
  for b, row in enumerate(np.asarray(input_ids) == video_token):
    for run in _runs(row):
      k = run % per_frame
      total = (run - k) // per_frame
      if k == 0 or total < k:
        raise ValueError(f"row {b}: a run of {run} video tokens is not videos of f * {per_frame} + 1 tokens")
      if k == 1:
        frames.append(total)
      elif frame_slots is not None and total == k * frame_slots:
        frames += [frame_slots] * k
      else:
        raise ValueError(f"row {b}: {k} adjacent videos share one run of {run} video tokens and their frame "
                         "counts cannot be told apart; put text between them")
  return frames


class OneVisionBatch:
  """`OneVisionLayout`'s batch operations (a mixin: it reads the layout's per-image answers)."""

  def assign_images(self, input_ids, image_token: int, image_sizes) -> list[bool]:
    """Per image: whether it takes its base tile only, from input_ids and image_sizes alone."""
    row_counts = (np.asarray(input_ids) == image_token).sum(axis=-1).reshape(-1)
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    return assign_images(row_counts, [self.num_image_tokens(hw) for hw in sizes], self.tile_features + 1)

  def token_rows(self, input_ids, image_token: int, image_sizes, tiles: int | None = None,
                 base_only: Sequence[bool] | None = None) -> np.ndarray:
    """As `ImageLayout.token_rows`, the base-only images inferred (`assign_images`) unless given."""
    if base_only is None:
      base_only = self.assign_images(input_ids, image_token, image_sizes)
    return super().token_rows(input_ids, image_token, image_sizes, tiles, base_only)

  def token_weights(self, input_ids, image_token: int, image_sizes, base_only: Sequence[bool] | None = None):
    if base_only is None:
      base_only = self.assign_images(input_ids, image_token, image_sizes)
    return super().token_weights(input_ids, image_token, image_sizes, base_only)

  def video_frame_counts(self, input_ids, video_token: int, frame_slots: int | None = None) -> list[int]:
    """Each video's real frames, in token order, from its tokens."""
    return assign_videos(input_ids, video_token, onevision.pooled_side(self.patches_per_side) ** 2, frame_slots)

  def video_token_taps(self, input_ids, video_token: int, videos: int, frame_slots: int):
    """(rows int32 [B, T, taps], weights float32 [B, T, taps]) of the video tokens, 0 elsewhere: rows into the
    videos' table, `videos` slots of `frame_slots` frames (video v's frame f tile v * frame_slots + f), the
    newline one past it."""
    input_ids = np.asarray(input_ids)
    frames = self.video_frame_counts(input_ids, video_token, frame_slots)
    if len(frames) != videos or max(frames, default=0) > frame_slots:
      raise ValueError(f"the video tokens hold {len(frames)} videos of {frames} frames, but {videos} videos of "
                       f"{frame_slots} frame slots were given")
    per_video, newline = frame_slots * self.tile_features, videos * frame_slots * self.tile_features
    parts = [np.zeros((0, self.taps), np.int32)], [np.zeros((0, self.taps), np.float32)]
    for v, count in enumerate(frames):
      rows, weights = self.video_taps(count)
      parts[0].append(np.where(rows == onevision.NEWLINE, newline, rows + v * per_video).astype(np.int32))
      parts[1].append(weights)
    rows, weights = np.concatenate(parts[0]), np.concatenate(parts[1])
    is_video = input_ids == video_token
    out_rows = np.zeros(is_video.shape + (self.taps,), np.int32)
    out_weights = np.zeros(is_video.shape + (self.taps,), np.float32)
    out_rows[is_video], out_weights[is_video] = rows, weights
    return out_rows, out_weights
