"""Padding for static shapes, one definition each: prompts are left-padded (generation appends on the right and
takes positions from the mask) and lengths are rounded up to a bucket, so compiles stay bounded."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def left_pad(rows: Sequence, pad_id: int, multiple: int = 1, masks: Sequence | None = None):
  """Rows of ids (a list of 1-D rows, or a [B, T] array) -> (ids [B, T'], mask [B, T']) int32, every row right-
  aligned, T' the longest row rounded up to `multiple`. `masks` are the rows' own masks (None: all real)."""
  rows = [np.asarray(r) for r in rows]
  masks = [np.ones(len(r), np.int32) for r in rows] if masks is None else [np.asarray(m) for m in masks]
  t = round_up(max(len(r) for r in rows), multiple)
  ids, mask = np.full((len(rows), t), pad_id, np.int32), np.zeros((len(rows), t), np.int32)
  for i, (row, row_mask) in enumerate(zip(rows, masks)):
    if len(row):
      ids[i, t - len(row):], mask[i, t - len(row):] = row, row_mask
  return ids, mask
