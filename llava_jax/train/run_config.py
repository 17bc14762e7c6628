"""The run config (ml_collections, e.g. configs/tiny.py) translated into the library's objects, and checked
before anything is compiled: a bad value fails at start, naming the flag to change.
"""

from __future__ import annotations

import math
import os

import jax

from llava_jax.checkpoint_files import read_config
from llava_jax.config import LlavaConfig
from llava_jax.host_memory import cpu_only_run
from llava_jax.lora import LoraConfig
from llava_jax.models.options import ModelOptions, OptionValueError
from llava_jax.sharding import batch_axes, batch_shards, resolve_mesh_shape, rules_from_config
from llava_jax.train.batches import KINDS
from llava_jax.train.optim import OptimConfig
from llava_jax.train.recipes import check_stage, optim_groups


class ConfigValueError(ValueError):
  """A config value that cannot work; the message says which flag to change."""


DTYPES = ("float32", "bfloat16", "float16")
# Data settings only the grain pipeline (data.kind="llava") reads, with their unset values.
LLAVA_ONLY = {"json_path": "", "image_dir": "", "tfds_name": "", "tfds_data_dir": "", "tokenizer": "",
              "image_processor": "", "packing": False, "max_images_per_sample": 1}
SYNTHETIC_ONLY = {"num_distinct_batches": 0}


def model_config(config) -> LlavaConfig:
  """The model: the init checkpoint's config, else `config.model`; compute / storage dtypes from the config.
  Tokenization "reference": the pipeline tokenizes chunk by chunk, so the trained model saw those ids."""
  cfg = read_config(config.init_checkpoint) if config.init_checkpoint else LlavaConfig.from_dict(
      config.model.to_dict())
  return cfg.replace(dtype=config.dtype, param_dtype=config.param_dtype, tokenization="reference")


def optim_config(config) -> OptimConfig:
  o = config.optimizer
  return OptimConfig(lr=o.lr, projector_lr=o.projector_lr, warmup_ratio=o.warmup_ratio,
                     weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
                     vision_tower_lr=o.get("vision_tower_lr"),
                     train_vision_tower=bool(config.get("train_vision_tower", False)),
                     groups=tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in o.get("groups", ())))


def model_options(config) -> ModelOptions:
  """How the run's model runs: the config keys of `ModelOptions`' names, which checks them (the error names the
  flag to change)."""
  try:
    return ModelOptions(attention_impl=config.attention_impl, scan_layers=config.scan_layers, remat=config.remat,
                        seq_chunk=config.seq_chunk)
  except OptionValueError as e:
    raise ConfigValueError(f"config.{e}; set --config.{e.field}") from None


def lora_config(config) -> LoraConfig:
  return LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout)


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
  if config.data.kind not in KINDS:
    raise ConfigValueError(f"config.data.kind={config.data.kind!r} is not one of {KINDS}")
  _check_numbers(config)
  _check_groups(config)
  _check_data(config.data)
  if config.total_steps < 1:
    raise ConfigValueError(f"config.total_steps={config.total_steps}: set --config.total_steps to at least 1")
  model_options(config)
  if config.stage == "lora" and config.lora.r < 1:
    raise ConfigValueError(f"config.lora.r={config.lora.r}: the LoRA rank must be at least 1")
  if config.init_checkpoint and not os.path.isdir(config.init_checkpoint):
    raise ConfigValueError(f"config.init_checkpoint={config.init_checkpoint!r} is not a directory; give one "
                           "written by `llava-jax convert`")
  b, accum = config.batch_size, config.grad_accum_steps
  if accum < 1:
    raise ConfigValueError(f"config.grad_accum_steps={accum}: use 1 or more")
  rules = rules_from_config(config.sharding_rules)
  shards = batch_shards(mesh_shape, rules)
  if b % process_count:
    raise ConfigValueError(f"config.batch_size={b} is not divisible by the {process_count} hosts; set "
                           f"--config.batch_size to a multiple of {process_count}")
  if b % accum or (b // accum) % shards:
    raise ConfigValueError(
        f"config.batch_size={b} with grad_accum_steps={accum} gives micro-batches of {b / accum:g} rows, which "
        f"the {shards} batch shards of mesh {mesh_shape} ({' x '.join(batch_axes(mesh_shape, rules))}) cannot "
        f"split evenly; set --config.batch_size to a multiple of {shards * accum} (or change --config.mesh / "
        "grad_accum_steps)")
  return mesh_shape


def _check_numbers(config) -> None:
  """Optimiser settings (finite, in range), batch, checkpointing, dtypes: each error names its flag."""
  o = config.optimizer

  def need(ok: bool, flag: str, value, what: str):
    if not ok:
      raise ConfigValueError(f"config.{flag}={value!r}: {what}; set --config.{flag}")

  finite = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  need(finite(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "the learning rate must be a finite number > 0")
  need(o.projector_lr is None or (finite(o.projector_lr) and o.projector_lr > 0), "optimizer.projector_lr",
       o.projector_lr, "the projector's learning rate must be a finite number > 0 (or unset: lr)")
  vision_lr = o.get("vision_tower_lr")
  need(vision_lr is None or (finite(vision_lr) and vision_lr >= 0), "optimizer.vision_tower_lr", vision_lr,
       "the vision tower's learning rate must be a finite number >= 0 (or unset: lr)")
  need(not config.get("train_vision_tower", False) or config.stage == "stage2", "train_vision_tower",
       config.get("train_vision_tower"), f"only stage2 trains the vision tower (as LLaVA-1.6), not {config.stage}")
  need(finite(o.warmup_ratio) and 0 <= o.warmup_ratio < 1, "optimizer.warmup_ratio", o.warmup_ratio,
       "use a value in [0, 1)")
  for name in ("b1", "b2"):
    value = o[name]
    need(finite(value) and 0 <= value < 1, f"optimizer.{name}", value, "Adam's betas must be in [0, 1)")
  need(finite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "Adam's eps must be a finite number > 0")
  need(finite(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
       "use a finite number >= 0")
  need(finite(o.clip_norm) and o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm,
       "use a finite number >= 0 (0: no clipping)")
  need(config.batch_size >= 1, "batch_size", config.batch_size, "the global batch needs at least 1 row")
  need(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep,
       "keep at least 1 checkpoint (0 would delete every checkpoint, the final one too)")
  need(config.checkpoint.every_steps >= 0, "checkpoint.every_steps", config.checkpoint.every_steps,
       "use 0 (save only at the end and on preemption) or more")
  need(config.nonfinite.max_consecutive >= 1, "nonfinite.max_consecutive", config.nonfinite.max_consecutive,
       "stop after at least 1 non-finite step in a row")
  need(config.log.every_steps >= 1, "log.every_steps", config.log.every_steps, "use 1 or more")
  for flag in ("dtype", "param_dtype"):
    need(config[flag] in DTYPES, flag, config[flag], f"use one of {', '.join(DTYPES)}")
  need(config.data.seq_len >= 2, "data.seq_len", config.data.seq_len, "use at least 2")
  frames = config.data.get("max_frames", 0)
  need(isinstance(frames, int) and frames >= 0, "data.max_frames", frames, "use 0 (no videos) or more frames")
  slots = config.data.get("max_images_per_sample", 1)
  need(isinstance(slots, int) and slots >= 1, "data.max_images_per_sample", slots,
       "use 1, or more image slots a row for LLaVA-OneVision's records of several images")


def _check_groups(config) -> None:
  """The optimizer groups (the stage's, or optimizer.groups): well-formed entries, patterns, learning rates. That
  they cover every parameter exactly once is checked when the trainer labels the model's leaves."""
  try:
    optim_groups(optim_config(config), config.stage)
  except ValueError as e:
    given = config.optimizer.get("groups", ())
    if not given:
      raise ConfigValueError(str(e)) from None
    raise ConfigValueError(f"config.optimizer.groups={given!r}: {e}; set --config.optimizer.groups") from None


def _check_data(data) -> None:
  """Settings the chosen data kind would ignore are errors: a run given a json_path must not train on random rows."""
  if data.kind == "synthetic":
    unused = [k for k, unset in LLAVA_ONLY.items() if data.get(k, unset) != unset]
    if unused:
      flags_ = ", ".join(f"--config.data.{k}" for k in unused)
      raise ConfigValueError(f"{flags_}: not used by data.kind='synthetic' (random rows); to train on that data set "
                             "--config.data.kind=llava, else drop the setting")
    return
  unused = [k for k, unset in SYNTHETIC_ONLY.items() if data.get(k, unset) != unset]
  if unused:
    raise ConfigValueError(f"{', '.join(f'--config.data.{k}' for k in unused)}: only used by "
                           f"data.kind='synthetic', not {data.kind!r}; drop the setting")
  if bool(data.json_path) == bool(data.tfds_name):
    raise ConfigValueError("data.kind='llava' reads either LLaVA JSON or a TFDS dataset: set exactly one of "
                           f"--config.data.json_path (now {data.json_path!r}) and --config.data.tfds_name (now "
                           f"{data.tfds_name!r})")
  if data.tfds_name and data.image_dir:
    raise ConfigValueError(f"--config.data.image_dir={data.image_dir!r}: not used with --config.data.tfds_name "
                           "(the TFDS records carry their images); drop it")
  if data.json_path and data.tfds_data_dir:
    raise ConfigValueError(f"--config.data.tfds_data_dir={data.tfds_data_dir!r}: only used with "
                           "--config.data.tfds_name; drop it")


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
    jax.distributed.initialize(**distributed_args(env))


# Seconds: a process silent this long is declared dead and every other one aborts (instead of hanging in a
# collective); a finishing process waits this long for the others at shutdown; startup waits this long for all.
HEARTBEAT_TIMEOUT_S, SHUTDOWN_TIMEOUT_S, INIT_TIMEOUT_S = 100, 300, 300


def distributed_args(env) -> dict:
  """`jax.distributed.initialize` arguments beyond what JAX detects itself (TPU metadata, SLURM, Open MPI):
  JAX_NUM_PROCESSES / JAX_PROCESS_ID (with JAX_COORDINATOR_ADDRESS, as launch/local.py sets them), the CPU
  collectives, and the coordination service's timeouts (LLAVA_JAX_{HEARTBEAT,SHUTDOWN,INIT}_TIMEOUT_S)."""
  args = {"heartbeat_timeout_seconds": int(env.get("LLAVA_JAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S)),
          "shutdown_timeout_seconds": int(env.get("LLAVA_JAX_SHUTDOWN_TIMEOUT_S", SHUTDOWN_TIMEOUT_S)),
          "initialization_timeout": int(env.get("LLAVA_JAX_INIT_TIMEOUT_S", INIT_TIMEOUT_S))}
  if "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env:
    args.update(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  if cpu_only_run(env):  # several CPU processes: cross-process collectives need gloo
    jax.config.update("jax_cpu_collectives_implementation", env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo"))
  return args
