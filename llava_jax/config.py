"""Model configuration: small frozen dataclasses, read from and written to Hugging Face `config.json`.

Hugging Face configs are parsed through transformers' own config classes, so fields a hub config omits get
HF's defaults and both rope spellings (`rope_theta`/`rope_scaling` and `rope_parameters`) are normalised.
The original LLaVA format (`LlavaLlamaForCausalLM` with `mm_*` keys) is read too.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any, Mapping

IGNORE_INDEX = -100


class ConfigError(ValueError):
  """A config that cannot describe a model we can build."""


VISION_MODEL_TYPES = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT vision tower: CLIP (CLS token, pre-LayerNorm) or SigLIP (neither; a biased patch conv). The other fields
  mean the same for both; SigLIP's own values (gelu_pytorch_tanh, eps 1e-6) come from its config."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  model_type: str = "clip"  # "clip" or "siglip" (HF `clip_vision_model` / `siglip_vision_model`)

  def __post_init__(self):
    if self.model_type not in VISION_MODEL_TYPES:
      raise ConfigError(f"vision model_type {self.model_type!r} is not one of {VISION_MODEL_TYPES}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def has_cls(self) -> bool:
    """CLIP prepends a CLS token to the patches; SigLIP has none."""
    return self.model_type == "clip"

  @property
  def num_tokens(self) -> int:
    """Tokens in each hidden state: the patches, and CLS where there is one."""
    return self.num_patches + self.has_cls

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """LLaMA-family decoder. `rope_parameters` follows transformers 5 (`rope_type`, `rope_theta`, `factor`, ...).

  Biases: `attention_bias` (LLaMA's) puts one on q/k/v and o_proj, `qkv_bias` (Qwen2's) on q/k/v only.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  rope_parameters: tuple[tuple[str, Any], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qkv_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  # Mistral v0.1 (and Qwen2 windowing every layer): a key more than this many slots back is not attended
  sliding_window: int | None = None
  model_type: str = "llama"  # "llama" (LLaMA, Vicuna, Yi), "mistral" or "qwen2": the transformers class on export

  @property
  def rope(self) -> dict[str, Any]:
    return dict(self.rope_parameters)


PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
SELECT_STRATEGIES = ("default", "full")
ANYRES_SEMANTICS = ("hf", "original")
# How a prompt's text around "<image>" becomes ids: "hf" tokenizes the whole string, <image> a special token, as
# transformers' LlavaProcessor; "reference" tokenizes chunk by chunk, as the original LLaVA (and our training).
TOKENIZATIONS = ("hf", "reference")
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """The composed model. `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_index: int = 32000
  projector_type: str = "mlp2x_gelu"
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  # LLaVA-NeXT (1.6): the anyres canvases as (height, width) pairs; None for LLaVA-1.0/1.5 (one tile per image).
  image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  # Where transformers and the reference differ (unpad rounding, a tie-break): "hf" (llava-hf) or "original".
  anyres_semantics: str = "hf"
  # LLaVA-OneVision: "anyres_max_<n>" (the grid map is shrunk to about n tiles' area) marks the family; None
  # otherwise. Its videos' placeholder id (None: no videos).
  vision_aspect_ratio: str | None = None
  video_token_index: int | None = None
  # The ids the checkpoint saw: "hf" for llava-hf ones; "reference" for original-layout ones, ours, and any
  # llava_config.json written before the key existed (those were processed chunk by chunk).
  tokenization: str = "reference"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.image_grid_pinpoints is not None:
      object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(int(x) for x in p)
                                                             for p in self.image_grid_pinpoints))
      if not self.image_grid_pinpoints or any(len(p) != 2 for p in self.image_grid_pinpoints):
        raise ConfigError(f"image_grid_pinpoints {self.image_grid_pinpoints} must be (height, width) pairs")
      if self.vision_feature_select_strategy != "default" and self.vision_aspect_ratio is None:
        raise ConfigError("LLaVA-NeXT's unpadded grid needs vision_feature_select_strategy 'default' (CLS dropped)")
    if self.vision_aspect_ratio is not None:
      tail = self.vision_aspect_ratio.removeprefix("anyres_max_")
      if tail == self.vision_aspect_ratio or not tail.isdigit():
        raise ConfigError(f"vision_aspect_ratio {self.vision_aspect_ratio!r} is not 'anyres_max_<n>'")
    if self.anyres_semantics not in ANYRES_SEMANTICS:
      raise ConfigError(f"anyres_semantics {self.anyres_semantics!r} is not one of {ANYRES_SEMANTICS}")
    if self.tokenization not in TOKENIZATIONS:
      raise ConfigError(f"tokenization {self.tokenization!r} is not one of {TOKENIZATIONS}")
    if self.tokenization == "hf" and not 0 <= self.image_token_index < self.text.vocab_size:
      raise ConfigError(f"tokenization 'hf' needs the image token in the vocabulary; image_token_index "
                        f"{self.image_token_index} is outside it ({self.text.vocab_size}): use 'reference'")
    if self.text.model_type not in TEXT_MODEL_TYPES:
      raise ConfigError(f"text model_type {self.text.model_type!r} is not one of {TEXT_MODEL_TYPES}")
    if self.projector_type not in PROJECTOR_TYPES:
      raise ConfigError(f"projector_type {self.projector_type!r} is not one of {PROJECTOR_TYPES}")
    if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
      raise ConfigError(
          f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not one of {SELECT_STRATEGIES}")
    if isinstance(self.vision_feature_layer, list):
      object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
    n = self.vision.num_hidden_layers
    for layer in self.feature_layers:
      if not -(n + 1) <= layer <= n:
        raise ConfigError(f"vision_feature_layer {layer} is outside the {n + 1} hidden states of the vision tower")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    layer = self.vision_feature_layer
    return (layer,) if isinstance(layer, int) else tuple(layer)

  @property
  def is_next(self) -> bool:
    """LLaVA-NeXT (and OneVision, built on it): anyres tiles, the unpadded grid and `image_newline`."""
    return self.image_grid_pinpoints is not None or self.vision_aspect_ratio is not None

  @property
  def is_onevision(self) -> bool:
    """LLaVA-OneVision: anyres with the grid map shrunk ("anyres_max_9"), base-only multi-image, pooled video."""
    return self.vision_aspect_ratio is not None

  @property
  def layer_counts(self) -> dict[str, int]:
    """Layers per stack, keyed by the module holding it (`tree.relayout`'s `counts`)."""
    return {"language_model": self.text.num_hidden_layers, "encoder": self.vision.num_hidden_layers}

  @property
  def num_image_tokens(self) -> int:
    """Image tokens one image turns into: the tower's tokens less the first for the `default` strategy (CLIP's
    CLS; for SigLIP, as transformers does, the first patch)."""
    return self.vision.num_tokens - (self.vision_feature_select_strategy == "default")

  def replace(self, **changes) -> "LlavaConfig":
    return dataclasses.replace(self, **changes)

  # -- Hugging Face ---------------------------------------------------------------------------------------------

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "LlavaConfig":
    """Reads a `llava` config.json (llava-hf layout) or an original LLaVA one (`LlavaLlamaForCausalLM`).

    For the original format the vision tower is named by `mm_vision_tower`; pass `vision=` (a VisionConfig, e.g.
    from `vision_config_from_hf(clip_dir)`) since that name usually points at the hub.
    """
    raw = _read_json(path_or_dict)
    if is_original_llava(raw):
      return _from_original_llava(raw, **overrides)
    if raw.get("model_type") not in ("llava", "llava_next"):
      raise ConfigError(
          f"unknown architecture: model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')}; "
          "expected a llava-hf `llava` / `llava_next` config or an original `LlavaLlamaForCausalLM` one")
    import transformers  # heavy import, only when reading HF files

    next_ = raw["model_type"] == "llava_next"
    hf = (transformers.LlavaNextConfig if next_ else transformers.LlavaConfig).from_dict(raw)
    layer, text = hf.vision_feature_layer, _text_from_hf(hf.text_config)
    fields = dict(
        vision=_vision_from_hf(hf.vision_config),
        text=text,
        image_token_index=int(hf.image_token_id),
        projector_type="mlp2x_gelu",
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        image_grid_pinpoints=tuple(map(tuple, hf.image_grid_pinpoints)) if next_ else None,
        # Written by our export of a converted original checkpoint; transformers ignores it.
        anyres_semantics=raw.get("anyres_semantics", "hf") if next_ else "hf",
        # llava-hf checkpoints saw LlavaProcessor's ids (if their image token is a token); our export says so.
        tokenization=raw.get("tokenization", "hf" if 0 <= hf.image_token_id < text.vocab_size else "reference"),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict:
    """The transformers `LlavaConfig` (`LlavaNextConfig` for NeXT) dict that `LlavaForConditionalGeneration`
    (`LlavaNextForConditionalGeneration`) loads."""
    if self.projector_type != "mlp2x_gelu":
      raise ConfigError(
          "transformers' LlavaForConditionalGeneration only has the two-layer MLP projector; a "
          f"{self.projector_type!r} projector (LLaVA-1.0) cannot be exported to it")
    if not 0 <= self.image_token_index < self.text.vocab_size:
      raise ConfigError(
          f"image_token_index {self.image_token_index} is outside the vocabulary ({self.text.vocab_size}); "
          "transformers needs the image token inside it: add an <image> token to the vocabulary first")
    import transformers

    t = self.text
    vision = _vision_to_hf(self.vision)
    text = _text_to_hf(t)
    layer = self.vision_feature_layer
    common = dict(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=self.image_token_index,
        projector_hidden_act=self.projector_hidden_act, multimodal_projector_bias=self.projector_bias,
        vision_feature_layer=layer if isinstance(layer, int) else list(layer),
        vision_feature_select_strategy=self.vision_feature_select_strategy,
        image_seq_length=self.num_image_tokens, tie_word_embeddings=t.tie_word_embeddings)
    if self.is_next:
      out = transformers.LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints])
      out = out.to_dict()
      out["architectures"] = ["LlavaNextForConditionalGeneration"]
      if self.anyres_semantics != "hf":  # transformers computes "hf"; our loader reads this back
        out["anyres_semantics"] = self.anyres_semantics
    else:
      out = transformers.LlavaConfig(**common).to_dict()
      out["architectures"] = ["LlavaForConditionalGeneration"]
    if self.tokenization != "hf":  # transformers ignores it; our loader reads it back
      out["tokenization"] = self.tokenization
    return out

  # -- our own serialisation (the exact dataclass, dtype included) ------------------------------------------------

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "LlavaConfig":
    """From `to_dict`'s form, or a partial one (a run config's `model`): absent fields take their defaults, and
    `rope_parameters` may be a mapping."""
    d = dict(d)
    text = dict(d.pop("text"))
    rope = text.get("rope_parameters")
    if isinstance(rope, Mapping):
      text["rope_parameters"] = tuple(sorted(rope.items()))
    elif rope is not None:
      text["rope_parameters"] = tuple(tuple(kv) for kv in rope)
    if isinstance(text.get("eos_token_id"), list):
      text["eos_token_id"] = tuple(text["eos_token_id"])
    if d.get("image_grid_pinpoints") is not None:
      d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
    return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)


_VISION_CONFIGS = {"clip": ("CLIPConfig", True), "clip_vision_model": ("CLIPVisionConfig", False),
                   "siglip": ("SiglipConfig", True), "siglip_vision_model": ("SiglipVisionConfig", False)}


def vision_config_from_hf(path_or_dict) -> VisionConfig:
  """Reads a CLIP or SigLIP config.json, whole model (`clip`, `siglip`) or vision tower alone (`*_vision_model`).

  A standalone SigLIP's pooling head is allowed here: LLaVA never uses it and conversion drops its weights."""
  raw = _read_json(path_or_dict)
  if raw.get("model_type") not in _VISION_CONFIGS:
    raise ConfigError(f"unknown architecture for a vision tower: model_type={raw.get('model_type')!r}; "
                      f"expected one of {sorted(_VISION_CONFIGS)}")
  import transformers

  name, composite = _VISION_CONFIGS[raw["model_type"]]
  hf = getattr(transformers, name).from_dict(raw)
  return _vision_from_hf(hf.vision_config if composite else hf, allow_head=True)


_TEXT_MODEL_TYPES = {"llama": "llama", "llava": "llama", "llava_llama": "llama", "mistral": "mistral",
                     "llava_mistral": "mistral", "qwen2": "qwen2"}


def _text_hf_class(kind: str):
  import transformers  # heavy import, only when reading or writing HF files

  return {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
          "qwen2": transformers.Qwen2Config}[kind]


def text_config_from_hf(path_or_dict) -> TextConfig:
  """Reads a LLaMA-family config.json: LLaMA (Vicuna, Yi), Mistral or Qwen2, alone or inside an original LLaVA
  one."""
  raw = _read_json(path_or_dict)
  kind = _TEXT_MODEL_TYPES.get(raw.get("model_type"))
  if kind is None:
    raise ConfigError(f"unknown architecture for the language model: model_type={raw.get('model_type')!r}; "
                      "expected `llama`, `mistral` or `qwen2`")
  raw = {k: v for k, v in raw.items() if not k.startswith("mm_")}
  raw["model_type"] = kind
  return _text_from_hf(_text_hf_class(kind).from_dict(raw))


def _vision_from_hf(hf, allow_head: bool = False) -> VisionConfig:
  """A transformers CLIPVisionConfig or SiglipVisionConfig. Inside a LLaVA, a SigLIP pooling head
  (`vision_use_head`) is refused: its weights would be dropped, so the checkpoint could not round-trip."""
  model_type = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(hf.model_type)
  if model_type is None:
    raise ConfigError(f"unknown architecture for a vision tower: model_type={hf.model_type!r}; "
                      "expected `clip_vision_model` or `siglip_vision_model`")
  if model_type == "siglip" and getattr(hf, "vision_use_head", False) and not allow_head:
    raise ConfigError("a SigLIP tower with vision_use_head=True: LLaVA uses no pooling head and we do not keep "
                      "its weights; set vision_use_head false (llava-onevision's towers have none)")
  return VisionConfig(
      hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=hf.num_attention_heads, image_size=hf.image_size, patch_size=hf.patch_size,
      num_channels=hf.num_channels, layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act,
      model_type=model_type)


def _vision_to_hf(v: VisionConfig):
  """The transformers vision config of `v`: CLIPVisionConfig, or SiglipVisionConfig without the pooling head."""
  import transformers

  common = dict(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
      num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
  if v.model_type == "siglip":
    return transformers.SiglipVisionConfig(**common, vision_use_head=False)
  return transformers.CLIPVisionConfig(**common)


def _text_from_hf(hf) -> TextConfig:
  model_type = getattr(hf, "model_type", "llama")
  if model_type not in TEXT_MODEL_TYPES:
    raise ConfigError(f"unknown architecture for the language model: model_type={hf.model_type!r}")
  rope = dict(hf.rope_parameters)
  rope.pop("type", None)  # legacy alias of rope_type
  if rope.get("rope_type", "default") not in ("default", "linear", "dynamic", "llama3"):
    raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported (default, linear, dynamic, llama3)")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  eos, qwen2 = hf.eos_token_id, model_type == "qwen2"
  window = (getattr(hf, "sliding_window", None) if model_type == "mistral" else
            _qwen2_window(hf) if qwen2 else None)
  return TextConfig(
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


def _text_to_hf(t: TextConfig):
  """The transformers text config (LlamaConfig, MistralConfig or Qwen2Config) `t` exports as."""
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


_ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")


def is_original_llava(raw: dict) -> bool:
  return bool(set(_ORIGINAL_ARCHITECTURES) & set(raw.get("architectures") or [])) or "mm_vision_tower" in raw


def _from_original_llava(raw: dict, vision: VisionConfig | None = None, **overrides) -> LlavaConfig:
  """Original LLaVA: a LLaMA config plus `mm_*` keys; the image token is spliced, so it gets the id one past the
  vocabulary (it never reaches the embedding table)."""
  if vision is None:
    raise ConfigError(
        f"an original LLaVA config names its vision tower as {raw.get('mm_vision_tower')!r}; pass the CLIP "
        "checkpoint directory (--clip DIR) so its config can be read")
  projector = raw.get("mm_projector_type", "linear")
  if projector not in PROJECTOR_TYPES:
    raise ConfigError(f"mm_projector_type {projector!r} is not one of {PROJECTOR_TYPES}")
  if raw.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
    raise ConfigError(f"mm_hidden_size {raw['mm_hidden_size']} does not match the CLIP hidden size "
                      f"{vision.hidden_size}")
  select = {"patch": "default", "cls_patch": "full"}.get(raw.get("mm_vision_select_feature", "patch"))
  if select is None:
    raise ConfigError(f"mm_vision_select_feature {raw['mm_vision_select_feature']!r} is not `patch` or `cls_patch`")
  text = text_config_from_hf(raw)
  pinpoints = None
  if raw.get("image_aspect_ratio") == "anyres" or "spatial_unpad" in str(raw.get("mm_patch_merge_type", "")):
    # LLaVA-1.6. The list is kept literally: the reference reads its pairs as (width, height), transformers as
    # (height, width); `anyres_semantics="original"` reproduces the reference's reading (data/anyres.py).
    pinpoints = raw.get("image_grid_pinpoints") or ()
    if isinstance(pinpoints, str):  # the reference also accepts the list as a Python literal string
      pinpoints = ast.literal_eval(pinpoints)
    pinpoints = tuple(tuple(p) for p in pinpoints)
    if not pinpoints:
      raise ConfigError("an anyres (LLaVA-1.6) config without image_grid_pinpoints")
  fields = dict(vision=vision, text=text, image_token_index=text.vocab_size, projector_type=projector,
                projector_hidden_act="gelu", projector_bias=True,
                vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
                vision_feature_select_strategy=select, image_grid_pinpoints=pinpoints,
                anyres_semantics="original" if pinpoints else "hf", tokenization="reference")
  fields.update(overrides)
  return LlavaConfig(**fields)


def _read_json(path_or_dict) -> dict:
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json at {path}")
  with open(path) as f:
    return json.load(f)


def _listify(x):
  return list(x) if isinstance(x, tuple) else x
