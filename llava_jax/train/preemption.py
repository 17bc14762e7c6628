"""Preemption and interruption: SIGTERM (a TPU VM being reclaimed) or SIGINT (Ctrl-C) lets the current step
finish, then the loop saves and exits with 128 + the signal's number (143, 130) once the save is complete; running
the same command again resumes.

Until the loop has finished its save (and waited for it), further signals are only counted: a second SIGTERM in
quick succession, or an impatient second Ctrl-C, cannot abort a save half-way. The exit code is 143 / 130 only
when the save completed; a save that fails is an error (exit 2 for a CheckpointError, else 1).
"""

from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM     # 143: SIGTERM, state saved
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT    # 130: SIGINT (Ctrl-C), state saved
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """SIGTERM / SIGINT set a flag the loop checks after each step (several hosts agree through Orbax/JAX instead).

  `on_signal` callbacks run in the handler (keep them to setting flags, e.g. the data iterator's
  `request_stop`, so that a wait for data is interrupted too). Handlers stay installed until `__exit__`, which
  the loop leaves only after its last save has finished.
  """

  def __init__(self, manager, on_signal=()):
    self.manager, self.flag, self.signum, self.extra_signals = manager, False, None, 0
    self._on_signal = list(on_signal)
    self._previous: dict[int, object] = {}

  def __enter__(self):
    if jax.process_count() == 1:
      for signum in HANDLED_SIGNALS:
        try:
          self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
          pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.flag:
      self.extra_signals += 1  # never abort: the save in flight completes first
      return
    self.flag, self.signum = True, signum
    for callback in self._on_signal:
      callback()

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      if self.manager.reached_preemption(step):
        self.flag, self.signum = True, self.signum or signal.SIGTERM
      return self.flag
    return self.flag

  @property
  def exit_code(self) -> int:
    """128 + the first signal's number (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(self.signum or signal.SIGTERM)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
