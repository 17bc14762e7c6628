#!/usr/bin/env python3
"""Several JAX processes of one llava-jax command on this machine: a pod rehearsal before renting one.

  python launch/local.py --processes 2 --devices-per-process 4 -- \
      llava-jax train --config configs/tiny.py:stage1 --workdir runs/mh --config.mesh="(2,4,1)"

Each process gets what `jax.distributed.initialize` needs (read by `llava_jax.train.run_config`): the coordinator
127.0.0.1:PORT (a free port unless --port), its id and the process count, D fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D), JAX_PLATFORMS=cpu and gloo for cross-process collectives, and
the coordination service's heartbeat timeout (a peer silent that long makes the others abort instead of hang).

Output is streamed line by line with a `[pI]` prefix. When a process exits non-zero the others are stopped
(SIGTERM, then SIGKILL after --grace seconds) and the launcher exits with that process's status (128+N for a
signal N). SIGTERM / SIGINT to the launcher are forwarded to every process (a coordinated preemption: they save one
checkpoint and exit 143); a second one kills them. `--keep-going` waits for every process on its own instead
(to see how the others react to a failure, as on a real pod where no launcher watches).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# Environment variables the launched processes read (see llava_jax.train.run_config.maybe_initialize_distributed).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "LLAVA_JAX_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN = "LLAVA_JAX_SHUTDOWN_TIMEOUT_S"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def resolve_command(command: list[str]) -> list[str]:
  """`llava-jax ...` runs this interpreter's package (`python -m llava_jax.cli`), so no PATH or venv is needed."""
  if command and command[0] == "llava-jax":
    return [sys.executable, "-m", "llava_jax.cli", *command[1:]]
  return command


def process_env(base: dict, index: int, count: int, devices: int, port: int, heartbeat_s: int,
                shutdown_s: int) -> dict:
  env = dict(base)
  flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices}"])
  env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(count), ENV_PROCESS_ID: str(index),
              "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
              ENV_HEARTBEAT: str(heartbeat_s), ENV_SHUTDOWN: str(shutdown_s), "PYTHONUNBUFFERED": "1"})
  return env


def exit_status(returncode: int) -> int:
  """A shell's view: 128+N for a process killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


class Launcher:
  """Starts the processes, streams their output, stops them all when one fails."""

  def __init__(self, command: list[str], count: int, devices: int, port: int, heartbeat_s: int, shutdown_s: int,
               grace_s: float, keep_going: bool, out=None):
    self.command, self.count, self.grace_s, self.keep_going = command, count, grace_s, keep_going
    self.env = [process_env(os.environ, i, count, devices, port, heartbeat_s, shutdown_s) for i in range(count)]
    self.out = out or sys.stdout
    self.lock = threading.Lock()
    self.procs: list[subprocess.Popen] = []
    self.threads: list[threading.Thread] = []
    self.signals_received = 0

  def say(self, line: str) -> None:
    with self.lock:
      self.out.write(line if line.endswith("\n") else line + "\n")
      self.out.flush()

  def _stream(self, index: int, pipe) -> None:
    for raw in iter(pipe.readline, b""):
      self.say(f"[p{index}] " + raw.decode(errors="replace"))
    pipe.close()

  def start(self) -> None:
    for i in range(self.count):
      # Own session: a terminal's Ctrl-C reaches the launcher only, which forwards it once to each process.
      proc = subprocess.Popen(self.command, env=self.env[i], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
      self.procs.append(proc)
      thread = threading.Thread(target=self._stream, args=(i, proc.stdout), daemon=True)
      thread.start()
      self.threads.append(thread)
    self.say(f"[launch] started {self.count} processes (pids {[p.pid for p in self.procs]}): "
             f"{' '.join(self.command)}")

  def forward(self, signum, frame) -> None:
    del frame
    self.signals_received += 1
    if self.signals_received == 1:
      self.say(f"[launch] got {signal.Signals(signum).name}: forwarding it to every process")
      self._signal_all(signum)
    else:
      self.say("[launch] second signal: killing every process")
      self._signal_all(signal.SIGKILL, group=True)

  def _signal_all(self, signum, group: bool = False) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          if group:  # the process and anything it started (data-loading workers)
            os.killpg(proc.pid, signum)
          else:
            proc.send_signal(signum)
        except ProcessLookupError:
          pass

  def stop_rest(self) -> None:
    """SIGTERM to the processes still running, SIGKILL to their process groups after the grace period."""
    self._signal_all(signal.SIGTERM)
    deadline = time.monotonic() + self.grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(0.1)
    if any(p.poll() is None for p in self.procs):
      self.say(f"[launch] still running after {self.grace_s:g}s: SIGKILL")
      self._signal_all(signal.SIGKILL, group=True)

  def wait(self) -> int:
    """The first non-zero exit status (0 when every process succeeded)."""
    first_failure = None
    while True:
      running = False
      for i, proc in enumerate(self.procs):
        code = proc.poll()
        if code is None:
          running = True
        elif code != 0 and first_failure is None:
          first_failure = (i, code)
          how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                 else f"exited with status {code}")
          self.say(f"[launch] process {i} {how}")
          if not self.keep_going and not self.signals_received and any(p.poll() is None for p in self.procs):
            self.say("[launch] stopping the other processes")
            self.stop_rest()
      if not running:
        break
      time.sleep(0.1)
    for thread in self.threads:
      thread.join(timeout=5)
    if first_failure is None:
      self.say(f"[launch] all {self.count} processes exited with status 0")
      return 0
    return exit_status(first_failure[1])


def parse(argv: list[str]):
  if "--" not in argv:
    raise SystemExit("usage: launch/local.py --processes N --devices-per-process D [--port P] -- llava-jax COMMAND")
  split = argv.index("--")
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--processes", type=int, required=True, help="JAX processes (hosts) to start")
  p.add_argument("--devices-per-process", type=int, required=True, help="fake CPU devices in each process")
  p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  p.add_argument("--heartbeat-timeout", type=int, default=10,
                 help="seconds without heartbeats after which the coordination service declares a process dead and "
                      "the others abort (JAX's default, used on pods, is 100)")
  p.add_argument("--shutdown-timeout", type=int, default=30,
                 help="seconds a finishing process waits for the others at the shutdown barrier")
  p.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL when stopping")
  p.add_argument("--keep-going", action="store_true", help="do not stop the others when one process fails")
  args = p.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    p.error("give the command after --, e.g. -- llava-jax train --config configs/tiny.py:stage1 --workdir W")
  if args.processes < 1 or args.devices_per_process < 1:
    p.error("--processes and --devices-per-process must be at least 1")
  return args, resolve_command(command)


def main(argv: list[str] | None = None) -> int:
  args, command = parse(sys.argv[1:] if argv is None else argv)
  launcher = Launcher(command, args.processes, args.devices_per_process, args.port or free_port(),
                      args.heartbeat_timeout, args.shutdown_timeout, args.grace, args.keep_going)
  signal.signal(signal.SIGTERM, launcher.forward)
  signal.signal(signal.SIGINT, launcher.forward)
  launcher.start()
  return launcher.wait()


if __name__ == "__main__":
  sys.exit(main())
