"""The training loop: config -> mesh, trainer, data, checkpoints; steps with metrics, checkpoint cadence and
preemption.

`train(config, workdir)` resumes from the latest checkpoint in WORKDIR if there is one (params, optimizer state,
step and data position), else starts at step 0 from `config.init_checkpoint` (a `llava-jax convert` directory) or
from a freshly initialised `config.model`. SIGTERM (TPU VM preemption) finishes the current step, saves, and
exits with status 143; start the same command again to continue.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.stack import REMAT_POLICIES
from llava_jax.sharding import make_mesh, resolve_mesh_shape, rules_from_config
from llava_jax import checkpoint as ckpt_lib
from llava_jax.train import checkpointing
from llava_jax.train import data as data_lib
from llava_jax.train.optim import OptimConfig, check_stage
from llava_jax.train.step import LoraConfig, Trainer

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM

# Dense bf16 peak per JAX device, for the MFU estimate (first match of the device kind wins).
PEAK_FLOPS = (("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12),
              ("v5", 459e12), ("v4", 275e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12))


class ConfigValueError(ValueError):
  """A config value that cannot work; the message says which flag to change."""


# -- config --------------------------------------------------------------------------------------------------


def model_config(config) -> LlavaConfig:
  """The model: the init checkpoint's config, else `config.model`; compute / storage dtypes from the config."""
  if config.init_checkpoint:
    from llava_jax.checkpoint import read_config  # pylint: disable=import-outside-toplevel
    cfg = read_config(config.init_checkpoint)
  else:
    d = config.model.to_dict()
    text = dict(d.pop("text"))
    if "rope_parameters" in text:
      rope = text["rope_parameters"]
      text["rope_parameters"] = tuple(sorted(rope.items())) if isinstance(rope, dict) else tuple(map(tuple, rope))
    cfg = LlavaConfig(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)
  return cfg.replace(dtype=config.dtype, param_dtype=config.param_dtype)


def check_config(config, num_devices: int, process_count: int = 1) -> tuple[int, int, int]:
  """Fails early, naming the flag to change; returns the resolved mesh shape."""
  try:
    check_stage(config.stage)
  except ValueError as e:
    raise ConfigValueError(str(e)) from None
  try:
    mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigValueError(str(e)) from None
  if config.total_steps < 1:
    raise ConfigValueError(f"config.total_steps={config.total_steps}: set --config.total_steps to at least 1")
  if config.remat not in REMAT_POLICIES:
    raise ConfigValueError(f"config.remat={config.remat!r} is not one of {sorted(REMAT_POLICIES)}")
  if config.data.kind not in data_lib.KINDS:
    raise ConfigValueError(f"config.data.kind={config.data.kind!r} is not one of {data_lib.KINDS}")
  if not 0 <= config.optimizer.warmup_ratio < 1:
    raise ConfigValueError(f"config.optimizer.warmup_ratio={config.optimizer.warmup_ratio}: use a value in [0, 1)")
  if config.optimizer.lr <= 0:
    raise ConfigValueError(f"config.optimizer.lr={config.optimizer.lr}: the learning rate must be positive")
  if config.stage == "lora" and config.lora.r < 1:
    raise ConfigValueError(f"config.lora.r={config.lora.r}: the LoRA rank must be at least 1")
  if config.init_checkpoint and not os.path.isdir(config.init_checkpoint):
    raise ConfigValueError(f"config.init_checkpoint={config.init_checkpoint!r} is not a directory; give one "
                           "written by `llava-jax convert`")
  b, accum = config.batch_size, config.grad_accum_steps
  if accum < 1:
    raise ConfigValueError(f"config.grad_accum_steps={accum}: use 1 or more")
  rules = rules_from_config(config.sharding_rules)
  batch_axes = dict(rules).get("batch") or ()
  shards = math.prod(mesh_shape[("data", "fsdp", "tensor").index(a)] for a in batch_axes)
  if b % process_count:
    raise ConfigValueError(f"config.batch_size={b} is not divisible by the {process_count} hosts; set "
                           f"--config.batch_size to a multiple of {process_count}")
  if b % accum or (b // accum) % shards:
    raise ConfigValueError(
        f"config.batch_size={b} with grad_accum_steps={accum} gives micro-batches of {b / accum:g} rows, which "
        f"the {shards} batch shards of mesh {mesh_shape} ({' x '.join(batch_axes)}) cannot split evenly; set "
        f"--config.batch_size to a multiple of {shards * accum} (or change --config.mesh / grad_accum_steps)")
  return mesh_shape


def optim_config(config) -> OptimConfig:
  o = config.optimizer
  return OptimConfig(lr=o.lr, projector_lr=o.projector_lr, warmup_ratio=o.warmup_ratio,
                     weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)


def maybe_initialize_distributed(mode: str) -> None:
  """`jax.distributed.initialize()` on a multi-process launch ("auto": when the environment shows one)."""
  if mode not in ("auto", "yes", "no"):
    raise ConfigValueError(f"config.distributed={mode!r} is not one of auto, yes, no")
  if mode == "no" or jax.distributed.is_initialized():
    return
  env = os.environ
  several = lambda var: int(env.get(var, "1") or 1) > 1
  hosts = env.get("TPU_WORKER_HOSTNAMES", "") or env.get("TPU_PROCESS_ADDRESSES", "")
  if mode == "yes" or "JAX_COORDINATOR_ADDRESS" in env or several("SLURM_NTASKS") or \
      several("OMPI_COMM_WORLD_SIZE") or "," in hosts:
    jax.distributed.initialize()


def host_value(x) -> np.ndarray:
  """A replicated array's value, read from this host's first shard (works with several hosts)."""
  return np.asarray(x.addressable_data(0))


# -- metrics -------------------------------------------------------------------------------------------------


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
               flops_fn, peak_flops: float | None, enabled: bool):
    self.enabled, self.every, self.total = enabled, max(1, every), total
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
    values["step_time"] = step_time
    values["tokens_per_s"] = values["supervised_tokens"] / step_time
    flops = self.flops_fn()
    if flops and self.peak_flops:
      values["mfu"] = flops / step_time / self.peak_flops
    record = {"step": step, **values}
    self.history.append(record)
    if not self.enabled:
      return
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


class _Preemption:
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


# -- the loop ------------------------------------------------------------------------------------------------


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the run `config` describes in `workdir`. Returns a summary dict."""
  maybe_initialize_distributed(config.distributed)
  workdir = os.path.abspath(workdir)
  mesh_shape = check_config(config, jax.device_count(), jax.process_count())
  cfg = model_config(config)
  mesh = make_mesh(mesh_shape)
  rules = rules_from_config(config.sharding_rules)
  lora = LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout)
  trainer = Trainer(cfg, config.stage, optim_config(config), config.total_steps, mesh, rules,
                    grad_accum_steps=config.grad_accum_steps, lora=lora, remat=config.remat,
                    scan_layers=config.scan_layers, seed=config.seed, attention_impl=config.attention_impl)
  is_main = jax.process_index() == 0
  if is_main:
    checkpointing.write_run_files(workdir, cfg, config.to_json_best_effort(indent=2), config.init_checkpoint)
  assets = os.path.join(workdir, "assets")
  data = data_lib.make_iterator(config.data, cfg, config.batch_size // jax.process_count(), seed=config.seed,
                                assets_dir=assets if os.path.isdir(assets) else (
                                    os.path.join(config.init_checkpoint, "assets") if config.init_checkpoint
                                    else None))
  manager = checkpointing.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                       config.checkpoint.async_save)
  meta = {"stage": config.stage, "lora": {"r": lora.r, "alpha": lora.alpha} if config.stage == "lora" else None}
  state = checkpointing.restore(manager, trainer.abstract_state, data, meta)
  if state is not None:
    how = f"resumed from {manager.directory} at step {host_value(state['step'])}"
  elif config.init_checkpoint:
    params = ckpt_lib.restore_params(config.init_checkpoint, cfg, trainer.state_shardings["params"]["model"])
    state, how = trainer.init_state(params), f"started from {config.init_checkpoint}"
  else:
    state, how = trainer.init_state(), "started from freshly initialised weights"
  start = int(host_value(state["step"]))
  logger = MetricLogger(workdir, start, config.total_steps, every=config.log.every_steps,
                        progress=config.log.progress, tensorboard=config.log.tensorboard,
                        flops_fn=lambda: trainer.flops_per_step,
                        peak_flops=peak_flops_per_device(config.log.peak_tflops), enabled=is_main)
  logger.write(f"{how}; stage {config.stage}, mesh {dict(zip(mesh.axis_names, mesh_shape))}, "
               f"global batch {config.batch_size} x {config.grad_accum_steps} accumulation, "
               f"{config.total_steps} steps")
  if start >= config.total_steps:
    logger.write(f"nothing to do: step {start} >= total_steps {config.total_steps}")
  preempted = False
  step = start
  with _Preemption(manager) as preemption:
    while step < config.total_steps:
      batch = next(data)
      data_state = data.get_state()
      state, metrics = trainer.step(state, batch)
      step += 1
      compile_seconds = 0.0
      if step == start + 1 and trainer.compile_seconds is not None:
        compile_seconds = trainer.compile_seconds
        logger.write(f"compiled the train step in {compile_seconds:.1f}s")
      logger.push(step, metrics, compile_seconds)
      preempted = preemption.reached(step)
      if preempted or step == config.total_steps or manager.should_save(step):
        logger.flush()  # this step's time, before the save's
        t0 = time.perf_counter()
        checkpointing.save(manager, step, state, data_state, meta, force=True)
        logger.skip(time.perf_counter() - t0)
      if preempted:
        break
  logger.close()
  manager.wait_until_finished()
  manager.close()
  if hasattr(data, "close"):
    data.close()  # the pipeline's worker processes
  if preempted:
    logger.write(f"preempted: saved step {step} in {manager.directory}; run the same command to resume")
  losses = [r["loss"] for r in logger.history]
  return {"start_step": start, "step": step, "preempted": preempted, "losses": losses,
          "final_loss": losses[-1] if losses else float("nan"), "trainer": trainer, "state": state,
          "step_time": float(np.median([r["step_time"] for r in logger.history[1:]])) if len(losses) > 1
          else None}
