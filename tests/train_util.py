"""Shared pieces of the training tests: the tiny config, a trainer on a chosen mesh, leaves by path, and the
`llava-jax train` subprocess of the kill -9 / SIGTERM tests."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.tree import relayout

from llava_jax.sharding import make_mesh, rules_from_config
from llava_jax.train import run_config
from llava_jax.train.cli import load_config
from llava_jax.train.batches import SyntheticIterator
from llava_jax.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def tiny_config(stage: str = "stage2", **overrides):
  """configs/tiny.py:stage with dotted overrides, e.g. tiny_config("lora", **{"lora.r": 4})."""
  return load_config(f"{TINY}:{stage}", overrides)


def mesh_of(shape):
  n = int(np.prod([s for s in shape if s > 0]))
  return make_mesh(shape, jax.devices()[:n])


def make_trainer(config, mesh_shape=(1, 1, 1)) -> Trainer:
  """The Trainer `train.loop` would build for `config` (its options and sharding rules too) on a mesh of that shape."""
  return Trainer(run_config.model_config(config), config.stage, run_config.optim_config(config), config.total_steps,
                 mesh_of(mesh_shape), rules_from_config(config.sharding_rules),
                 options=run_config.model_options(config), grad_accum_steps=config.grad_accum_steps,
                 lora=run_config.lora_config(config), seed=config.seed)


def batches(config, n: int, batch_size: int | None = None, num_distinct: int = 0) -> list[dict]:
  it = SyntheticIterator(batch_size or config.batch_size, config.data.seq_len, run_config.model_config(config),
                         seed=config.seed, num_distinct=num_distinct)
  return [next(it) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _initial_params():
  config = tiny_config("stage2")
  return jax.device_get(make_trainer(config).init_state()["params"]["model"])


def initial_params() -> dict:
  """The tiny model's seeded initial params (host arrays), made once: initialising compiles slowly on CPU."""
  return jax.tree.map(np.copy, _initial_params())


def run(trainer: Trainer, batch_list, params=None):
  """(losses, final state) of one step per batch from `params` (default: `initial_params()`)."""
  state = trainer.init_state(initial_params() if params is None else params)
  losses = []
  for b in batch_list:
    state, metrics = trainer.step(state, b)
    losses.append(float(metrics["loss"]))
  return losses, state


def flat(tree) -> dict[str, np.ndarray]:
  """{"a.b.0.kernel": host array} for every leaf, layers one by one (stacked ones unstacked)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(relayout(jax.device_get(tree), stacked=False))[0]:
    out[".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)] = \
        np.asarray(jax.device_get(leaf))
  return out


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as conftest sets in this process
  return env


def logged_losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl; a step logged by several runs must have the same loss each time."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  for line in open(path) if os.path.exists(path) else []:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # a line cut by kill -9
    assert out.setdefault(record["step"], record["loss"]) == record["loss"], record
  return out


def start_training(args):
  """`llava-jax train ARGS` in a subprocess (stdout and stderr together), to be killed and restarted."""
  return subprocess.Popen([sys.executable, "-m", "llava_jax.cli", "train"] + args, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, workdir, step, timeout=120):
  """Until `step` is logged and a checkpoint is finished."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    checkpoints = os.path.join(workdir, "checkpoints")
    if max(logged_losses(workdir), default=0) >= step and os.path.isdir(checkpoints) and \
        ocp.utils.checkpoint_steps(checkpoints):
      return
    if proc.poll() is not None:
      raise AssertionError(f"training ended early:\n{proc.stdout.read()}")
    time.sleep(0.02)
  raise AssertionError("training did not reach the step in time")


def losses_killed_and_resumed(spec: str, overrides: dict, workdir: str, kill_after: int) -> list[float]:
  """`llava-jax train --config SPEC` killed with SIGKILL once step `kill_after` is logged and checkpointed, then run
  again (it resumes from its last finished checkpoint): the loss of every step, in order."""
  import signal  # pylint: disable=import-outside-toplevel

  args = ["--config", spec, "--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()]
  proc = start_training(args)
  wait_for_step(proc, workdir, kill_after)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc = start_training(args)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "resumed from" in out, out
  losses = logged_losses(workdir)
  assert sorted(losses) == list(range(1, len(losses) + 1)), sorted(losses)
  return [losses[s] for s in range(1, len(losses) + 1)]
