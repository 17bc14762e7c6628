"""Model configuration: small frozen dataclasses, read from and written to Hugging Face `config.json`.

The Hugging Face side (transformers' config classes, llava-hf and original LLaVA layouts) is `hf_config.py`;
`LlavaConfig.from_hf` / `to_hf_dict`, `vision_config_from_hf` and `text_config_from_hf` delegate to it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from llava_jax import hf_config
from llava_jax.hf_config import ConfigError, is_original_llava  # re-exported; defined there, below this module

IGNORE_INDEX = -100

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

  # -- Hugging Face (llava_jax/hf_config.py) ---------------------------------------------------------------------

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "LlavaConfig":
    """Reads a llava-hf config.json (`llava`, `llava_next`, `llava_onevision`) or an original LLaVA one
    (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`, `LlavaQwenForCausalLM`).

    For the original format the vision tower is named by `mm_vision_tower`; pass `vision=` (a VisionConfig, e.g.
    from `vision_config_from_hf(clip_dir)`) since that name usually points at the hub.
    """
    vision = overrides.pop("vision", None)
    fields = hf_config.llava_fields_from_hf(hf_config.read_json(path_or_dict),
                                            None if vision is None else dataclasses.asdict(vision))
    fields.update(overrides)
    return cls.from_dict(fields)

  def to_hf_dict(self) -> dict:
    """The transformers `LlavaConfig` (`LlavaNextConfig` for NeXT, `LlavaOnevisionConfig` for OneVision) dict
    that the matching `*ForConditionalGeneration` loads."""
    return hf_config.llava_to_hf_dict(self)

  # -- our own serialisation (the exact dataclass, dtype included) ------------------------------------------------

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "LlavaConfig":
    """From `to_dict`'s form, or a partial one (a run config's `model`): absent fields take their defaults, and
    `rope_parameters` may be a mapping."""
    d = dict(d)
    text = d.pop("text")
    text = dataclasses.asdict(text) if isinstance(text, TextConfig) else dict(text)
    rope = text.get("rope_parameters")
    if isinstance(rope, Mapping):
      text["rope_parameters"] = tuple(sorted(rope.items()))
    elif rope is not None:
      text["rope_parameters"] = tuple(tuple(kv) for kv in rope)
    if isinstance(text.get("eos_token_id"), list):
      text["eos_token_id"] = tuple(text["eos_token_id"])
    if d.get("image_grid_pinpoints") is not None:
      d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
    vision = d.pop("vision")
    return cls(vision=vision if isinstance(vision, VisionConfig) else VisionConfig(**vision), text=TextConfig(**text),
               **d)


def vision_config_from_hf(path_or_dict) -> VisionConfig:
  """Reads a CLIP or SigLIP config.json, whole model (`clip`, `siglip`) or vision tower alone (`*_vision_model`)."""
  return VisionConfig(**hf_config.vision_fields_from_hf(path_or_dict))


def text_config_from_hf(path_or_dict) -> TextConfig:
  """Reads a LLaMA-family config.json: LLaMA (Vicuna, Yi), Mistral or Qwen2, alone or inside an original LLaVA
  one."""
  return TextConfig(**hf_config.text_fields_from_hf(path_or_dict))
