"""Model checkpoints for inference: save a model, load one (or a training workdir's latest params, LoRA merged).

The layout lives in `llava_jax.checkpoint_files`. Params are written as Orbax parts of at most ~256 MiB each: the
writer holds one slice at a time, so converting a 13B model needs a few hundred MiB beyond the process, not two
copies. Writes go to a temporary sibling directory renamed into place at the end, so a failure leaves nothing
behind.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax import checkpoint_files as files
from llava_jax import lora
from llava_jax.checkpoint_files import CheckpointError, atomic_directory, copy_assets, read_config, write_config
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.models.options import ModelOptions, options_with
from llava_jax.tree import check_tree, flatten, is_stacked, keys_to_int, keys_to_str, relayout, set_path, unflatten

log = logging.getLogger(__name__)


def abstract_params(cfg: LlavaConfig) -> dict:
  """The params `cfg` describes as ShapeDtypeStructs (nested dict, int layer keys), nothing allocated."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llava(cfg)), nnx.Param))


def model_from_params(cfg: LlavaConfig, params: dict, options: ModelOptions = ModelOptions(),
                      assets_dir: str | None = None) -> Llava:
  """Builds the model around existing parameters (nested dict, per layer or stacked: `tree.relayout`) without
  initialising any; the layer weights take the form `options` ask for."""
  model = nnx.eval_shape(lambda: Llava(cfg, options=options, assets_dir=assets_dir))
  state = nnx.state(model, nnx.Param)
  expected = {path: v.get_value().shape for path, v in nnx.to_flat_state(state)}
  params = relayout(params, stacked=options.scan_layers)
  problems = check_tree(expected, {p: x.shape for p, x in flatten(params)}, "given")
  if problems:
    raise CheckpointError("parameters do not match the config:\n  " + "\n  ".join(problems[:40]))
  dtype = jnp.dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
  nnx.update(model, state)
  return model


def params_of(model: Llava) -> dict:
  """The parameters as a nested dict of arrays, one subtree per layer (int keys) whatever form the model holds."""
  return relayout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), stacked=False)


PART_BYTES = 256 * 2**20


def write_checkpoint(directory: str, cfg: LlavaConfig, params, asset_dirs=(), overwrite: bool = False,
                     part_bytes: int = PART_BYTES):
  """Saves params atomically. `params` is a nested dict or a stream of (path, array), consumed part by part."""
  import orbax.checkpoint as ocp

  stream = flatten(params) if isinstance(params, dict) else params
  with atomic_directory(directory, overwrite) as tmp:
    checkpointer, part, size, n = ocp.StandardCheckpointer(), {}, 0, 0

    def flush():
      checkpointer.save(os.path.join(tmp, files.PARAMS_DIR, f"part-{n:05d}"), keys_to_str(part))
      checkpointer.wait_until_finished()

    for path, array in stream:
      set_path(part, path, array)
      size += array.nbytes
      if size >= part_bytes:
        flush()
        part, size, n = {}, 0, n + 1
    if part:
      flush()
    write_config(tmp, cfg)
    copy_assets(asset_dirs, os.path.join(tmp, files.ASSETS_DIR))


def save_checkpoint(model: Llava, directory: str, asset_dirs=None, overwrite: bool = False):
  """Saves a model (params, config, and the assets it was loaded with) as a checkpoint directory."""
  asset_dirs = asset_dirs if asset_dirs is not None else [model.assets_dir]
  write_checkpoint(directory, model.config, params_of(model), asset_dirs, overwrite)


def restore_params(directory: str, cfg: LlavaConfig, shardings: dict | None = None) -> dict:
  """The params of a checkpoint directory, or of a training workdir's latest step (LoRA merged), one subtree per
  layer, restored straight into `shardings` (nested like the params, in either layer form; default: the first
  device) at `cfg.param_dtype`.

  Every stored shape is checked against `cfg` before anything is read; problems are named.
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  expected = {p: a.shape for p, a in flatten(abstract_params(cfg))}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  flat_shardings = (dict(flatten(relayout(shardings, False, cfg.layer_counts))) if shardings is not None else
                    {p: device for p in expected})
  if files.is_workdir(directory):
    return _restore_workdir_params(directory, cfg, expected, flat_shardings)
  params_dir = os.path.join(directory, files.PARAMS_DIR)
  parts = sorted(os.listdir(params_dir)) if os.path.isdir(params_dir) else []
  if not parts:
    raise CheckpointError(f"{directory} has no parameters ({files.PARAMS_DIR}/ is missing or empty)")
  checkpointer = ocp.StandardCheckpointer()
  stored = {}
  for part in parts:
    with _named_errors(os.path.join(params_dir, part)):
      tree = keys_to_int(stored_tree(os.path.join(params_dir, part)))
    stored.update({p: (part, m) for p, m in flatten(tree)})
  problems = check_tree(expected, {p: m.shape for p, (_, m) in stored.items()}, "stored")
  if problems:
    raise CheckpointError(f"{directory}: parameters do not match {files.CONFIG_NAME}:\n  " +
                          "\n  ".join(problems[:40]))
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  for part in parts:
    target = unflatten((path, jax.ShapeDtypeStruct(meta.shape, dtype, sharding=flat_shardings[path]))
                       for path, (p, meta) in stored.items() if p == part)
    with _named_errors(os.path.join(params_dir, part)):
      restored = checkpointer.restore(os.path.join(params_dir, part), keys_to_str(target))
    for path, array in flatten(keys_to_int(restored)):
      set_path(params, path, array)
  return params


def _restore_workdir_params(workdir: str, cfg: LlavaConfig, expected: dict, flat_shardings: dict) -> dict:
  """The model params at a training workdir's newest finished step that restores (a damaged newer one is
  skipped with a warning), LoRA adapters merged into the kernels."""
  import orbax.checkpoint as ocp

  steps = ocp.utils.checkpoint_steps(os.path.join(workdir, files.CHECKPOINTS))  # finished ones only
  if not steps:
    raise CheckpointError(f"{workdir} is a training workdir without a finished checkpoint yet")
  problems = []
  for step in sorted(steps, reverse=True):
    step_dir = os.path.join(workdir, files.CHECKPOINTS, str(step))
    try:
      with _named_errors(step_dir):
        return _restore_step_params(step_dir, cfg, expected, flat_shardings)
    except CheckpointError as e:
      problems.append(str(e))
      log.warning("%s; trying the step before", e)
  raise CheckpointError(f"no step of {workdir} restores:\n  " + "\n  ".join(problems))


def _restore_step_params(step_dir: str, cfg: LlavaConfig, expected: dict, flat_shardings: dict) -> dict:
  import orbax.checkpoint as ocp

  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, files.META_ITEM))
  if not isinstance(meta, dict):
    raise CheckpointError(f"{step_dir}/{files.META_ITEM}: not a JSON object")
  dtype = jnp.dtype(cfg.param_dtype)
  target = {"model": unflatten((p, jax.ShapeDtypeStruct(shape, dtype, sharding=flat_shardings[p]))
                               for p, shape in expected.items())}
  adapters = lora.LoraConfig(r=meta["lora"]["r"], alpha=meta["lora"]["alpha"]) if meta.get("lora") else None
  params_dir = os.path.join(step_dir, files.PARAMS_ITEM)
  stacked = bool(is_stacked(keys_to_int(stored_tree(params_dir))))
  target["model"] = relayout(target["model"], stacked)  # the layer form the run trained in (scanned: stacked)
  if adapters is not None:
    device = next(iter(flat_shardings.values()))
    target["lora"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=device),
                                  jax.eval_shape(lambda: lora.init(target["model"], adapters.r, jax.random.key(0))))
  params = ocp.StandardCheckpointer().restore(params_dir, target)
  if adapters is not None:
    params["model"] = lora.merge(params["model"], params["lora"], adapters.scale)
  return relayout(params["model"], stacked=False)


@contextlib.contextmanager
def _named_errors(path: str):
  """Orbax / TensorStore failures (bare Exceptions with pybind reprs, TypeErrors on damaged metadata) as a
  CheckpointError naming `path`."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (no common type to catch)
    text = " ".join(str(e).split())
    raise CheckpointError(f"{path} does not restore ({type(e).__name__}: {text[:300]}); the files are damaged or "
                          "incomplete: restore them from a copy") from None


def load_checkpoint(directory: str, dtype=None, attention_impl: str | None = None, *,
                    options: ModelOptions | None = None) -> Llava:
  """Loads a checkpoint written by `save_checkpoint` / `llava-jax convert`, or the latest params of a training
  workdir (LoRA merged), into a model that runs as `options` say (default: `ModelOptions()`; `attention_impl` is
  the older spelling of that option). `dtype` sets compute and storage dtype."""
  cfg = read_config(directory)
  if dtype is not None:
    cfg = cfg.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
  return model_from_params(cfg, restore_params(directory, cfg), options_with(options, attention_impl=attention_impl),
                           assets_dir=files.assets_dir(directory))


def stored_tree(path: str) -> dict:
  """The tree of array metadata (shapes, dtypes) an Orbax item directory holds, nothing read."""
  import orbax.checkpoint as ocp

  return _tree_of(ocp.StandardCheckpointer().metadata(path))


def _tree_of(metadata):
  """Orbax returns a metadata object (or a plain tree, by version); we want the tree of array metadata."""
  tree = getattr(metadata, "item_metadata", None) or getattr(metadata, "tree", None) or metadata
  try:
    return dict(tree)
  except (TypeError, ValueError):
    raise ValueError(f"unreadable array metadata ({type(metadata).__name__})") from None  # named by the caller
