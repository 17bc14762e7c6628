"""The order of samples: per-epoch permutations, LLaVA's length grouping, and block sharding.

`EpochOrder` makes the global order of every epoch from (seed, epoch) alone, so that
any host or worker can compute any position without talking to the others; `Blocks`
then deals that order out in whole batches, to hosts and to worker processes.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np


def _length_grouped(lengths: np.ndarray, batch_size: int, world_size: int,
                    rng: np.random.Generator) -> list[int]:
  """LLaVA's `get_length_grouped_indices`: shuffled megabatches sorted by length."""
  indices = rng.permutation(len(lengths)).tolist()
  size = world_size * batch_size
  out = []
  for start in range(0, len(indices), size):
    mega = sorted(indices[start:start + size], key=lambda i: lengths[i], reverse=True)
    for chunk in _even_chunks(mega, lengths, world_size):
      out.extend(chunk)
  return out


def _even_chunks(indices: list[int], lengths, num_chunks: int) -> list[list[int]]:
  """LLaVA's `split_to_even_chunks`: give each index to the shortest unfilled chunk."""
  if len(indices) % num_chunks:
    return [indices[i::num_chunks] for i in range(num_chunks)]
  per_chunk = len(indices) // num_chunks
  chunks = [[] for _ in range(num_chunks)]
  totals = [0.0] * num_chunks
  for index in indices:
    shortest = totals.index(min(totals))
    chunks[shortest].append(index)
    totals[shortest] += lengths[index]
    if len(chunks[shortest]) == per_chunk:
      totals[shortest] = float("inf")
  return chunks


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    rng: np.random.Generator) -> list[int]:
  """LLaVA's `get_modality_length_grouped_indices` with a numpy generator.

  Image samples (positive lengths) and text-only samples (negative) go to separate
  megabatches of `world_size * batch_size`, each sorted by length and split evenly;
  the megabatches are shuffled and the two leftovers go at the end (or first, when
  together they fill a megabatch).
  """
  lengths = np.asarray(lengths)
  if np.all(lengths > 0) or np.all(lengths < 0):
    return _length_grouped(np.abs(lengths), batch_size, world_size, rng)
  mm = np.flatnonzero(lengths > 0)
  lang = np.flatnonzero(lengths < 0)
  mm_order = [int(mm[i]) for i in _length_grouped(lengths[mm], batch_size, world_size, rng)]
  lang_order = [int(lang[i]) for i in _length_grouped(-lengths[lang], batch_size, world_size, rng)]
  size = world_size * batch_size
  mm_mega = [mm_order[i:i + size] for i in range(0, len(mm_order), size)]
  lang_mega = [lang_order[i:i + size] for i in range(0, len(lang_order), size)]
  extra = mm_mega[-1] + lang_mega[-1]
  mega = mm_mega[:-1] + lang_mega[:-1]
  mega = [mega[i] for i in rng.permutation(len(mega))]
  if len(extra) >= size:
    mega = [extra[:size]] + mega
    extra = extra[size:]
  if extra:
    mega.append(extra)
  return [i for m in mega for i in m]


class EpochOrder(grain.MapDataset):
  """Repeats the parent, visiting each epoch in its own seeded order."""

  def __init__(self, parent: grain.MapDataset, *, seed: int, shuffle: bool, num_epochs: int | None,
               lengths: np.ndarray | None, batch_size: int, world_size: int):
    super().__init__(parent)
    self._n = len(parent)
    self._seed, self._shuffle, self._num_epochs = seed, shuffle, num_epochs
    self._lengths, self._batch_size, self._world_size = lengths, batch_size, world_size
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize if self._num_epochs is None else self._n * self._num_epochs

  def __str__(self) -> str:
    return "EpochOrder"

  def _order(self, epoch: int) -> np.ndarray | None:
    if not self._shuffle and self._lengths is None:
      return None
    with self._lock:
      order = self._cache.get(epoch)
      if order is None:
        rng = np.random.default_rng([self._seed, epoch])
        if self._lengths is not None:
          order = np.asarray(modality_length_grouped_indices(
              self._lengths, self._batch_size, self._world_size, rng), np.int64)
        else:
          order = rng.permutation(self._n)
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = order
    return order

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    order = self._order(epoch)
    return self._parent[int(order[i]) if order is not None else i]


class Blocks(grain.MapDataset):
  """Blocks `index`, `index + count`, ... of size `block` of the parent, concatenated."""

  def __init__(self, parent: grain.MapDataset, *, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count

  def __len__(self) -> int:
    total = len(self._parent)
    if total >= sys.maxsize // 2:
      return sys.maxsize
    full, rest = divmod(total, self._block)
    mine = max(0, (full - self._index + self._count - 1) // self._count) * self._block
    if rest and full % self._count == self._index:
      mine += rest
    return mine

  def __str__(self) -> str:
    return f"Blocks({self._index}/{self._count} of {self._block})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    blk, offset = divmod(index, self._block)
    return self._parent[(blk * self._count + self._index) * self._block + offset]
