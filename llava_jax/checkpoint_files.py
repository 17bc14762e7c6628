"""The on-disk layout of checkpoints and training workdirs: names, the config file, assets, atomic writes.

A leaf module (stdlib and `llava_jax.config` only), so that inference loading (`llava_jax.checkpoint`) and the
trainer (`llava_jax.train.checkpointing`) agree on the format without importing each other.

  CKPT/llava_config.json     our LlavaConfig, exactly
  CKPT/params/part-NNNNN/    Orbax (StandardCheckpointer) trees, slices of the nested params dict (string keys)
  CKPT/assets/               tokenizer and image-processor files (and generation_config.json), as HF wrote them

  WORKDIR/llava_config.json, WORKDIR/assets/   as a checkpoint's, so `load_checkpoint(WORKDIR)` works
  WORKDIR/config.json                          the run config (ml_collections, as JSON)
  WORKDIR/checkpoints/<step>/params            {"model": params, "lora": adapters (lora stage only)}
                            /opt_state         {"step": int32, "opt_state": optax state}
                            /meta              {"step", "stage", "lora": {"r", "alpha"} or null}
                            /data              the data iterator's state, one JSON file per host
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig

CONFIG_NAME = "llava_config.json"
PARAMS_DIR = "params"
ASSETS_DIR = "assets"
ASSET_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
               "chat_template.jinja", "generation_config.json")

RUN_CONFIG_NAME = "config.json"
CHECKPOINTS = "checkpoints"
# The items of one training step's checkpoint (Orbax CheckpointManager item names, hence folder names).
PARAMS_ITEM, OPT_STATE_ITEM, META_ITEM, DATA_ITEM = "params", "opt_state", "meta", "data"


class CheckpointError(ValueError):
  """A checkpoint directory that is incomplete, corrupt or does not fit its config; the message names the path.
  `llava-jax` commands turn it into exit status 2 with the message, no traceback."""


def is_workdir(directory: str) -> bool:
  """Whether `directory` is a training workdir (its params live with the optimizer state, per step)."""
  return os.path.isdir(os.path.join(directory, CHECKPOINTS))


def assets_dir(directory: str) -> str | None:
  """The assets folder of a checkpoint or workdir, or None where it has none."""
  path = os.path.join(directory, ASSETS_DIR)
  return path if os.path.isdir(path) else None


def read_config(directory: str) -> LlavaConfig:
  """The LlavaConfig of a checkpoint or workdir; a missing, unparsable or unknown-field file is a CheckpointError
  naming the file (and the field)."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise CheckpointError(f"{directory} is not a llava-jax checkpoint: no {CONFIG_NAME}")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from a copy, or rewrite it with "
                          "LlavaConfig.to_dict()") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("text"), dict) or not isinstance(raw.get("vision"), dict):
    raise CheckpointError(f"{path}: expected a JSON object with 'text' and 'vision' objects (LlavaConfig.to_dict())")
  unknown = _unknown_fields(raw)
  if unknown:
    raise CheckpointError(f"{path}: unknown field(s) {', '.join(unknown)}; this llava-jax does not know them "
                          "(a file from a newer version, or edited by hand?)")
  try:
    return LlavaConfig.from_dict(raw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def _unknown_fields(raw: dict) -> list[str]:
  names = lambda cls: {f.name for f in dataclasses.fields(cls)}
  unknown = [k for k in raw if k not in names(LlavaConfig)]
  unknown += [f"text.{k}" for k in raw["text"] if k not in names(TextConfig)]
  unknown += [f"vision.{k}" for k in raw["vision"] if k not in names(VisionConfig)]
  return unknown


def write_text_atomic(path: str, text: str) -> None:
  """Writes `path` through a temporary sibling and os.replace: a reader (or a killed writer) never sees half a
  file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_config(directory: str, cfg: LlavaConfig) -> None:
  write_text_atomic(os.path.join(directory, CONFIG_NAME), json.dumps(cfg.to_dict(), indent=2))


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
