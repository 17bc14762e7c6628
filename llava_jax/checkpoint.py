"""Model checkpoints: an Orbax parameter tree plus everything needed to use it alone.

  CKPT/params/part-NNNNN/  Orbax (StandardCheckpointer) trees, each a slice of the nested params dict (layer
                           indices as string keys) of at most ~256 MiB: the writer holds one slice at a time, so
                           converting a 13B model needs a few hundred MiB beyond the process, not two copies
  CKPT/llava_config.json   our LlavaConfig, exactly
  CKPT/assets/             tokenizer and image-processor files (and generation_config.json), as HF wrote them

Writes go to a temporary sibling directory renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import LlavaConfig
from llava_jax.models.llava import Llava

CONFIG_NAME = "llava_config.json"
PARAMS_DIR = "params"
ASSETS_DIR = "assets"
ASSET_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
               "chat_template.jinja", "generation_config.json")


class CheckpointError(ValueError):
  """A checkpoint directory that is incomplete or does not fit its config."""


def model_from_params(cfg: LlavaConfig, params: dict, attention_impl: str = "xla") -> Llava:
  """Builds the model around existing parameters (nested dict, int layer keys) without initialising any."""
  model = nnx.eval_shape(lambda: Llava(cfg, attention_impl=attention_impl))
  state = nnx.state(model, nnx.Param)
  expected = {path: v.get_value().shape for path, v in nnx.to_flat_state(state)}
  got = dict(_flatten(params))
  problems = [f"missing {'.'.join(map(str, p))}" for p in expected if p not in got]
  problems += [f"unexpected {'.'.join(map(str, p))}" for p in got if p not in expected]
  problems += [f"wrong shape {'.'.join(map(str, p))}: {tuple(got[p].shape)} != {s}"
               for p, s in expected.items() if p in got and tuple(got[p].shape) != tuple(s)]
  if problems:
    raise CheckpointError("parameters do not match the config:\n  " + "\n  ".join(problems[:40]))
  dtype = jnp.dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
  nnx.update(model, state)
  return model


def params_of(model: Llava) -> dict:
  """The parameters as a nested dict of arrays (int keys for layers)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def set_path(tree: dict, path: tuple, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _keys_to_str(tree):
  return {str(k): _keys_to_str(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _keys_to_int(tree):
  if not isinstance(tree, dict):
    return tree
  return {(int(k) if k.isdigit() else k): _keys_to_int(v) for k, v in tree.items()}


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
  """Yields a temporary directory that becomes `path` only if the block succeeds."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; remove it or pass overwrite=True")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)


def copy_assets(src_dirs, dst: str):
  """Copies the tokenizer / processor files found in `src_dirs` (first one wins) into `dst`."""
  os.makedirs(dst, exist_ok=True)
  for name in ASSET_FILES:
    for src in src_dirs:
      if src and os.path.exists(os.path.join(src, name)):
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
        break


PART_BYTES = 256 * 2**20


def write_checkpoint(directory: str, cfg: LlavaConfig, params, asset_dirs=(), overwrite: bool = False,
                     part_bytes: int = PART_BYTES):
  """Saves params atomically. `params` is a nested dict or a stream of (path, array), consumed part by part."""
  import orbax.checkpoint as ocp

  stream = _flatten(params) if isinstance(params, dict) else params
  with atomic_directory(directory, overwrite) as tmp:
    checkpointer, part, size, n = ocp.StandardCheckpointer(), {}, 0, 0

    def flush():
      checkpointer.save(os.path.join(tmp, PARAMS_DIR, f"part-{n:05d}"), _keys_to_str(part))
      checkpointer.wait_until_finished()

    for path, array in stream:
      set_path(part, path, array)
      size += array.nbytes
      if size >= part_bytes:
        flush()
        part, size, n = {}, 0, n + 1
    if part:
      flush()
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
    copy_assets(asset_dirs, os.path.join(tmp, ASSETS_DIR))


def save_checkpoint(model: Llava, directory: str, asset_dirs=None, overwrite: bool = False):
  """Saves a model (params, config, and the assets it was loaded with) as a checkpoint directory."""
  asset_dirs = asset_dirs if asset_dirs is not None else [getattr(model, "assets_dir", None)]
  write_checkpoint(directory, model.config, params_of(model), asset_dirs, overwrite)


def read_config(directory: str) -> LlavaConfig:
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise CheckpointError(f"{directory} is not a llava-jax checkpoint: no {CONFIG_NAME}")
  with open(path) as f:
    return LlavaConfig.from_dict(json.load(f))


def restore_params(directory: str, cfg: LlavaConfig, shardings: dict | None = None) -> dict:
  """The params of a checkpoint directory, or of a training workdir's latest step (LoRA merged), restored
  straight into `shardings` (nested like the params; default: the first device) at `cfg.param_dtype`.

  Every stored shape is checked against `cfg` before anything is read; problems are named.
  """
  import orbax.checkpoint as ocp

  from llava_jax.train import checkpointing  # a training workdir keeps its params with the optimizer state

  directory = os.path.abspath(directory)
  expected = dict(_flatten(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llava(cfg)), nnx.Param))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  flat_shardings = dict(_flatten(shardings)) if shardings is not None else {p: device for p in expected}
  if checkpointing.is_workdir(directory):
    return checkpointing.restore_latest_params(directory, cfg, flat_shardings)
  params_dir = os.path.join(directory, PARAMS_DIR)
  parts = sorted(os.listdir(params_dir)) if os.path.isdir(params_dir) else []
  if not parts:
    raise CheckpointError(f"{directory} has no parameters ({PARAMS_DIR}/ is missing or empty)")
  checkpointer = ocp.StandardCheckpointer()
  stored = {}
  for part in parts:
    tree = _keys_to_int(_tree_of(checkpointer.metadata(os.path.join(params_dir, part))))
    stored.update({p: (part, m) for p, m in _flatten(tree)})
  problems = [f"missing {_dotted(p)}" for p in expected if p not in stored]
  problems += [f"unexpected {_dotted(p)}" for p in stored if p not in expected]
  problems += [f"wrong shape {_dotted(p)}: stored {tuple(stored[p][1].shape)}, config expects {tuple(v.shape)}"
               for p, v in expected.items() if p in stored and tuple(stored[p][1].shape) != tuple(v.shape)]
  if problems:
    raise CheckpointError(f"{directory}: parameters do not match {CONFIG_NAME}:\n  " + "\n  ".join(problems[:40]))
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  for part in parts:
    target = {}
    for path, (p, meta) in stored.items():
      if p == part:
        set_path(target, path, jax.ShapeDtypeStruct(meta.shape, dtype, sharding=flat_shardings[path]))
    restored = checkpointer.restore(os.path.join(params_dir, part), _keys_to_str(target))
    for path, array in _flatten(_keys_to_int(restored)):
      set_path(params, path, array)
  return params


def load_checkpoint(directory: str, dtype=None, attention_impl: str = "xla") -> Llava:
  """Loads a checkpoint written by `save_checkpoint` / `llava-jax convert`, or the latest params of a training
  workdir (LoRA merged). `dtype` sets compute and storage dtype."""
  cfg = read_config(directory)
  if dtype is not None:
    cfg = cfg.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
  model = model_from_params(cfg, restore_params(directory, cfg), attention_impl)
  assets = os.path.join(directory, ASSETS_DIR)
  model.assets_dir = assets if os.path.isdir(assets) else None
  return model


def _tree_of(metadata):
  """Orbax returns a metadata object (or a plain tree, by version); we want the tree of array metadata."""
  tree = getattr(metadata, "item_metadata", None) or getattr(metadata, "tree", None) or metadata
  return dict(tree)


def _dotted(path) -> str:
  return ".".join(map(str, path))
