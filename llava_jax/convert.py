"""Hugging Face safetensors <-> our parameters: one name table, used in both directions.

The table is derived from the model itself: each parameter path (e.g. `language_model.layers.3.mlp.up_proj.kernel`)
maps to the key transformers 5 writes (`language_model.model.layers.3.mlp.up_proj.weight`) and a layout change
(`linear`: transpose; `conv`: OIHW -> HWIO). Other layouts are read by renaming their keys to that canonical one:

  llava_hf   transformers 5 `save_pretrained`, in-memory (`model.language_model.*`, `model.image_newline`) and
             hub (`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`) spellings,
             for LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (NeXT's and OneVision's `image_newline` is a
             top-level parameter; a tied model has no `lm_head`)
  clip       a CLIPModel / CLIPVisionModel checkpoint (`vision_model.*`, or bare `encoder.*` as transformers 5
             saves a CLIPVisionModel; the text tower is ignored), or the same of SigLIP (its pooling head ignored)
  llm        a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM checkpoint (`model.*`, `lm_head.*`)
  original   original LLaVA (`model.mm_projector.*`, `model.layers.*`, `lm_head.*`; 1.6 and OneVision
             (`LlavaQwenForCausalLM`) add `model.image_newline` and the trained tower
             `model.vision_tower.vision_tower.vision_model.*`), the tower's config (and, for 1.5, its weights) from
             a CLIP dir (OneVision: a SigLIP dir, whose last layer the checkpoint's tower lacks)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llava_jax.config import LlavaConfig, is_original_llava, text_config_from_hf, vision_config_from_hf
from llava_jax.models.llava import Llava, MultiModalProjector
from llava_jax.models.options import ModelOptions, options_with
from llava_jax.checkpoint import model_from_params, params_of, write_checkpoint
from llava_jax.checkpoint_files import atomic_directory, copy_assets
from llava_jax.tree import set_path
from llava_jax.safetensors_io import SafetensorsReader, write_safetensors


class ConversionError(ValueError):
  """A checkpoint that does not fit the model: the message names every offending key."""


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # our parameter path, ints for layer indices
  hf_key: str  # canonical transformers key
  kind: str  # "linear" | "conv" | "plain"
  shape: tuple  # our shape


def _hf_key(path: tuple) -> tuple[str, str]:
  *module, leaf = (str(p) for p in path)
  kind = ("conv" if module[-1:] == ["patch_embedding"] else "linear") if leaf == "kernel" else "plain"
  name = ".".join(module + [{"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)])
  if name.startswith("language_model."):
    name = "language_model.model." + name[len("language_model."):]
  elif name.startswith("lm_head."):
    name = "language_model." + name
  return name, kind


def abstract_state(cfg: LlavaConfig):
  """Shapes and logical axes of every parameter, without allocating."""
  return nnx.state(nnx.eval_shape(lambda: Llava(cfg)), nnx.Param)


def name_table(cfg: LlavaConfig) -> list[Entry]:
  table = []
  for path, var in nnx.to_flat_state(abstract_state(cfg)):
    key, kind = _hf_key(path)
    table.append(Entry(tuple(path), key, kind, tuple(var.get_value().shape)))
  return table


def to_ours(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind == "conv":  # torch OIHW -> HWIO
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return array


def to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind == "conv":  # HWIO -> OIHW
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  return array


def hf_shape(entry: Entry) -> tuple:
  return tuple(to_hf(np.empty(entry.shape, np.bool_), entry.kind).shape)


# -- key layouts -----------------------------------------------------------------------------------------------

_IGNORED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")
_LLM_RULES = [(r"^model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head.")]
RULES = {
    "llava_hf": [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.image_newline$", "image_newline"),  # LLaVA-NeXT
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^vision_tower\.vision_model\.", "vision_tower."),
        (r"^(vision_tower|multi_modal_projector|language_model)\.", r"\1."),
        (r"^image_newline$", "image_newline"),
    ],
    "clip": [
        (r"^(text_model|text_projection|visual_projection|logit_scale|logit_bias)\b", None),
        (r"^(vision_model\.)?head\.", None),  # SigLIP's pooling head: LLaVA never uses it
        (r"^vision_model\.", "vision_tower."),
        (r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.", r"vision_tower.\1."),  # CLIPVisionModel, v5
    ],
    "llm": _LLM_RULES,
    "original": [
        (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
        (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
        (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
        (r"^model\.image_newline$", "image_newline"),  # LLaVA-1.6
        *_LLM_RULES,
    ],
}


def canonical_key(key: str, layout: str) -> str | None:
  """The canonical name of `key` in `layout`; None for keys that carry no parameter (buffers, a text tower)."""
  if _IGNORED.search(key):
    return None
  for pattern, repl in RULES[layout]:
    if re.search(pattern, key):
      return None if repl is None else re.sub(pattern, repl, key, count=1)
  return "?" + key  # matches no rule: unexpected


# -- conversion ------------------------------------------------------------------------------------------------


def fresh_projector(cfg: LlavaConfig, seed: int = 0) -> dict:
  """A newly initialised projector (torch nn.Linear's init, as the reference's stage 1 starts from)."""
  proj = MultiModalProjector(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.float32, dtype=jnp.float32)
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(proj, nnx.Param))}


def iter_params(cfg: LlavaConfig, sources: list[tuple[str, str]], dtype=None, fresh_projector_seed=None,
                progress: bool = False):
  """Reads `sources` [(dir, layout)] (earlier ones win for a key found twice) as a stream of (our path, array).

  All shapes are checked, and every missing, unexpected or mis-shaped key reported, before any tensor is read;
  then tensors are read, transposed and cast one at a time, so the caller decides how many are held at once.
  `dtype` None keeps each tensor's stored dtype.
  """
  table = name_table(cfg)
  by_key = {e.hf_key: e for e in table}
  found, unexpected = {}, []
  for path, layout in sources:
    reader = SafetensorsReader(path)
    for key in reader.keys():
      canon = canonical_key(key, layout)
      if canon is None:
        continue
      if canon not in by_key:
        unexpected.append(f"{key} (in {path})")
      elif canon not in found:
        found[canon] = (reader, key)
  fresh = set()
  if fresh_projector_seed is not None:
    fresh = {e.hf_key for e in table if e.path[0] == "multi_modal_projector"}
  missing = [k for k in by_key if k not in found and k not in fresh]
  wrong = [f"{key}: checkpoint {reader.shape(key)}, model expects {hf_shape(by_key[canon])}"
           for canon, (reader, key) in found.items() if reader.shape(key) != hf_shape(by_key[canon])]
  problems = []
  for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
    if keys:
      shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
      problems.append(f"  {title} ({len(keys)}):\n    {shown}")
  if problems:
    raise ConversionError("checkpoint does not match the model config:\n" + "\n".join(problems))

  target = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  new = fresh_projector(cfg, fresh_projector_seed) if fresh else {}
  first_reader, first_key = next(iter(found.values()))
  fresh_dtype = target or first_reader.dtype(first_key)
  entries = tqdm(table, desc="converting", unit="tensor") if progress else table
  for e in entries:
    if e.hf_key in found:
      reader, key = found[e.hf_key]
      array = to_ours(reader.get(key), e.kind)
    else:  # a fresh projector leaf, in the dtype of the checkpoint's own weights
      array = new[e.path[1:]].astype(fresh_dtype)
    yield e.path, array.astype(target) if target is not None else array


def convert_to_params(cfg: LlavaConfig, sources, dtype=None, fresh_projector_seed=None) -> dict:
  """`iter_params` gathered into our nested params dict."""
  params: dict = {}
  for path, array in iter_params(cfg, sources, dtype, fresh_projector_seed):
    set_path(params, path, array)
  return params


def iter_hf_tensors(cfg: LlavaConfig, params: dict):
  """(canonical HF key, array) for every parameter, in the table's order: the export stream."""
  for e in name_table(cfg):
    value = params
    for p in e.path:
      value = value[p]
    yield e.hf_key, to_hf(np.asarray(value), e.kind)


# -- the user-facing entry points ------------------------------------------------------------------------------


def plan_conversion(hf: str | None = None, clip: str | None = None, llm: str | None = None,
                    projector_type: str = "mlp2x_gelu", dtype=None):
  """Works out (config, sources, fresh projector?, asset dirs) for the supported inputs:

  hf alone: a llava-hf directory; hf + clip: an original LLaVA checkpoint with its CLIP tower;
  clip + llm: a fresh stage-1 start (projector initialised); `clip` may be a SigLIP tower.
  """
  dtype_fields = {} if dtype is None else dict(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
  if hf is not None and llm is None:
    with open(os.path.join(hf, "config.json")) as f:
      raw = json.load(f)
    if is_original_llava(raw):
      vision = vision_config_from_hf(clip) if clip else None
      cfg = LlavaConfig.from_hf(raw, vision=vision, **dtype_fields)
      # A SigLIP tower (OneVision's) is trained, so in the checkpoint, and one layer shorter than its directory's.
      tower = [(clip, "clip")] if clip and cfg.vision.model_type == "clip" else []
      sources = [(hf, "original")] + tower
      return cfg, sources, False, [hf, clip]
    if clip is not None:
      raise ValueError(f"{hf} is a llava-hf checkpoint with its own vision tower; --clip is only for original "
                       "LLaVA checkpoints or with --llm")
    return LlavaConfig.from_hf(raw, **dtype_fields), [(hf, "llava_hf")], False, [hf]
  if clip is not None and llm is not None and hf is None:
    text, vision = text_config_from_hf(llm), vision_config_from_hf(clip)
    # SigLIP has no CLS to drop: all its patches, as LLaVA-OneVision takes them.
    select = "default" if vision.has_cls else "full"
    cfg = LlavaConfig(vision=vision, text=text, image_token_index=text.vocab_size, projector_type=projector_type,
                      vision_feature_select_strategy=select, **dtype_fields)
    return cfg, [(clip, "clip"), (llm, "llm")], True, [llm, clip]
  raise ValueError("give --hf DIR (llava-hf, or original LLaVA with --clip DIR), or --clip DIR --llm DIR")


def load_hf_checkpoint(hf: str | None = None, dtype=None, *, clip: str | None = None, llm: str | None = None,
                       projector_type: str = "mlp2x_gelu", seed: int = 0, attention_impl: str | None = None,
                       options: ModelOptions | None = None):
  """Loads Hugging Face weights straight into a model (float32 unless `dtype` is given) that runs as `options` say
  (default: `ModelOptions()`; `attention_impl` is the older spelling of that option)."""
  cfg, sources, fresh, assets = plan_conversion(hf, clip, llm, projector_type, dtype)
  params = convert_to_params(cfg, sources, dtype or "float32", seed if fresh else None)
  model = model_from_params(cfg, params, options_with(options, attention_impl=attention_impl),
                            assets_dir=next((a for a in assets if a), None))
  return model


def convert_checkpoint(out: str, hf: str | None = None, clip: str | None = None, llm: str | None = None,
                       projector_type: str = "mlp2x_gelu", dtype=None, seed: int = 0, overwrite: bool = False,
                       progress: bool = True) -> LlavaConfig:
  """HF weights -> an Orbax checkpoint directory (params, config, tokenizer and processor files)."""
  cfg, sources, fresh, assets = plan_conversion(hf, clip, llm, projector_type, dtype)
  if dtype is None:  # keep the (language model's) stored dtype, and say so in the config
    reader = SafetensorsReader(sources[-1][0])
    dtype = reader.dtype(reader.keys()[0]).name
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  stream = iter_params(cfg, sources, dtype, seed if fresh else None, progress=progress)
  write_checkpoint(out, cfg, stream, assets, overwrite)
  return cfg


def export_hf(model, out_dir: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
  """Writes a directory that transformers' LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for
  a NeXT model, LlavaOnevisionForConditionalGeneration for OneVision) loads: config, sharded safetensors in the canonical layout, and the tokenizer / processor files
  the model came with. An existing `out_dir` is refused unless `overwrite` (`--overwrite` on the CLI)."""
  hf_config = model.config.to_hf_dict()  # raises early for what transformers cannot represent
  hf_config["dtype"] = np.dtype(model.config.param_dtype).name
  with atomic_directory(out_dir, overwrite) as tmp:
    write_safetensors(iter_hf_tensors(model.config, params_of(model)), tmp, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    assets = model.assets_dir
    if assets:
      copy_assets([assets], tmp)
