"""The iterator a run reads: batches with skipped samples counted per reason, limits that stop a pipeline which
only skips, a stop hook for signals, and a resumable state. `pipeline.make_iterator` builds it."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from llava_jax.data.records import SKIP_RUNS_KEY, SKIPPED_KEY, SkipRuns
from llava_jax.data.text import DataError, SkipReason

log = logging.getLogger(__name__)


class DataStallError(DataError):
  """The pipeline refuses to spin: too many skipped samples in a row, too large a skipped fraction,
  or data that ended with every sample skipped.

  The message gives the counts per reason, the first ids and what to check; `counts`
  ({reason: n}), `first_ids` ({reason: [ids]}) and `samples_seen` carry the same facts.
  `reason` and `sample_id` are None: no single sample is at fault.
  """

  def __init__(self, message: str, counts: dict[str, int] | None = None,
               first_ids: dict[str, list[str]] | None = None, samples_seen: int = 0):
    ValueError.__init__(self, message)  # pylint: disable=non-parent-init-called
    self.reason = self.sample_id = None
    self.message = message
    self.counts = dict(counts or {})
    self.first_ids = {k: list(v) for k, v in (first_ids or {}).items()}
    self.samples_seen = samples_seen

  def __reduce__(self):
    return DataStallError, (self.message, self.counts, self.first_ids, self.samples_seen)


class DataInterrupted(Exception):
  """A stop was requested (`should_stop()` or `request_stop()`) while the pipeline waited for a usable batch.

  Not an error of the data: the iterator's state is consistent (the skips read so far
  are counted), so the trainer can save it with the rest of its state and exit.
  """


class DataStateMismatchError(ValueError):
  """A saved iterator state does not fit this pipeline: grain's position is per worker
  process and per block of `batch_size` samples, so it cannot be carried to other settings."""


_FORMAT_HINT = "records not in LLaVA's format: check json_path={json_path!r}"
_TAG_HINT = "'<image>' tags that do not match the records' 'image' fields: check json_path={json_path!r}"
_SKIP_HINTS = {  # reason -> what to check, formatted with the DataConfig's fields
    SkipReason.MISSING_IMAGE.value: "image_dir={image_dir!r}: the corpus's 'image' paths are relative to it; "
                                    "is it the right folder?",
    SkipReason.IMAGE_OUTSIDE_DIR.value: "'image' paths must resolve inside image_dir={image_dir!r}; if the corpus "
                                        "(or a symlinked subfolder) is meant to point elsewhere, set "
                                        "allow_images_outside_dir=True",
    SkipReason.IMAGE_TOO_LARGE.value: "max_image_pixels={max_image_pixels}: raise it if such images are wanted",
    SkipReason.UNREADABLE_IMAGE.value: "image files that are corrupt, truncated or not images (under "
                                       "image_dir={image_dir!r})",
    SkipReason.EMPTY_IMAGE.value: "empty image files (under image_dir={image_dir!r})",
    SkipReason.IMAGE_TRUNCATED.value: "max_length={max_length} (the trainer's data.seq_len) cuts into the "
                                      "{num_image_tokens} image tokens under template {template!r}: raise it",
    SkipReason.NO_TARGETS.value: "max_length={max_length} (the trainer's data.seq_len) leaves no reply token "
                                 "under template {template!r}: raise it",
    SkipReason.TOKENIZATION_MISMATCH.value: "template={template!r} does not fit the tokenizer or the data "
                                            "(LLaVA-1.5 uses 'plain' in stage 1, 'vicuna_v1' in stage 2)",
    SkipReason.MALFORMED_RECORD.value: _FORMAT_HINT,
    SkipReason.BAD_CONVERSATION.value: _FORMAT_HINT,
    SkipReason.TAG_WITHOUT_IMAGE.value: _TAG_HINT,
    SkipReason.IMAGE_WITHOUT_TAG.value: _TAG_HINT,
    SkipReason.MISPLACED_IMAGE_TAG.value: _TAG_HINT,
}
_LAYOUT_FLAGS = {"num_workers": "data.num_workers", "batch_size": "the per-host batch size",
                 "process_count": "the number of hosts"}


class DataIterator(grain.DatasetIterator):
  """Batches, with skipped samples counted per reason, limits on skips, and a stop hook.

  It never spins silently: `DataStallError` stops it when `max_consecutive_skips`
  samples in a row were skipped, when more than `max_skip_fraction` of the samples seen
  (once `min_samples_for_fraction` were) were skipped, or when the data ends with every
  sample skipped. While it reads past skipped samples it checks `should_stop()` and
  `request_stop()` and raises `DataInterrupted`. Memory stays bounded: counts per
  reason and at most `MAX_IDS_KEPT` ids per reason.

  `get_state()` returns a JSON-serialisable dict (grain's state, the counts and the
  settings the position depends on); `set_state()` resumes exactly there, or raises
  `DataStateMismatchError` when those settings differ. Being a grain
  `DatasetIterator`, it also works with `grain.checkpoint.CheckpointSave/Restore` and
  Orbax's checkpointables.
  """

  MAX_IDS_KEPT = 100  # ids remembered per reason (counts are exact regardless)
  LOGGED_PER_REASON = 20
  IDS_SHOWN = 5  # ids per reason in messages and in the saved state

  def __init__(self, dataset: grain.IterDataset, config, *,
               process_count: int = 1, should_stop: Callable[[], bool] | None = None):
    super().__init__(iter(dataset))
    self.config = config  # the pipeline's DataConfig: its limits, and the settings named in messages
    self._layout = None if config is None else {"num_workers": config.num_workers,
                                                "batch_size": config.batch_size, "process_count": process_count}
    self._should_stop = should_stop
    self._stop_requested = False
    self.skip_counts: dict[str, int] = collections.Counter()
    self.skipped_ids: dict[str, list[str]] = collections.defaultdict(list)
    self.samples_seen = 0       # samples read, usable or skipped
    self.consecutive_skips = 0  # skipped samples since the last usable one

  def request_stop(self) -> None:
    """Asks the iterator to stop waiting for data (safe from a signal handler): `DataInterrupted` follows."""
    self._stop_requested = True

  def _check_stop(self) -> None:
    if self._stop_requested or (self._should_stop is not None and self._should_stop()):
      raise DataInterrupted(f"stop requested while waiting for data ({self.consecutive_skips} samples in a row "
                            f"skipped so far); the iterator state is consistent and can be saved")

  def __next__(self) -> dict[str, np.ndarray]:
    while True:  # until a batch with a usable sample; skip-only batches are counted and dropped
      self._check_stop()
      try:
        batch = next(self._parent)
      except StopIteration:
        if self.samples_seen and self.num_skipped == self.samples_seen:
          raise self._stall("the data ended and every sample was skipped") from None
        raise
      skipped = batch.pop(SKIPPED_KEY, [])
      runs = batch.pop(SKIP_RUNS_KEY, None) or _runs_of(batch, len(skipped))
      self._count_skipped(skipped)
      self._check_limits(self._count_runs(runs, len(skipped)))
      if runs.samples:
        return batch

  def _count_runs(self, runs: SkipRuns, num_skipped: int) -> int:
    """Adds a batch's samples; returns the longest run of skips in a row it ends or holds."""
    self.samples_seen += runs.samples + num_skipped
    if not runs.samples:
      self.consecutive_skips += num_skipped
      return self.consecutive_skips
    longest = max(self.consecutive_skips + runs.leading, runs.longest)
    self.consecutive_skips = runs.trailing
    return longest

  def _check_limits(self, run: int) -> None:
    cfg = self.config
    if cfg.max_consecutive_skips and run >= cfg.max_consecutive_skips:
      raise self._stall(f"{run} samples in a row were skipped (max_consecutive_skips={cfg.max_consecutive_skips})")
    skipped = self.num_skipped
    if (cfg.max_skip_fraction < 1 and self.samples_seen >= cfg.min_samples_for_fraction and
        skipped > cfg.max_skip_fraction * self.samples_seen):
      raise self._stall(f"{skipped / self.samples_seen:.1%} of the samples were skipped (max_skip_fraction="
                        f"{cfg.max_skip_fraction}, checked from {cfg.min_samples_for_fraction} samples on)")

  def _stall(self, what: str) -> DataStallError:
    cfg = self.config
    fields = dataclasses.asdict(cfg)
    lines = [f"data pipeline stopped: {what}; {self.num_skipped} of {self.samples_seen} samples seen were skipped:"]
    by_count = sorted(self.skip_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    for reason, count in by_count:
      lines.append(f"  {reason}: {count}, e.g. {self.skipped_ids.get(reason, [])[:self.IDS_SHOWN]}")
    hints = dict.fromkeys(_SKIP_HINTS.get(reason, "").format(**fields) for reason, _ in by_count)
    lines += ["check:"] + [f"  {hint}" for hint in hints if hint]
    lines.append(f"(limits: max_consecutive_skips={cfg.max_consecutive_skips}, max_skip_fraction="
                 f"{cfg.max_skip_fraction}; 0 and 1 turn them off)")
    first_ids = {reason: ids[:self.IDS_SHOWN] for reason, ids in self.skipped_ids.items()}
    return DataStallError("\n".join(lines), dict(self.skip_counts), first_ids, self.samples_seen)

  def _count_skipped(self, skipped) -> None:
    for reason, sample_id, message in skipped:
      self.skip_counts[reason] += 1
      ids = self.skipped_ids[reason]
      if len(ids) < self.MAX_IDS_KEPT:
        ids.append(sample_id)
      if self.skip_counts[reason] <= self.LOGGED_PER_REASON:
        log.warning("skipped %s", message)
      elif self.skip_counts[reason] in (100, 1000, 10000, 100000):
        log.warning("%d samples skipped for %s so far", self.skip_counts[reason], reason)

  @property
  def num_skipped(self) -> int:
    return sum(self.skip_counts.values())

  def skip_summary(self) -> dict[str, float]:
    """Scalars for the log, the metrics and TensorBoard: {"skipped/<reason>": n} for each reason seen,
    "skipped/total", "skipped/fraction" (of the samples seen) and "samples_seen"."""
    total = self.num_skipped
    out: dict[str, float] = {f"skipped/{reason}": count for reason, count in sorted(self.skip_counts.items())}
    out.update({"skipped/total": total, "skipped/fraction": total / self.samples_seen if self.samples_seen else 0.0,
                "samples_seen": self.samples_seen})
    return out

  def log_summary(self) -> None:
    """One log line for the totals and one per reason: the count and the first ids."""
    total = self.num_skipped
    (log.warning if total else log.info)("data: %d of %d samples seen were skipped (%.2f%%)", total,
                                         self.samples_seen, 100 * total / max(self.samples_seen, 1))
    for reason, count in sorted(self.skip_counts.items()):
      log.warning("skipped %d samples for %s, e.g. %s", count, reason, self.skipped_ids[reason][:10])

  def get_state(self) -> dict[str, Any]:
    state = {"grain": self._parent.get_state(), "skip_counts": dict(self.skip_counts),
             "skipped_ids": {reason: ids[:self.IDS_SHOWN] for reason, ids in self.skipped_ids.items()},
             "samples_seen": self.samples_seen, "consecutive_skips": self.consecutive_skips}
    if self._layout is not None:
      state["layout"] = dict(self._layout)
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    self._check_layout(state)
    try:
      self._parent.set_state(state["grain"])
    except (KeyError, IndexError, TypeError) as e:
      raise DataStateMismatchError(f"the saved data state does not fit this pipeline ({type(e).__name__}: {e}); "
                                   "resume with the data settings it was saved with") from None
    self.skip_counts = collections.Counter(state.get("skip_counts", {}))
    self.skipped_ids = collections.defaultdict(list, {k: list(v) for k, v in state.get("skipped_ids", {}).items()})
    self.samples_seen = int(state.get("samples_seen", self.num_skipped))
    self.consecutive_skips = int(state.get("consecutive_skips", 0))

  def _check_layout(self, state: dict[str, Any]) -> None:
    """Raises `DataStateMismatchError` naming each setting that differs from the saved state's."""
    if self._layout is None:
      return
    saved = state.get("layout") or {"num_workers": _saved_num_workers(state.get("grain"))}
    differ = [(key, saved[key], self._layout[key]) for key in self._layout
              if saved.get(key) is not None and saved[key] != self._layout[key]]
    if differ:
      settings = "; ".join(f"{key}={was} when saved, {now} now ({_LAYOUT_FLAGS[key]})" for key, was, now in differ)
      raise DataStateMismatchError(
          f"the data iterator state was saved with other settings: {settings}. grain's position is per worker "
          "process and per block of batch_size samples, so it cannot be carried over: resume with the saved "
          "settings, or drop the data state to restart the data order")

  def __str__(self) -> str:
    return "LlavaDataIterator"


def _runs_of(batch: dict, num_skipped: int) -> SkipRuns:
  """`SkipRuns` for a batch made without them: all skips before the samples."""
  mask = batch.get("attention_mask")
  samples = int(np.asarray(mask).any(-1).sum()) if mask is not None else 0
  return SkipRuns(samples, num_skipped, num_skipped, 0 if samples else num_skipped)


def _saved_num_workers(grain_state) -> int | None:
  """The worker count a state without a "layout" was saved with, from its shape (None: unknown)."""
  if isinstance(grain_state, dict):
    if "iterators_in_use_indices" in grain_state:  # mp_prefetch interleaves one iterator per worker
      return len(grain_state["iterators_in_use_indices"])
    if "parent" in grain_state:  # the batch iterator itself: no worker process
      return 0
  return None
