"""LLaVA: CLIP (or SigLIP) features from chosen hidden layers -> projector -> spliced into the token embeddings
where `input_ids == image_token_index` -> LLaMA decoder -> logits. Semantics follow transformers'
LlavaForConditionalGeneration, with positions derived from the attention mask (as HF's `generate` does) so a
left-padded row gives the logits of that row alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.config import LlavaConfig
from llava_jax.models.attention import SelfAttentionMask, causal_mask
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.siglip import SiglipVisionTower
from llava_jax.models.layers import Dense, activation, normal_init, param, torch_linear_init
from llava_jax.models.llama import DecoderOutput, LlamaModel
from llava_jax.models.options import ModelOptions


VISION_TOWERS = {"clip": CLIPVisionTower, "siglip": SiglipVisionTower}


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


# -- positions and masks: one definition for the forward pass, prefill and decoding ------------------------------


def positions_from_mask(attention_mask):
  """Positions cumsum(mask) - 1 (what transformers' `generate` does): a left-padded row starts at 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_4d(key_valid, query_len: int, query_offset=0, segment_ids=None, sliding_window=None):
  """bool [B, 1, T, S]: query i (at key slot `query_offset + i`) sees the valid keys at or before it (and, with a
  `sliding_window` (Mistral v0.1), fewer than that many slots back), and, for packed rows (`segment_ids` [B, T],
  T == S), only its own segment."""
  return causal_mask(key_valid, query_len, query_offset, segment_ids, sliding_window)  # models/attention.py


def _check_image_tokens(n_tokens: int, n_images: int, per_image: int, image_token: int) -> None:
  if n_tokens != n_images * per_image:
    raise ValueError(f"Image features and image tokens do not match: {n_tokens} image tokens "
                     f"(id {image_token}) in input_ids, {n_images * per_image} features "
                     f"({n_images} images x {per_image})")


def image_layout(cfg: LlavaConfig):
  """The config's image layout (`data/layout.py`, host side): which feature row each image token takes."""
  from llava_jax.data.layout import layout_for  # pylint: disable=import-outside-toplevel

  return layout_for(cfg)


def image_feature_rows(cfg: LlavaConfig, input_ids, image_sizes, tiles_per_image: int) -> np.ndarray:
  """LLaVA-NeXT, on the host: int32 [B, T], for each image-token position the row of the batch's tile features
  it takes (`ImageLayout.token_rows`: the newline's included), 0 elsewhere.

  This is the variable part of anyres (it depends on each image's size only), so the device gathers with a
  fixed-shape index whatever the image sizes."""
  return image_layout(cfg).token_rows(input_ids, cfg.image_token_index, image_sizes, tiles_per_image)


def image_feature_weights(cfg: LlavaConfig, input_ids, image_sizes) -> np.ndarray | None:
  """On the host, beside `image_feature_rows`: float32 [B, T, taps] for a family whose tokens mix several rows
  (OneVision's bilinear shrink, `ImageLayout.token_weights`), None where each takes one."""
  return image_layout(cfg).token_weights(input_ids, cfg.image_token_index, image_sizes)


def video_feature_taps(cfg: LlavaConfig, input_ids, videos_shape) -> tuple[np.ndarray, np.ndarray]:
  """OneVision, on the host: (rows int32 [B, T, taps], weights float32 [B, T, taps]) of the video tokens for
  pixel_values_videos of shape `videos_shape` (V, F, ...): each video's frames read from its token count
  (`OneVisionBatch.video_frame_counts`), rows into the videos' frame features with the newline one past them."""
  videos, frames = int(videos_shape[0]), int(videos_shape[1])
  return image_layout(cfg).video_token_taps(input_ids, cfg.video_token_index, videos, frames)




class Llava(nnx.Module):

  """`config` says what the model computes, `options` how it runs (scan, remat, attention kernel, logits dtype);
  `assets_dir` is where its tokenizer and image-processor files are (set by the loaders), or None."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs | None = None, options: ModelOptions = ModelOptions(),
               assets_dir: str | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    kw = dict(rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype))
    self.config, self.options, self.assets_dir = cfg, options, assets_dir
    self.vision_tower = VISION_TOWERS[cfg.vision.model_type](cfg.vision, options=options, **kw)
    self.multi_modal_projector = MultiModalProjector(cfg, **kw)
    self.language_model = LlamaModel(cfg.text, options=options, **kw)
    self.logits_dtype = jnp.dtype(options.logits_dtype or cfg.dtype)
    self.lm_head = (None if cfg.text.tie_word_embeddings else
                    Dense(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), use_bias=False,
                          rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype), dtype=self.logits_dtype))
    # LLaVA-NeXT: the vector after every row of the unpadded tile grid (initialised as transformers does).
    d = cfg.text.hidden_size
    self.image_newline = (param(rngs, normal_init(d ** -0.5), (d,), ("embed",), jnp.dtype(cfg.param_dtype))
                          if cfg.is_next else None)

  # -- pieces ----------------------------------------------------------------------------------------------------

  def image_features(self, pixel_values):
    """pixel_values [N, H, W, C] -> projected features [N, num_image_tokens, text hidden]."""
    n_states = self.config.vision.num_hidden_layers + 1
    layers = [l % n_states for l in self.config.feature_layers]
    hidden = self.vision_tower(pixel_values, num_layers=max(layers))
    # "default" drops the first token: CLIP's CLS; for SigLIP (no CLS) a patch, as transformers' Llava does.
    start = 1 if self.config.vision_feature_select_strategy == "default" else 0
    features = jnp.concatenate([hidden[l][:, start:] for l in layers], axis=-1)
    return self.multi_modal_projector(features)

  def embed(self, input_ids, pixel_values=None, image_mask=None, image_feature_rows=None, images_by_row=False,
            image_feature_weights=None, pixel_values_videos=None, video_feature_rows=None,
            video_feature_weights=None, precomputed_features=None):
    """Token embeddings with image features scattered, in order, into the image-token positions.

    pixel_values: [N, H, W, C] (or [B, M, H, W, C], flattened row-major); image_mask [N] (or [B, M]) marks
    real images, so a fixed-shape batch can carry blank slots for rows without one. LLaVA-NeXT: pixel_values
    [N, P, H, W, C] (or [B, M, P, H, W, C]): each image's tiles, and `image_feature_rows` [B, T] from
    `image_feature_rows(...)` places their features (OneVision: [B, T, taps] rows mixed by
    `image_feature_weights` [B, T, taps]). OneVision's videos: pixel_values_videos [V, F, H, W, C] (zero frames
    after each video's own) with `video_feature_rows` / `video_feature_weights` [B, T, taps] from
    `video_feature_taps(...)`, rows into the videos' own table.

    `images_by_row`: pixel_values[b] ([B, ...] or [B, M, ...]) are row b's own images and each row takes only
    those (for LLaVA-NeXT, `image_feature_rows` then count within the row: `ImageLayout.row_local_rows`). The
    same result on a batch where every row's image tokens match its images, but each row gathers from its own
    features only, so the splice stays split with the batch on a mesh (the batch-wide gather makes every device
    hold every row's features). The train step uses it. Videos then come [B, F, H, W, C], row b's own (zero
    frames where it has none), their rows counted within the row as well.

    `precomputed_features`: what `image_features` gives for pixel_values (flattened to [N * P, H, W, C]), computed
    before (the serving engine caches them per image); pixel_values then give only their shape.
    """
    image_token, video_token = self.config.image_token_index, self.config.video_token_index
    is_image = input_ids == image_token
    is_video = None if video_token is None or not self.config.is_onevision else input_ids == video_token
    placeholder = is_image if is_video is None else is_image | is_video
    # The placeholder id may lie outside the vocabulary (original LLaVA); its embedding is replaced anyway.
    embeds = self.language_model.embed_tokens(jnp.where(placeholder, 0, input_ids))
    if pixel_values_videos is None and is_video is not None and _is_concrete(input_ids) and bool(is_video.any()):
      raise ValueError(f"input_ids hold {int(is_video.sum())} video tokens (id {video_token}) but no "
                       "pixel_values_videos were given")
    if pixel_values_videos is not None and is_video is None:
      raise ValueError("pixel_values_videos need a LLaVA-OneVision config with a video_token_index")
    if pixel_values is None:
      if _is_concrete(input_ids) and bool(is_image.any()):
        raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id {image_token}) but no "
                         "pixel_values were given")
      if pixel_values_videos is None:
        return embeds
    if pixel_values_videos is not None:
      return self._embed_with_videos(embeds, is_image, is_video, pixel_values, image_feature_rows,
                                     image_feature_weights, pixel_values_videos, video_feature_rows,
                                     video_feature_weights, images_by_row, precomputed_features)
    if image_layout(self.config).places_features:
      return self._embed_tiles(embeds, is_image, pixel_values, image_feature_rows, images_by_row,
                               image_feature_weights, precomputed_features)
    groups = embeds.shape[0] if images_by_row else 1  # each row gathers from its own images, or the batch's
    slots = pixel_values.reshape(groups, -1, *pixel_values.shape[-3:])  # [G, M, H, W, C]
    features = self._features(slots.reshape(-1, *slots.shape[2:]), precomputed_features)
    features = features.reshape(*slots.shape[:2], *features.shape[1:])  # [G, M, F, D]
    per_image, dim = features.shape[2:]
    real = jnp.ones(slots.shape[:2], bool) if image_mask is None else image_mask.reshape(groups, -1).astype(bool)
    if image_mask is not None:  # the real images first, keeping their order
      order = jnp.argsort(~real, axis=1, stable=True)
      features = jnp.take_along_axis(features, order[:, :, None, None], axis=1)
    tokens = is_image.reshape(groups, -1)
    if _is_concrete(tokens) and _is_concrete(real):
      for n_tokens, n_real in zip(np.asarray(tokens).sum(1), np.asarray(real).sum(1)):
        _check_image_tokens(int(n_tokens), int(n_real), per_image, image_token)
    flat = features.reshape(groups, -1, dim).astype(embeds.dtype)
    index = jnp.clip(jnp.cumsum(tokens, axis=1) - 1, 0, flat.shape[1] - 1)
    spliced = jnp.take_along_axis(flat, index[..., None], axis=1).reshape(embeds.shape)
    return jnp.where(is_image[..., None], spliced, embeds)

  def _features(self, pixel_values, precomputed=None):
    """`image_features` of pixel_values [N, H, W, C], or the `precomputed` ones [N, F, D] (`embed`)."""
    if precomputed is None:
      return self.image_features(pixel_values)
    if precomputed.shape[0] != pixel_values.shape[0]:
      raise ValueError(f"precomputed_features hold {precomputed.shape[0]} images' features, pixel_values "
                       f"{pixel_values.shape[0]} images (tiles)")
    return precomputed

  def _embed_tiles(self, embeds, is_image, pixel_values, image_feature_rows, images_by_row=False, weights=None,
                   precomputed=None):
    """LLaVA-NeXT: every tile through the tower and projector (blank tiles too: fixed shapes), then one gather
    from [tile features..., image_newline] by the host-computed rows (per row with `images_by_row`); OneVision's
    rows carry taps, mixed by `weights` (its bilinear shrink and pooling, after the projector as transformers)."""
    if image_feature_rows is None:
      raise ValueError("a LLaVA-NeXT model needs image_sizes (or image_feature_rows) with pixel_values")
    features = self._features(pixel_values.reshape(-1, *pixel_values.shape[-3:]), precomputed)
    groups = embeds.shape[0] if images_by_row else 1
    features = features.reshape(groups, -1, features.shape[-1])
    taps = image_feature_rows.shape[2:]  # () for one row a token, (K,) for K taps
    rows = image_feature_rows.reshape(groups, -1, *taps)
    weights = None if weights is None else weights.reshape(rows.shape)
    spliced = image_layout(self.config).gather(features, self.image_newline[...], rows, xp=jnp, weights=weights)
    return jnp.where(is_image[..., None], spliced.astype(embeds.dtype).reshape(embeds.shape), embeds)

  def _embed_with_videos(self, embeds, is_image, is_video, pixel_values, image_rows, image_weights, videos,
                         video_rows, video_weights, images_by_row, precomputed=None):
    """OneVision with videos: every frame through the tower and projector as an image tile; one weighted gather
    from [image slot features..., video frame features..., image_newline], the host's image rows (newline one
    past the images) and video rows (newline one past the videos) moved onto that one table. `images_by_row`:
    one table per row (its own image slots and video frames, rows numbered within the row), as the train step."""
    if video_rows is None or video_weights is None:
      raise ValueError("pixel_values_videos need video_feature_rows and video_feature_weights (or image_sizes "
                       "and concrete input_ids, from which they are computed)")
    dim = self.config.text.hidden_size
    groups = embeds.shape[0] if images_by_row else 1
    tables = []
    if pixel_values is not None:
      if image_rows is None or image_weights is None:
        raise ValueError("a LLaVA-OneVision model needs image_sizes (or image_feature_rows and "
                         "image_feature_weights) with pixel_values")
      image_table = self._features(pixel_values.reshape(-1, *pixel_values.shape[-3:]), precomputed)
      tables.append(image_table.reshape(groups, -1, dim))
    tables.append(self.image_features(videos.reshape(-1, *videos.shape[-3:])).reshape(groups, -1, dim))
    n_image = tables[0].shape[1] if pixel_values is not None else 0
    n_video, total = tables[-1].shape[1], sum(t.shape[1] for t in tables)
    video_rows = jnp.where(video_rows == n_video, total, video_rows + n_image)
    rows, weights = video_rows, video_weights
    if pixel_values is not None:
      image_rows = jnp.where(image_rows == n_image, total, image_rows)
      rows = jnp.where(is_video[..., None], video_rows, image_rows)
      weights = jnp.where(is_video[..., None], video_weights, image_weights)
    features = jnp.concatenate(tables, axis=1)
    taps = rows.shape[-1]
    spliced = image_layout(self.config).gather(features, self.image_newline[...], rows.reshape(groups, -1, taps),
                                               xp=jnp, weights=weights.reshape(groups, -1, taps))
    return jnp.where((is_image | is_video)[..., None], spliced.astype(embeds.dtype).reshape(embeds.shape), embeds)

  def logits_from_hidden(self, hidden):
    if self.lm_head is None:
      return self.language_model.embed_tokens.attend(hidden, self.logits_dtype)
    return self.lm_head(hidden)

  def decode(self, embeds, positions, mask, *, caches=None, cache_index=None,
             return_hidden: bool = False) -> DecoderOutput:
    """The language model over input embeddings (the forward pass, prefill and each decoding step)."""
    return self.language_model(embeds, positions, mask, caches=caches, cache_index=cache_index,
                               return_hidden=return_hidden)

  # -- forward ---------------------------------------------------------------------------------------------------

  def feature_rows(self, input_ids, pixel_values, image_sizes, rows=None):
    """LLaVA-NeXT's `image_feature_rows`, computed on the host from concrete `image_sizes` [N, 2] (height,
    width) unless given as `rows`; None for LLaVA-1.5 or without images."""
    if not image_layout(self.config).places_features or pixel_values is None or rows is not None:
      return rows
    if image_sizes is None or not (_is_concrete(input_ids) and _is_concrete(image_sizes)):
      raise ValueError("a LLaVA-NeXT model needs concrete image_sizes [N, 2] (height, width) with pixel_values; "
                       "under jit pass image_feature_rows (llava_jax.models.llava.image_feature_rows) instead")
    return jnp.asarray(image_feature_rows(self.config, input_ids, image_sizes, pixel_values.shape[-4]))

  def feature_inputs(self, input_ids, pixel_values=None, image_sizes=None, pixel_values_videos=None) -> dict:
    """`embed`'s host-computed inputs from concrete input_ids and image_sizes: image_feature_rows (and, for
    OneVision, image_feature_weights, and the video rows and weights with pixel_values_videos); None where not
    needed. Which OneVision images are base-only is read from the rows' token counts (`assign_images`)."""
    layout = image_layout(self.config)
    out = {"image_feature_rows": None, "image_feature_weights": None}
    if layout.taps == 1 or pixel_values is None:
      out["image_feature_rows"] = self.feature_rows(input_ids, pixel_values, image_sizes)
    else:  # rows and weights of the same tokens: which images are base-only is read once, for both
      if image_sizes is None or not (_is_concrete(input_ids) and _is_concrete(image_sizes)):
        raise ValueError("a LLaVA-OneVision model needs concrete image_sizes [N, 2] with pixel_values; under jit "
                         "pass image_feature_rows and image_feature_weights instead")
      image_token = self.config.image_token_index
      base_only = layout.assign_images(input_ids, image_token, image_sizes)
      out["image_feature_rows"] = jnp.asarray(layout.token_rows(input_ids, image_token, image_sizes,
                                                                pixel_values.shape[-4], base_only))
      out["image_feature_weights"] = jnp.asarray(layout.token_weights(input_ids, image_token, image_sizes,
                                                                      base_only))
    out["video_feature_rows"] = out["video_feature_weights"] = None
    if pixel_values_videos is not None:
      if not _is_concrete(input_ids):
        raise ValueError("pixel_values_videos need concrete input_ids; under jit pass video_feature_rows and "
                         "video_feature_weights (llava_jax.models.llava.video_feature_taps) instead")
      rows, weights = video_feature_taps(self.config, np.asarray(input_ids), pixel_values_videos.shape)
      out["video_feature_rows"], out["video_feature_weights"] = jnp.asarray(rows), jnp.asarray(weights)
    return out

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, image_sizes=None, image_mask=None,
               positions=None, segment_ids=None, image_feature_rows=None, return_hidden: bool = False,
               head: bool = True, images_by_row: bool = False, image_feature_weights=None,
               pixel_values_videos=None, video_feature_rows=None, video_feature_weights=None):
    """input_ids [B, T] -> logits [B, T, vocab] (and all decoder hidden states if `return_hidden`). `head=False`
    returns the final (normed) hidden states [B, T, D] instead of logits, for a loss that applies
    `logits_from_hidden` itself, piece by piece (the train step's chunked loss). `images_by_row`: see `embed`.

    attention_mask [B, T] (1 = real token) gives positions cumsum - 1 and masks padded keys. For packed rows pass
    `segment_ids` [B, T] (0 = padding) and `positions`: attention stays within a segment. LLaVA-NeXT takes
    pixel_values [N, P, H, W, 3] (each image's tiles, then blank ones) and image_sizes [N, 2] (height, width).
    OneVision's rows carry taps; their `image_feature_weights` are computed with them from image_sizes, and
    pixel_values_videos [V, F, H, W, 3] take their rows and weights from input_ids alone.
    """
    if image_feature_rows is None or (pixel_values_videos is not None and video_feature_rows is None):
      computed = self.feature_inputs(input_ids, pixel_values if image_feature_rows is None else None, image_sizes,
                                     pixel_values_videos if video_feature_rows is None else None)
      if image_feature_rows is None:
        image_feature_rows = computed["image_feature_rows"]
        image_feature_weights = computed["image_feature_weights"]
      if video_feature_rows is None:
        video_feature_rows, video_feature_weights = computed["video_feature_rows"], computed["video_feature_weights"]
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32) if segment_ids is None else (segment_ids > 0)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    # Described, not materialised: the memory-efficient kernels never build [T, T] (models/attention.py).
    mask = SelfAttentionMask(attention_mask, segment_ids, self.config.text.sliding_window)
    embeds = self.embed(input_ids, pixel_values, image_mask, image_feature_rows, images_by_row,
                        image_feature_weights, pixel_values_videos, video_feature_rows, video_feature_weights)
    out = self.decode(embeds, positions, mask, return_hidden=return_hidden)
    logits = self.logits_from_hidden(out.hidden) if head else out.hidden
    return (logits, out.all_hidden) if return_hidden else logits
