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

A resume checks the workdir's model config against the run's before anything is written (`check_workdir`), then
restores the newest step that restores cleanly: steps that do not (files deleted or truncated, bad metadata) are
reported and moved to WORKDIR/checkpoints_corrupt/, never deleted. The run files are written afterwards, each
atomically. Every problem is a `CheckpointError` naming the path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from llava_jax.checkpoint_files import (ASSETS_DIR, CHECKPOINTS, CONFIG_NAME, DATA_ITEM, META_ITEM, OPT_STATE_ITEM,
                                        PARAMS_ITEM, RUN_CONFIG_NAME, CheckpointError, read_config, write_config,
                                        write_text_atomic)
from llava_jax.checkpoint import stored_tree
from llava_jax.config import LlavaConfig
from llava_jax.lora import LoraConfig
from llava_jax.tree import is_stacked, keys_to_int, relayout

log = logging.getLogger(__name__)

CORRUPT_DIR = "checkpoints_corrupt"  # steps that failed to restore, moved aside (never deleted)
# Model-config fields a resume may change: the compute dtype does not change what a checkpoint holds.
RESUMABLE_FIELDS = ("dtype",)


class _Snapshot:
  """A data-iterator state taken when its batch was read, in the form grain's Orbax handler saves."""

  def __init__(self, state: dict):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state).encode()


class _Restorer:
  """Hands a saved state back to a live iterator, in the form grain's Orbax handler restores. A state the
  iterator refuses (`refusal`: e.g. another num_workers) is the user's to fix, not a corrupt checkpoint."""

  def __init__(self, iterator):
    self._iterator = iterator
    self.refusal: Exception | None = None

  def set_state(self, state: bytes) -> None:
    decoded = json.loads(state)  # a ValueError here: the file is damaged
    try:
      self._iterator.set_state(decoded)
    except ValueError as e:
      self.refusal = e
      raise

  def start_prefetch(self) -> None:
    pass


class _DataHandler(grain_checkpoint.CheckpointHandler):
  """grain's handler (one JSON file per host), restoring on another host count too: host i reads saved host
  i mod n's file. The iterator judges that state: synthetic data (the same position on every host) continues,
  the grain pipeline (a position per host) refuses it, naming the host count."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    index, count = jax.process_index(), jax.process_count()
    path = directory / f"process_{index}-of-{count}.json"
    saved = sorted(directory.glob("process_*-of-*.json"))
    if not path.exists() and saved:
      saved_count = int(saved[0].name.rsplit("-of-", 1)[1].split(".")[0])
      path = directory / f"process_{index % saved_count}-of-{saved_count}.json"
    if not path.exists():
      raise ValueError(f"File {path} does not exist.")
    item.set_state(path.read_text().encode())
    return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: _Snapshot


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: _Restorer


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
              META_ITEM: ocp.JsonCheckpointHandler(), DATA_ITEM: _DataHandler()}
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  try:
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises bare Exceptions on damaged metadata)
    raise CheckpointError(f"{directory}: cannot open the checkpoints ({_describe(e)})") from None


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
      DATA_ITEM: _DataSave(_Snapshot(data_state))})
  return manager.save(step, args=args, force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  meta = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
  if not isinstance(meta, dict):
    raise CheckpointError(f"{_step_dir(manager, step)}/{META_ITEM}: not a JSON object")
  return meta


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _describe(e: BaseException) -> str:
  """One line for an exception from Orbax / TensorStore (whose messages can be pybind reprs many lines long)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _saved_form(manager, step: int) -> bool | None:
  """Whether the step's params hold their layers stacked (a scanned run), per layer (an unscanned run, or one saved
  before layer weights were stacked), None if that cannot be read (the restore then names the damage)."""
  try:
    return is_stacked(keys_to_int(stored_tree(os.path.join(_step_dir(manager, step), PARAMS_ITEM))))
  except Exception:  # pylint: disable=broad-except
    return None


def _restore_step(manager, step: int, abstract_state: dict, data_iterator, meta: dict,
                  layer_counts: dict | None = None) -> dict:
  """One step's state; a damaged step raises whatever Orbax raises, a mismatch of the run a CheckpointError.
  Layer weights saved in the other form (stacked or per layer) are restored as saved, then converted."""
  saved = read_meta(manager, step)
  for key in ("stage", "lora"):
    if saved.get(key) != meta.get(key):
      raise _RunMismatch(f"{manager.directory} holds a run with {key}={saved.get(key)!r}, this config has "
                         f"{meta.get(key)!r}: use a new --workdir, or the config the run was started with")
  wanted, found = is_stacked(abstract_state["params"]), _saved_form(manager, step)
  converting = None not in (wanted, found) and wanted != found
  target_state = abstract_state
  if converting:
    target_state = relayout(abstract_state, found, layer_counts)
  state = _restore_arrays(manager, step, target_state, data_iterator)
  if converting:
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    state = jax.jit(lambda s: relayout(s, wanted, layer_counts), out_shardings=shardings)(state)
  return state


def _restore_arrays(manager, step: int, abstract_state: dict, data_iterator) -> dict:
  abstract_params = abstract_state["params"]
  restored = manager.restore(step, args=ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardRestore(_nonempty(abstract_params)),
      OPT_STATE_ITEM: ocp.args.StandardRestore({"step": abstract_state["step"],
                                                "opt_state": abstract_state["opt_state"]})}))
  restorer = _Restorer(data_iterator)
  try:  # after the arrays: the iterator moves only once they restored
    manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: _DataRestore(restorer)}))
  except Exception:  # pylint: disable=broad-except
    if restorer.refusal is not None:
      raise restorer.refusal from None
    raise
  params = dict(restored[PARAMS_ITEM])
  params.setdefault("lora", {})
  opt_state = restored[OPT_STATE_ITEM]
  return {"step": opt_state["step"], "params": params, "opt_state": opt_state["opt_state"]}


class _RunMismatch(CheckpointError):
  """The workdir holds another kind of run: no older step would do either."""


def restore(manager: ocp.CheckpointManager, abstract_state: dict, data_iterator, meta: dict,
            skipped: list | None = None, layer_counts: dict | None = None) -> dict | None:
  """The newest train state that restores cleanly (placed as `abstract_state` says), the iterator moved to its
  position; None if the workdir has no checkpoint yet.

  Steps that fail to restore are appended to `skipped` as (step, reason) and the next older one is tried; a step
  of another stage / LoRA setting, or a data position the iterator refuses (another num_workers), stops at once.
  When no step restores: CheckpointError listing each step and why. `layer_counts` (`LlavaConfig.layer_counts`)
  lets a step saved in the other layer form (stacked / per layer) convert."""
  skipped = [] if skipped is None else skipped
  try:
    steps = sorted(manager.all_steps(), reverse=True)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{manager.directory}: cannot list the checkpoints ({_describe(e)})") from None
  for step in steps:
    try:
      return _restore_step(manager, step, abstract_state, data_iterator, meta, layer_counts)
    except _RunMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except  (Orbax / TensorStore errors have no common type)
      if isinstance(e, ValueError) and not isinstance(e, (CheckpointError, json.JSONDecodeError)) and \
          type(e).__module__.startswith("llava_jax"):
        raise  # the data iterator refused its saved position: the user's to fix, not the checkpoint's
      skipped.append((step, _describe(e)))
      log.warning("checkpoint %s does not restore (%s); trying the one before", _step_dir(manager, step),
                  _describe(e))
  if skipped:
    lines = "\n".join(f"  {_step_dir(manager, s)}: {why}" for s, why in skipped)
    raise CheckpointError(f"no checkpoint in {manager.directory} restores:\n{lines}\nmove the damaged steps (or the "
                          "workdir) aside to start over, or restore them from a copy")
  return None


def set_aside(manager: ocp.CheckpointManager, steps) -> list[str]:
  """Moves damaged step folders to WORKDIR/checkpoints_corrupt/ (so that saving those steps again works and
  nothing is lost); returns where they went."""
  moved = []
  root = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR)
  for step in steps:
    src = _step_dir(manager, step)
    if not os.path.exists(src):
      continue
    os.makedirs(root, exist_ok=True)
    dst = os.path.join(root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(src, dst)
    moved.append(dst)
  if moved:
    manager.reload()
  return moved


def check_workdir(workdir: str, model_cfg: LlavaConfig) -> None:
  """Before anything is written: a workdir that already holds a run must hold this model. Raises CheckpointError
  naming the differing fields (and the file) otherwise."""
  if not os.path.exists(os.path.join(workdir, CONFIG_NAME)):
    return
  saved = read_config(workdir)
  diffs = _differences(saved.to_dict(), model_cfg.to_dict())
  diffs = [d for d in diffs if d[0] not in RESUMABLE_FIELDS]
  if diffs:
    listed = "\n".join(f"  model.{k}: workdir has {a!r}, this run {b!r}" for k, a, b in diffs)
    raise CheckpointError(f"{os.path.join(workdir, CONFIG_NAME)} describes another model than this run's config:\n"
                          f"{listed}\nresume with the config the run was started with, or use a new --workdir "
                          "(nothing was written)")


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
  out = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      out += _differences(x, y, f"{prefix}{key}.")
    elif x != y:
      out.append((f"{prefix}{key}", x, y))
  return out


def write_run_files(workdir: str, model_cfg: LlavaConfig, config_json: str, assets_from: str | None) -> None:
  """The model config (so the workdir loads as a checkpoint), the run config, and the init checkpoint's assets.
  Each file is written atomically; call after a successful restore (or at a fresh start), never before."""
  os.makedirs(workdir, exist_ok=True)
  write_config(workdir, model_cfg)
  write_text_atomic(os.path.join(workdir, RUN_CONFIG_NAME), config_json)
  src = os.path.join(assets_from, ASSETS_DIR) if assets_from else None
  dst = os.path.join(workdir, ASSETS_DIR)
  if src and os.path.isdir(src) and not os.path.exists(dst):
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)
