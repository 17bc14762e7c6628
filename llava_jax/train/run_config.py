"""The run config (ml_collections, e.g. configs/tiny.py) translated into the library's objects, and checked
before anything is compiled: a bad value fails at start, naming the flag to change.
"""

from __future__ import annotations

import os

import jax

from llava_jax.checkpoint_files import read_config
from llava_jax.config import LlavaConfig
from llava_jax.lora import LoraConfig
from llava_jax.models.options import REMAT_POLICY_NAMES
from llava_jax.sharding import batch_axes, batch_shards, resolve_mesh_shape, rules_from_config
from llava_jax.train.batches import KINDS
from llava_jax.train.optim import OptimConfig, check_stage


class ConfigValueError(ValueError):
  """A config value that cannot work; the message says which flag to change."""


def model_config(config) -> LlavaConfig:
  """The model: the init checkpoint's config, else `config.model`; compute / storage dtypes from the config."""
  cfg = read_config(config.init_checkpoint) if config.init_checkpoint else LlavaConfig.from_dict(
      config.model.to_dict())
  return cfg.replace(dtype=config.dtype, param_dtype=config.param_dtype)


def optim_config(config) -> OptimConfig:
  o = config.optimizer
  return OptimConfig(lr=o.lr, projector_lr=o.projector_lr, warmup_ratio=o.warmup_ratio,
                     weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)


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
  if config.total_steps < 1:
    raise ConfigValueError(f"config.total_steps={config.total_steps}: set --config.total_steps to at least 1")
  if config.remat not in REMAT_POLICY_NAMES:
    raise ConfigValueError(f"config.remat={config.remat!r} is not one of {sorted(REMAT_POLICY_NAMES)}")
  if config.data.kind not in KINDS:
    raise ConfigValueError(f"config.data.kind={config.data.kind!r} is not one of {KINDS}")
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
