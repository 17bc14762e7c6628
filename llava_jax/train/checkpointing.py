"""Training checkpoints: an Orbax CheckpointManager in WORKDIR, and loading weights into a run.

  WORKDIR/checkpoints/<step>/params      {"model": params, "lora": adapters (lora stage only)}
                            /opt_state   {"step": int32, "opt_state": optax state (no buffers for frozen leaves)}
                            /data        the data iterator's state, one JSON file per host (grain's handler)
                            /meta        {"step", "stage", "lora": {"r", "alpha"} or null}
  WORKDIR/llava_config.json            the model config; with the above, `load_checkpoint(WORKDIR)` works
  WORKDIR/assets/                      tokenizer / processor files copied from the init checkpoint

Saves are asynchronous (the arrays are copied to host before `save` returns, so the next step may donate them);
Orbax writes each step to a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from grain import checkpoint as grain_checkpoint
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from llava_jax import checkpoint as ckpt_lib
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.train import lora as lora_lib

CHECKPOINTS = "checkpoints"


def is_workdir(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, CHECKPOINTS))


class _Snapshot:
  """A data-iterator state taken when its batch was read, in the form grain's Orbax handler saves."""

  def __init__(self, state: dict):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state).encode()


class _Restorer:
  """Hands a saved state back to a live iterator, in the form grain's Orbax handler restores."""

  def __init__(self, iterator):
    self._iterator = iterator

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


def make_manager(workdir: str, every_steps: int = 0, keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """`every_steps` <= 0 saves only when forced (the last step, preemption)."""
  policies = [save_policy.PreemptionCheckpointingPolicy()]  # no save at the first step (Orbax's default)
  if every_steps > 0:
    policies.append(save_policy.FixedIntervalPolicy(every_steps))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
      save_decision_policy=save_policy.AnySavePolicy(policies))
  handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler(), "data": grain_checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINTS), options=options,
                               item_handlers=handlers)


def _nonempty(params: dict) -> dict:
  return {k: v for k, v in params.items() if v}


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict, meta: dict,
         force: bool = False) -> bool:
  """Saves `state` (reached after `step` steps) if due (`manager.should_save`) or `force`d; returns whether a
  save started. `data_state` is the iterator's state right after reading this step's batch."""
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(_nonempty(state["params"])),
      opt_state=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
      meta=ocp.args.JsonSave(dict(meta, step=step)),
      data=grain_checkpoint.CheckpointSave(_Snapshot(data_state)))
  return manager.save(step, args=args, force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager: ocp.CheckpointManager, abstract_state: dict, data_iterator, meta: dict) -> dict | None:
  """The latest train state (placed as `abstract_state` says) and the iterator moved to its position; None if
  the workdir has no checkpoint yet."""
  step = manager.latest_step()
  if step is None:
    return None
  saved = read_meta(manager, step)
  for key in ("stage", "lora"):
    if saved.get(key) != meta.get(key):
      raise ValueError(f"{manager.directory} holds a run with {key}={saved.get(key)!r}, this config has "
                       f"{meta.get(key)!r}: use a new --workdir, or the config the run was started with")
  abstract_params = abstract_state["params"]
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_nonempty(abstract_params)),
      opt_state=ocp.args.StandardRestore({"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}),
      data=grain_checkpoint.CheckpointRestore(_Restorer(data_iterator))))
  params = dict(restored["params"])
  params.setdefault("lora", {})
  return {"step": restored["opt_state"]["step"], "params": params, "opt_state": restored["opt_state"]["opt_state"]}


# -- weights from a converted checkpoint, placed straight onto the mesh -----------------------------------------


def write_run_files(workdir: str, model_cfg: LlavaConfig, config_json: str, assets_from: str | None) -> None:
  """The model config (so the workdir loads as a checkpoint), the run config, and the init checkpoint's assets."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ckpt_lib.CONFIG_NAME), "w") as f:
    json.dump(model_cfg.to_dict(), f, indent=2)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_json)
  src = os.path.join(assets_from, ckpt_lib.ASSETS_DIR) if assets_from else None
  dst = os.path.join(workdir, ckpt_lib.ASSETS_DIR)
  if src and os.path.isdir(src) and not os.path.exists(dst):
    shutil.copytree(src, dst)


# -- `llava_jax.load_checkpoint(WORKDIR)` -------------------------------------------------------------------------


def restore_latest_params(workdir: str, cfg: LlavaConfig, flat_shardings: dict) -> dict:
  """The model params at the workdir's latest finished checkpoint, LoRA adapters merged into the kernels, restored
  into `flat_shardings` ({param path: sharding}); `llava_jax.checkpoint.restore_params` calls this."""
  steps = ocp.utils.checkpoint_steps(os.path.join(workdir, CHECKPOINTS))  # finished ones only
  if not steps:
    raise ckpt_lib.CheckpointError(f"{workdir} is a training workdir without a finished checkpoint yet")
  step_dir = os.path.join(workdir, CHECKPOINTS, str(max(steps)))
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, "meta"))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llava(cfg)), nnx.Param))
  dtype = jnp.dtype(cfg.param_dtype)
  target = {"model": jax.tree_util.tree_map_with_path(
      lambda path, a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=flat_shardings[_path_of(path)]), abstract)}
  if meta.get("lora"):
    device = next(iter(flat_shardings.values()))
    target["lora"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=device),
                                  jax.eval_shape(lambda: lora_lib.init(abstract, meta["lora"]["r"],
                                                                       jax.random.key(0))))
  params = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"), target)
  if meta.get("lora"):
    return lora_lib.merge(params["model"], params["lora"], meta["lora"]["alpha"] / meta["lora"]["r"])
  return params["model"]


def _path_of(key_path) -> tuple:
  return tuple(k.key for k in key_path)
