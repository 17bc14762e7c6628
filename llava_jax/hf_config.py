"""Hugging Face `config.json` <-> our config fields, through transformers' own config classes.

Reading goes through transformers so fields a hub config omits get HF's defaults and both rope spellings
(`rope_theta`/`rope_scaling` and `rope_parameters`) are normalised. Read: llava-hf `llava`, `llava_next` and
`llava_onevision` configs, original LLaVA ones (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`, `mm_*` keys)
and the original LLaVA-OneVision one (`LlavaQwenForCausalLM`). Written: the llava-hf config of a model.

This module sits below `config.py` (which delegates to it), so it builds no dataclasses: readers return the
keyword fields of `VisionConfig` / `TextConfig` / `LlavaConfig` (the vision and text ones as dicts), and writers
read a config's attributes.
"""

from __future__ import annotations

import ast
import json
import os


class ConfigError(ValueError):
  """A config that cannot describe a model we can build (`llava_jax.config` re-exports it)."""


# -- vision towers ---------------------------------------------------------------------------------------------

_VISION_CONFIGS = {"clip": ("CLIPConfig", True), "clip_vision_model": ("CLIPVisionConfig", False),
                   "siglip": ("SiglipConfig", True), "siglip_vision_model": ("SiglipVisionConfig", False)}


def vision_fields_from_hf(path_or_dict) -> dict:
  """A CLIP or SigLIP config.json, whole model (`clip`, `siglip`) or vision tower alone (`*_vision_model`).

  A standalone SigLIP's pooling head is allowed here: LLaVA never uses it and conversion drops its weights."""
  raw = read_json(path_or_dict)
  if raw.get("model_type") not in _VISION_CONFIGS:
    raise ConfigError(f"unknown architecture for a vision tower: model_type={raw.get('model_type')!r}; "
                      f"expected one of {sorted(_VISION_CONFIGS)}")
  import transformers  # heavy import, only when reading HF files

  name, composite = _VISION_CONFIGS[raw["model_type"]]
  hf = getattr(transformers, name).from_dict(raw)
  return _vision_fields(hf.vision_config if composite else hf, allow_head=True)


def _vision_fields(hf, allow_head: bool = False) -> dict:
  """A transformers CLIPVisionConfig or SiglipVisionConfig. Inside a LLaVA, a SigLIP pooling head
  (`vision_use_head`) is refused: its weights would be dropped, so the checkpoint could not round-trip."""
  model_type = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(hf.model_type)
  if model_type is None:
    raise ConfigError(f"unknown architecture for a vision tower: model_type={hf.model_type!r}; "
                      "expected `clip_vision_model` or `siglip_vision_model`")
  if model_type == "siglip" and getattr(hf, "vision_use_head", False) and not allow_head:
    raise ConfigError("a SigLIP tower with vision_use_head=True: LLaVA uses no pooling head and we do not keep "
                      "its weights; set vision_use_head false (llava-onevision's towers have none)")
  return dict(
      hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=hf.num_attention_heads, image_size=hf.image_size, patch_size=hf.patch_size,
      num_channels=hf.num_channels, layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act,
      model_type=model_type)


def vision_to_hf(v):
  """The transformers vision config of a VisionConfig: CLIPVisionConfig, or SiglipVisionConfig without the
  pooling head."""
  import transformers

  common = dict(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
      num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
  if v.model_type == "siglip":
    return transformers.SiglipVisionConfig(**common, vision_use_head=False)
  return transformers.CLIPVisionConfig(**common)


# -- language models -------------------------------------------------------------------------------------------

_TEXT_MODEL_TYPES = {"llama": "llama", "llava": "llama", "llava_llama": "llama", "mistral": "mistral",
                     "llava_mistral": "mistral", "qwen2": "qwen2", "llava_qwen": "qwen2"}


def _text_hf_class(kind: str):
  import transformers  # heavy import, only when reading or writing HF files

  return {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
          "qwen2": transformers.Qwen2Config}[kind]


def text_fields_from_hf(path_or_dict) -> dict:
  """A LLaMA-family config.json: LLaMA (Vicuna, Yi), Mistral or Qwen2, alone or inside an original LLaVA one."""
  raw = read_json(path_or_dict)
  # the original LLaVA-OneVision's config says model_type "llava" over a Qwen2
  qwen = "LlavaQwenForCausalLM" in (raw.get("architectures") or [])
  kind = "qwen2" if qwen else _TEXT_MODEL_TYPES.get(raw.get("model_type"))
  if kind is None:
    raise ConfigError(f"unknown architecture for the language model: model_type={raw.get('model_type')!r}; "
                      "expected `llama`, `mistral` or `qwen2`")
  raw = {k: v for k, v in raw.items() if not k.startswith("mm_")}
  raw["model_type"] = kind
  return _text_fields(_text_hf_class(kind).from_dict(raw))


def _text_fields(hf) -> dict:
  model_type = getattr(hf, "model_type", "llama")
  if model_type not in ("llama", "mistral", "qwen2"):
    raise ConfigError(f"unknown architecture for the language model: model_type={hf.model_type!r}")
  rope = dict(hf.rope_parameters)
  rope.pop("type", None)  # legacy alias of rope_type
  if rope.get("rope_type", "default") not in ("default", "linear", "dynamic", "llama3"):
    raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported (default, linear, dynamic, llama3)")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  eos, qwen2 = hf.eos_token_id, model_type == "qwen2"
  window = (getattr(hf, "sliding_window", None) if model_type == "mistral" else
            _qwen2_window(hf) if qwen2 else None)
  return dict(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
      num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
      num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads, head_dim=head_dim,
      rms_norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
      rope_parameters=tuple(sorted(rope.items())), tie_word_embeddings=bool(hf.tie_word_embeddings),
      attention_bias=bool(getattr(hf, "attention_bias", False)), qkv_bias=qwen2,
      mlp_bias=bool(getattr(hf, "mlp_bias", False)), hidden_act=hf.hidden_act, bos_token_id=hf.bos_token_id,
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.pad_token_id,
      sliding_window=window, model_type=model_type)


def _qwen2_window(hf) -> int | None:
  """Qwen2 windows the layers from `max_window_layers` on (`layer_types`); we hold one window for every layer, so
  only all-full (`use_sliding_window` false, the released checkpoints) or all-windowed configs are accepted."""
  kinds = set(hf.layer_types)
  if hf.sliding_window is None or kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"}:
    return int(hf.sliding_window)
  raise ConfigError(f"Qwen2 with use_sliding_window windows only layers >= max_window_layers "
                    f"({hf.max_window_layers} of {hf.num_hidden_layers}); a window on some layers but not others is "
                    "not supported (set use_sliding_window false, or max_window_layers 0 to window every layer)")


def text_to_hf(t):
  """The transformers text config (LlamaConfig, MistralConfig or Qwen2Config) a TextConfig exports as."""
  if t.model_type == "qwen2" and (t.attention_bias or not t.qkv_bias or t.mlp_bias):
    raise ConfigError("transformers' Qwen2 has biases on q/k/v only (qkv_bias true, attention_bias and mlp_bias "
                      "false); this text config differs")
  if t.model_type != "qwen2" and t.qkv_bias and not t.attention_bias:
    raise ConfigError(f"transformers' {t.model_type} cannot hold biases on q/k/v alone (qkv_bias); use qwen2")
  extra = dict(mistral=dict(sliding_window=t.sliding_window),
               qwen2=dict(use_sliding_window=t.sliding_window is not None, sliding_window=t.sliding_window,
                          max_window_layers=0 if t.sliding_window is not None else t.num_hidden_layers),
               llama=dict(attention_bias=t.attention_bias, mlp_bias=t.mlp_bias))[t.model_type]
  return _text_hf_class(t.model_type)(
      **extra, vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
      max_position_embeddings=t.max_position_embeddings, rope_parameters=t.rope,
      tie_word_embeddings=t.tie_word_embeddings, hidden_act=t.hidden_act, bos_token_id=t.bos_token_id,
      eos_token_id=_listify(t.eos_token_id), pad_token_id=t.pad_token_id)


# -- the composed model ----------------------------------------------------------------------------------------

_HF_CLASSES = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
               "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
               "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration")}


def llava_fields_from_hf(raw: dict, vision: dict | None = None) -> dict:
  """`LlavaConfig` fields of a llava-hf config dict (`llava`, `llava_next`, `llava_onevision`) or an original one;
  `vision` (VisionConfig fields) is the tower an original config only names."""
  if is_original_llava(raw):
    return _original_fields(raw, vision)
  model_type = raw.get("model_type")
  if model_type not in _HF_CLASSES:
    raise ConfigError(
        f"unknown architecture: model_type={model_type!r}, architectures={raw.get('architectures')}; expected a "
        "llava-hf `llava` / `llava_next` / `llava_onevision` config or an original `LlavaLlamaForCausalLM` one")
  import transformers

  hf = getattr(transformers, _HF_CLASSES[model_type][0]).from_dict(raw)
  next_, onevision = model_type != "llava", model_type == "llava_onevision"
  layer, text = hf.vision_feature_layer, _text_fields(hf.text_config)
  if onevision:  # its config ties when either level says so (`LlavaOnevisionConfig`), and the top level decides
    text["tie_word_embeddings"] = bool(hf.tie_word_embeddings)
  return dict(
      vision=_vision_fields(hf.vision_config),
      text=text,
      image_token_index=int(hf.image_token_id),
      projector_type="mlp2x_gelu",
      projector_hidden_act=hf.projector_hidden_act,
      projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
      vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
      vision_feature_select_strategy=hf.vision_feature_select_strategy,
      image_grid_pinpoints=tuple(map(tuple, hf.image_grid_pinpoints)) if next_ else None,
      vision_aspect_ratio=hf.vision_aspect_ratio if onevision else None,
      # as written (our export leaves it out for a model without videos), not transformers' default
      video_token_index=_optional_int(raw.get("video_token_index")) if onevision else None,
      # Written by our export of a converted original checkpoint; transformers ignores it.
      anyres_semantics=raw.get("anyres_semantics", "hf") if next_ else "hf",
      # llava-hf checkpoints saw the processor's ids (if their image token is a token); our export says so.
      tokenization=raw.get("tokenization", "hf" if 0 <= hf.image_token_id < text["vocab_size"] else "reference"),
  )


def llava_to_hf_dict(cfg) -> dict:
  """The transformers config dict of a LlavaConfig: `LlavaConfig`, `LlavaNextConfig` (NeXT) or
  `LlavaOnevisionConfig` (OneVision), loadable by the matching `*ForConditionalGeneration`."""
  if cfg.projector_type != "mlp2x_gelu":
    raise ConfigError(
        "transformers' LlavaForConditionalGeneration only has the two-layer MLP projector; a "
        f"{cfg.projector_type!r} projector (LLaVA-1.0) cannot be exported to it")
  if not 0 <= cfg.image_token_index < cfg.text.vocab_size:
    raise ConfigError(
        f"image_token_index {cfg.image_token_index} is outside the vocabulary ({cfg.text.vocab_size}); "
        "transformers needs the image token inside it: add an <image> token to the vocabulary first")
  import transformers

  t, layer = cfg.text, cfg.vision_feature_layer
  common = dict(
      vision_config=vision_to_hf(cfg.vision).to_dict(), text_config=text_to_hf(t).to_dict(),
      image_token_index=cfg.image_token_index, projector_hidden_act=cfg.projector_hidden_act,
      multimodal_projector_bias=cfg.projector_bias, vision_feature_layer=layer if isinstance(layer, int) else
      list(layer), vision_feature_select_strategy=cfg.vision_feature_select_strategy,
      tie_word_embeddings=t.tie_word_embeddings)
  pinpoints = None if cfg.image_grid_pinpoints is None else [list(p) for p in cfg.image_grid_pinpoints]
  if cfg.is_onevision:
    kind = "llava_onevision"
    out = transformers.LlavaOnevisionConfig(**common, image_grid_pinpoints=pinpoints,
                                            vision_aspect_ratio=cfg.vision_aspect_ratio).to_dict()
    if cfg.video_token_index is None:  # transformers wants an int: its default stands in, and we read none back
      del out["video_token_index"]
    else:
      out["video_token_index"] = cfg.video_token_index
  elif cfg.is_next:
    kind = "llava_next"
    out = transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints,
                                       image_seq_length=cfg.num_image_tokens).to_dict()
  else:
    kind = "llava"
    out = transformers.LlavaConfig(**common, image_seq_length=cfg.num_image_tokens).to_dict()
  out["architectures"] = [_HF_CLASSES[kind][1]]
  if cfg.is_next and cfg.anyres_semantics != "hf":  # transformers computes "hf"; our loader reads this back
    out["anyres_semantics"] = cfg.anyres_semantics
  if cfg.tokenization != "hf":  # transformers ignores it; our loader reads it back
    out["tokenization"] = cfg.tokenization
  return out


_ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaQwenForCausalLM")


def is_original_llava(raw: dict) -> bool:
  return bool(set(_ORIGINAL_ARCHITECTURES) & set(raw.get("architectures") or [])) or "mm_vision_tower" in raw


def _original_fields(raw: dict, vision: dict | None) -> dict:
  """Original LLaVA: a LLaMA / Mistral / Qwen2 config plus `mm_*` keys; the image token is spliced, so it gets the
  id one past the vocabulary (it never reaches the embedding table).

  Its SigLIP tower (LLaVA-OneVision's) drops the checkpoint's last layer and takes the last remaining hidden
  state, every token, whatever `mm_vision_select_layer` / `_feature` say (-2 of 27 layers: -1 of the 26 kept)."""
  if vision is None:
    raise ConfigError(
        f"an original LLaVA config names its vision tower as {raw.get('mm_vision_tower')!r}; pass the CLIP / SigLIP "
        "checkpoint directory (--clip DIR) so its config can be read")
  if raw.get("mm_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
    raise ConfigError(f"mm_hidden_size {raw['mm_hidden_size']} does not match the vision tower's hidden size "
                      f"{vision['hidden_size']}")
  select = {"patch": "default", "cls_patch": "full"}.get(raw.get("mm_vision_select_feature", "patch"))
  if select is None:
    raise ConfigError(f"mm_vision_select_feature {raw['mm_vision_select_feature']!r} is not `patch` or `cls_patch`")
  layer = int(raw.get("mm_vision_select_layer", -2))
  if vision["model_type"] == "siglip":
    vision = {**vision, "num_hidden_layers": vision["num_hidden_layers"] - 1}
    layer, select = -1, "full"
  text = text_fields_from_hf(raw)
  aspect = str(raw.get("image_aspect_ratio", ""))
  onevision = aspect.startswith("anyres_max_")
  pinpoints = None
  if aspect == "anyres" or onevision or "spatial_unpad" in str(raw.get("mm_patch_merge_type", "")):
    # LLaVA-1.6. The list is kept literally: the reference reads its pairs as (width, height), transformers as
    # (height, width); `anyres_semantics="original"` reproduces the reference's reading (data/anyres.py).
    pinpoints = raw.get("image_grid_pinpoints") or ()
    if isinstance(pinpoints, str):  # the reference also accepts the list as a Python literal string
      pinpoints = ast.literal_eval(pinpoints)
    pinpoints = tuple(tuple(p) for p in pinpoints)
    if not pinpoints:
      raise ConfigError("an anyres (LLaVA-1.6 / OneVision) config without image_grid_pinpoints")
  return dict(vision=vision, text=text, image_token_index=text["vocab_size"],
              projector_type=raw.get("mm_projector_type", "linear"), projector_hidden_act="gelu",
              projector_bias=True, vision_feature_layer=layer, vision_feature_select_strategy=select,
              image_grid_pinpoints=pinpoints, vision_aspect_ratio=aspect if onevision else None,
              # OneVision's pinpoints are symmetric, so either reading finds the same canvas; the layout is "hf"'s
              anyres_semantics="original" if pinpoints and not onevision else "hf", tokenization="reference")


def read_json(path_or_dict) -> dict:
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json at {path}")
  with open(path) as f:
    return json.load(f)


def _optional_int(x):
  return None if x is None else int(x)


def _listify(x):
  return list(x) if isinstance(x, tuple) else x
