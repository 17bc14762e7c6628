"""LLaVA: CLIP features from chosen hidden layers -> projector -> spliced into the token embeddings where
`input_ids == image_token_index` -> LLaMA decoder -> logits. Semantics follow transformers'
LlavaForConditionalGeneration, with positions derived from the attention mask (as HF's `generate` does) so a
left-padded row gives the logits of that row alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import LlavaConfig
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.layers import Dense, activation, torch_linear_init
from llava_jax.models.llama import LlamaModel


class MultiModalProjector(nnx.Module):
  """`linear` (LLaVA-1.0): one Linear. `mlp2x_gelu` (1.5): Linear -> GELU -> Linear. Initialised like torch's
  nn.Linear, as the reference's fresh stage-1 projector is."""

  def __init__(self, cfg: LlavaConfig, *, rngs, param_dtype, dtype):
    d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    kw = dict(use_bias=cfg.projector_bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    if cfg.projector_type == "linear":
      self.linear_1 = Dense(d_in, d, ("vision_embed", "embed"), kernel_init=torch_linear_init(d_in), **kw)
      self.linear_2 = None
    else:
      self.linear_1 = Dense(d_in, d, ("vision_embed", "mlp"), kernel_init=torch_linear_init(d_in), **kw)
      self.linear_2 = Dense(d, d, ("mlp", "embed"), kernel_init=torch_linear_init(d), **kw)
      self.act = activation(cfg.projector_hidden_act)

  def __call__(self, x):
    x = self.linear_1(x)
    return x if self.linear_2 is None else self.linear_2(self.act(x))


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


class Llava(nnx.Module):

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs | None = None, attention_impl: str = "xla"):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    kw = dict(rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype))
    self.config = cfg
    self.vision_tower = CLIPVisionTower(cfg.vision, attention_impl=attention_impl, **kw)
    self.multi_modal_projector = MultiModalProjector(cfg, **kw)
    self.language_model = LlamaModel(cfg.text, attention_impl=attention_impl, **kw)
    self.lm_head = (None if cfg.text.tie_word_embeddings else
                    Dense(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), use_bias=False, **kw))

  # -- pieces ----------------------------------------------------------------------------------------------------

  def image_features(self, pixel_values):
    """pixel_values [N, H, W, C] -> projected features [N, num_image_tokens, text hidden]."""
    n_states = self.config.vision.num_hidden_layers + 1
    layers = [l % n_states for l in self.config.feature_layers]
    hidden = self.vision_tower(pixel_values, num_layers=max(layers))
    start = 1 if self.config.vision_feature_select_strategy == "default" else 0  # default drops CLS
    features = jnp.concatenate([hidden[l][:, start:] for l in layers], axis=-1)
    return self.multi_modal_projector(features)

  def embed(self, input_ids, pixel_values=None, image_mask=None):
    """Token embeddings with image features scattered, in order, into the image-token positions.

    pixel_values: [N, H, W, C] (or [B, M, H, W, C], flattened row-major); image_mask [N] (or [B, M]) marks
    real images, so a fixed-shape batch can carry blank slots for rows without one.
    """
    image_token = self.config.image_token_index
    is_image = input_ids == image_token
    # The placeholder id may lie outside the vocabulary (original LLaVA); its embedding is replaced anyway.
    embeds = self.language_model.embed_tokens(jnp.where(is_image, 0, input_ids))
    if pixel_values is None:
      if _is_concrete(input_ids) and bool(is_image.any()):
        raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id {image_token}) but no "
                         "pixel_values were given")
      return embeds
    if pixel_values.ndim == 5:
      pixel_values = pixel_values.reshape(-1, *pixel_values.shape[2:])
      image_mask = None if image_mask is None else image_mask.reshape(-1)
    features = self.image_features(pixel_values)
    n_images, per_image, dim = features.shape
    if image_mask is not None:  # move the real images to the front, keeping their order
      order = jnp.argsort(~image_mask.astype(bool), stable=True)
      features = features[order]
    n_real = n_images if image_mask is None else jnp.sum(image_mask)
    if _is_concrete(input_ids) and _is_concrete(n_real):
      n_tokens, n_features = int(is_image.sum()), int(n_real) * per_image
      if n_tokens != n_features:
        raise ValueError(f"Image features and image tokens do not match: {n_tokens} image tokens "
                         f"(id {image_token}) in input_ids, {n_features} features "
                         f"({n_features // per_image} images x {per_image})")
    flat = features.reshape(n_images * per_image, dim).astype(embeds.dtype)
    index = jnp.cumsum(is_image.reshape(-1)) - 1
    spliced = flat[jnp.clip(index, 0, flat.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(is_image[..., None], spliced, embeds)

  def logits_from_hidden(self, hidden):
    if self.lm_head is None:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  # -- forward ---------------------------------------------------------------------------------------------------

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, image_mask=None, positions=None,
               segment_ids=None, return_hidden: bool = False):
    """input_ids [B, T] -> logits [B, T, vocab] (and all decoder hidden states if `return_hidden`).

    attention_mask [B, T] (1 = real token) gives positions cumsum - 1 and masks padded keys. For packed rows pass
    `segment_ids` [B, T] (0 = padding) and `positions`: attention stays within a segment.
    """
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32) if segment_ids is None else (segment_ids > 0)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & attention_mask[:, None, :]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    embeds = self.embed(input_ids, pixel_values, image_mask)
    hidden, _, all_hidden = self.language_model(embeds, positions, mask[:, None], return_hidden=return_hidden)
    logits = self.logits_from_hidden(hidden)
    return (logits, all_hidden) if return_hidden else logits
