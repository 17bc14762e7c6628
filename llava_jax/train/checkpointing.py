"""Training checkpoints: the Orbax CheckpointManager of a workdir, saving and restoring the train state, and the
run's files. The layout (`llava_jax.checkpoint_files`):

  WORKDIR/checkpoints/<step>/params      {"model": params, "lora": adapters (lora stage only)}
                            /opt_state   {"step": int32, "opt_state": optax state (no buffers for frozen leaves)}
                            /data        the data iterator's state, one JSON file per host (grain's handler)
                            /meta        {"step", "stage", "lora": {"r", "alpha"} or null}
  WORKDIR/llava_config.json            the model config; with the above, `load_checkpoint(WORKDIR)` works
  WORKDIR/config.json                  the run config
  WORKDIR/assets/                      tokenizer / processor files copied from the init checkpoint

Saves are asynchronous (the arrays are copied to host before `save` returns, so the next step may donate them);
Orbax writes each step to a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil

import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from llava_jax.checkpoint_files import (ASSETS_DIR, CHECKPOINTS, DATA_ITEM, META_ITEM, OPT_STATE_ITEM, PARAMS_ITEM,
                                        RUN_CONFIG_NAME, write_config)
from llava_jax.config import LlavaConfig
from llava_jax.lora import LoraConfig


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
  handlers = {PARAMS_ITEM: ocp.StandardCheckpointHandler(), OPT_STATE_ITEM: ocp.StandardCheckpointHandler(),
              META_ITEM: ocp.JsonCheckpointHandler(), DATA_ITEM: grain_checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINTS), options=options,
                               item_handlers=handlers)


def run_meta(stage: str, lora: LoraConfig) -> dict:
  """What a checkpoint records about its run, besides the step: a resume must use the same stage and adapters."""
  return {"stage": stage, "lora": {"r": lora.r, "alpha": lora.alpha} if stage == "lora" else None}


def _nonempty(params: dict) -> dict:
  return {k: v for k, v in params.items() if v}


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict, meta: dict,
         force: bool = False) -> bool:
  """Saves `state` (reached after `step` steps) if due (`manager.should_save`) or `force`d; returns whether a
  save started. `data_state` is the iterator's state right after reading this step's batch."""
  args = ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardSave(_nonempty(state["params"])),
      OPT_STATE_ITEM: ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
      META_ITEM: ocp.args.JsonSave(dict(meta, step=step)),
      DATA_ITEM: grain_checkpoint.CheckpointSave(_Snapshot(data_state))})
  return manager.save(step, args=args, force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]


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
  restored = manager.restore(step, args=ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardRestore(_nonempty(abstract_params)),
      OPT_STATE_ITEM: ocp.args.StandardRestore({"step": abstract_state["step"],
                                                "opt_state": abstract_state["opt_state"]}),
      DATA_ITEM: grain_checkpoint.CheckpointRestore(_Restorer(data_iterator))}))
  params = dict(restored[PARAMS_ITEM])
  params.setdefault("lora", {})
  opt_state = restored[OPT_STATE_ITEM]
  return {"step": opt_state["step"], "params": params, "opt_state": opt_state["opt_state"]}


def write_run_files(workdir: str, model_cfg: LlavaConfig, config_json: str, assets_from: str | None) -> None:
  """The model config (so the workdir loads as a checkpoint), the run config, and the init checkpoint's assets."""
  os.makedirs(workdir, exist_ok=True)
  write_config(workdir, model_cfg)
  with open(os.path.join(workdir, RUN_CONFIG_NAME), "w") as f:
    f.write(config_json)
  src = os.path.join(assets_from, ASSETS_DIR) if assets_from else None
  dst = os.path.join(workdir, ASSETS_DIR)
  if src and os.path.isdir(src) and not os.path.exists(dst):
    shutil.copytree(src, dst)
