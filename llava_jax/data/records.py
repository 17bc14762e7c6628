"""LLaVA records: the JSON/JSONL source, modality lengths, and the skipped-sample marker.

A record source is random access (`len`, `[i]`) to dicts in LLaVA's JSON shape. A
record that cannot even be read comes back as a skip marker (`skip_record`), a dict
that travels through the pipeline in place of a sample so that it can be counted.
This module is the one both record sources (`LlavaJsonSource` here and
`tfds_llava.RecordSource`) build on; it knows nothing of the pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from llava_jax.data.text import SkipReason

SKIP_KEY = "_skip"        # key of a skipped-sample marker travelling through the pipeline
SKIPPED_KEY = "_skipped"  # key of a batch's list of (reason, id, message) of skipped samples
SKIP_RUNS_KEY = "_skip_runs"  # key of a batch's `SkipRuns`: where its skips fell between its samples


class SkipRuns(NamedTuple):
  """How a batch's skipped samples fall around its real ones, in stream order.

  Enough to count skips in a row across batches without keeping each position:
  `leading` skips came before the first sample, `trailing` after the last, `longest` is
  the longest run anywhere. With no sample, all three equal the number of skips.
  """
  samples: int = 0
  leading: int = 0
  longest: int = 0
  trailing: int = 0


def skip_record(reason: SkipReason, sample_id: Any, message: str) -> dict[str, str]:
  """The marker that stands for a skipped sample: its reason, id and message."""
  return {SKIP_KEY: reason.value, "id": str(sample_id), "message": message}


def record_modality_length(record: dict) -> int:
  """Words in all turns (at least 1), negated when the record has no image."""
  try:
    n = sum(len(turn["value"].split()) for turn in record["conversations"])
  except (KeyError, TypeError, AttributeError):
    n = 1
  n = max(n, 1)
  return n if "image" in record else -n


class LlavaJsonSource:
  """Random access to LLaVA records from JSON lists and JSONL files.

  JSON lists are parsed once here and kept as compact JSON bytes (cheap to send to
  worker processes); JSONL files are indexed by line offset and read on demand. A
  JSONL line that is not valid JSON comes back as a malformed-record marker.
  """

  def __init__(self, paths: str | Sequence[str]):
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths or not all(paths):
      raise ValueError("json_path is empty")
    self._parts = []  # (kind, path, data, offsets)
    json_lengths = []  # modality lengths of JSON-list records, computed while they are parsed
    for path in paths:
      if path.endswith(".jsonl"):
        offsets = [0]
        with open(path, "rb") as f:
          for line in f:
            offsets.append(offsets[-1] + len(line))
        starts = np.asarray(offsets, np.int64)
        keep = np.diff(starts) > 1  # drop empty lines ("\n")
        self._parts.append(("jsonl", path, None, (starts[:-1][keep], starts[1:][keep])))
      else:
        with open(path) as f:
          records = json.load(f)
        if not isinstance(records, list):
          raise ValueError(f"{path}: a LLaVA JSON file holds a list of records")
        blobs = [json.dumps(r, ensure_ascii=False).encode() for r in records]
        json_lengths.append(np.array([record_modality_length(r) if isinstance(r, dict) else -1
                                      for r in records], np.int64))
        ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        data = np.frombuffer(b"".join(blobs), np.uint8)
        self._parts.append(("json", path, data, (starts, ends)))
    self._sizes = np.cumsum([len(p[3][0]) for p in self._parts])
    self._json_lengths = json_lengths
    self._fds: dict[str, int] = {}

  def __len__(self) -> int:
    return int(self._sizes[-1]) if len(self._sizes) else 0

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"] = {}  # file descriptors stay in their process
    return state

  def _raw(self, index: int) -> tuple[bytes, str]:
    part = int(np.searchsorted(self._sizes, index, side="right"))
    local = index - (int(self._sizes[part - 1]) if part else 0)
    kind, path, data, (starts, ends) = self._parts[part]
    start, end = int(starts[local]), int(ends[local])
    if kind == "json":
      return data[start:end].tobytes(), f"{path}[{local}]"
    fd = self._fds.get(path)
    if fd is None:  # Reading threads may race here; keep one descriptor, close the other.
      opened = os.open(path, os.O_RDONLY)
      fd = self._fds.setdefault(path, opened)
      if fd != opened:
        os.close(opened)
    return os.pread(fd, end - start, start), f"{path}:{local + 1}"

  def __getitem__(self, index: int) -> dict:
    raw, where = self._raw(index)
    try:
      record = json.loads(raw)
    except ValueError as e:
      return skip_record(SkipReason.MALFORMED_RECORD, where, f"not JSON: {e}")
    if not isinstance(record, dict):
      return skip_record(SkipReason.MALFORMED_RECORD, where, "not a JSON object")
    record.setdefault("id", where)
    return record

  def modality_lengths(self) -> np.ndarray:
    """LLaVA's `modality_lengths`: word count, negative for text-only samples."""
    out, json_parts = [], iter(self._json_lengths)
    for kind, _, _, (starts, _) in self._parts:
      if kind == "json":
        out.append(next(json_parts))
      else:  # JSONL: parse each line once
        base = len(np.concatenate(out)) if out else 0
        out.append(np.array([record_modality_length(self[base + i]) for i in range(len(starts))], np.int64))
    return np.concatenate(out)
