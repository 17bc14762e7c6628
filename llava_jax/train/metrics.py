"""Training metrics: per-step records to WORKDIR/metrics.jsonl, TensorBoard and the console, with an MFU estimate
against the device's peak, the count of skipped non-finite steps (`nonfinite_steps`) and, at log steps, extra
scalars such as the data pipeline's skip summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np

log = logging.getLogger(__name__)

# Dense bf16 peak per JAX device, for the MFU estimate (first match of the device kind wins).
PEAK_FLOPS = (("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12),
              ("v5", 459e12), ("v4", 275e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12))


class NonfiniteLossError(RuntimeError):
  """Too many steps in a row had a non-finite loss or gradients (their updates were skipped): the run diverged.
  No checkpoint was written from them; the CLI exits with NONFINITE_EXIT_CODE."""


NONFINITE_EXIT_CODE = 3


class NonfiniteGuard:
  """Counts steps whose update the train step skipped (metric "nonfinite") and stops the run after
  `max_consecutive` of them in a row."""

  def __init__(self, max_consecutive: int, write=print):
    self.max_consecutive, self.write = max_consecutive, write
    self.total = self.in_a_row = 0

  def __call__(self, record: dict) -> None:
    if not record.get("nonfinite"):
      self.in_a_row = 0
      return
    self.total += 1
    self.in_a_row += 1
    self.write(f"step {record['step']}: non-finite loss or gradients (loss {record.get('loss')}, grad_norm "
               f"{record.get('grad_norm')}): update skipped, {self.in_a_row} in a row, {self.total} in this run")
    if self.in_a_row >= self.max_consecutive:
      raise NonfiniteLossError(
          f"{self.in_a_row} steps in a row (up to step {record['step']}) had a non-finite loss or gradients "
          f"(config.nonfinite.max_consecutive={self.max_consecutive}); the run diverged: lower "
          "--config.optimizer.lr, check the data, or raise --config.optimizer.warmup_ratio; the checkpoints "
          "written before are intact")


def host_value(x) -> np.ndarray:
  """A replicated array's value, read from this host's first shard (works with several hosts)."""
  return np.asarray(x.addressable_data(0))


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind.lower()
  return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


class MetricLogger:
  """Per-step metrics to WORKDIR/metrics.jsonl, TensorBoard event files in WORKDIR, and the console.

  Metrics are read one step late, so the host never waits for the device before dispatching the next step.
  """

  def __init__(self, workdir: str, start: int, total: int, *, every: int, progress: bool, tensorboard: bool,
               flops_fn, peak_flops: float | None, enabled: bool, observers=(), extra_fn=None):
    """`observers(record)` see each step's record before it is written (and may raise to stop the run);
    `extra_fn()` gives scalars added to the records of log steps (e.g. the data skip summary)."""
    self.enabled, self.every, self.total = enabled, max(1, every), total
    self.observers, self.extra_fn = list(observers), extra_fn
    self.nonfinite_steps = 0
    self.flops_fn, self.peak_flops = flops_fn, peak_flops
    self._pending = None
    self._last_ready = time.perf_counter()
    self.history: list[dict] = []
    self._file = self._tb = self._bar = None
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    torn = os.path.exists(path) and os.path.getsize(path) > 0 and _last_byte(path) != b"\n"
    self._file = open(path, "a", buffering=1)
    if torn:  # a killed run's half-written line: end it so the next record starts on its own line
      self._file.write("\n")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(workdir, purge_step=start if start > 0 else None)
      except ImportError:
        log.warning("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)")
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

  def push(self, step: int, metrics, excluded_seconds: float = 0.0) -> None:
    """Records the (device) metrics of `step` and writes out those of the step before. `excluded_seconds` (its
    compilation) are left out of its step time."""
    self.flush()
    self._pending = (step, metrics, excluded_seconds)

  def skip(self, seconds: float) -> None:
    """Leaves host time spent between steps (a checkpoint save) out of the next step's time."""
    self._last_ready += seconds

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics, excluded = self._pending
    self._pending = None
    values = {k: host_value(v).item() for k, v in metrics.items()}
    now = time.perf_counter()
    step_time, self._last_ready = max(now - self._last_ready - excluded, 1e-9), now
    self.nonfinite_steps += int(values.get("nonfinite", 0))
    values["nonfinite_steps"] = self.nonfinite_steps
    if self.extra_fn is not None and (step % self.every == 0 or step == self.total):
      values.update(self.extra_fn() or {})
    values["step_time"] = step_time
    values["tokens_per_s"] = values["supervised_tokens"] / step_time
    flops = self.flops_fn()
    if flops and self.peak_flops:
      values["mfu"] = flops / step_time / self.peak_flops
    record = {"step": step, **values}
    self.history.append(record)
    try:
      if self.enabled:
        self._write_record(record, step_time)
    finally:
      for observe in self.observers:  # on every host: all of them stop together
        observe(record)

  def _write_record(self, record: dict, step_time: float) -> None:
    step, values = record["step"], {k: v for k, v in record.items() if k != "step"}
    self._file.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"train/{k}", v, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
    if step % self.every == 0 or step == self.total:
      line = (f"step {step}/{self.total} loss {values['loss']:.4f} lr {values['lr']:.3e} grad_norm "
              f"{values['grad_norm']:.3f} tokens/s {values['tokens_per_s']:.0f} step {step_time:.3f}s")
      if "mfu" in values:
        line += f" mfu {100 * values['mfu']:.1f}%"
      if values["nonfinite_steps"]:
        line += f" nonfinite_steps {values['nonfinite_steps']}"
      if values.get("skipped/total"):
        line += f" skipped {values['skipped/total']:.0f} ({100 * values.get('skipped/fraction', 0):.2f}%)"
      self.write(line)

  def write(self, line: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def close(self) -> None:
    self.flush()
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()


def _last_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)
