"""Preemption: SIGTERM (a TPU VM being reclaimed) lets the current step finish, then the loop saves and exits with
PREEMPTED_EXIT_CODE; running the same command again resumes.
"""

from __future__ import annotations

import signal

import jax

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preemption:
  """SIGTERM sets a flag the loop checks after each step (several hosts agree through Orbax/JAX instead)."""

  def __init__(self, manager):
    self.manager, self.flag, self._previous = manager, False, None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.flag

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
