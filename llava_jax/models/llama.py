"""LLaMA-family decoder (LLaMA, Mistral, Yi, Qwen2): RMSNorm, rotary embeddings (default / linear / dynamic NTK /
llama3), grouped-query attention, SwiGLU MLP. Attribute names mirror transformers' LlamaModel so the conversion
table stays short.

A layer optionally reads and writes a static-size KV cache (for generation): `cache = (k, v)`, each
[B, S_max, K, D], written at `cache_index`; or a `PagedKV` (the serving engine's page pool, serve/paged.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.config import TextConfig
from llava_jax.models.attention import dot_product_attention, prepare_mask
from llava_jax.models.layers import Dense, Embed, RMSNorm, activation, over_position_pieces
from llava_jax.models.options import ModelOptions
from llava_jax.models.stack import make_layers, run_layers

# -- rotary embeddings -----------------------------------------------------------------------------------------


def _default_inv_freq(base: float, dim: int):
  return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))


def _llama3_inv_freq(rope: dict, dim: int):
  inv_freq = _default_inv_freq(rope["rope_theta"], dim)
  factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old_len = rope["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(cfg: TextConfig, positions) -> jax.Array:
  """Inverse frequencies [D/2]. Only the dynamic type depends on the positions (their maximum + 1), as in HF."""
  rope, dim = cfg.rope, cfg.head_dim
  kind, base = rope.get("rope_type", "default"), rope["rope_theta"]
  if kind == "default":
    return jnp.asarray(_default_inv_freq(base, dim))
  if kind == "linear":
    return jnp.asarray(_default_inv_freq(base, dim) / np.float32(rope["factor"]))
  if kind == "llama3":
    return jnp.asarray(_llama3_inv_freq(rope, dim))
  if kind == "dynamic":
    max_pos, factor = cfg.max_position_embeddings, rope["factor"]
    seq_len = (jnp.max(positions) + 1).astype(jnp.float32)
    scaled_base = base * ((factor * jnp.maximum(seq_len, max_pos) / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    scaled = 1.0 / (scaled_base ** exponents)
    return jnp.where(seq_len > max_pos, scaled, jnp.asarray(_default_inv_freq(base, dim)))
  raise ValueError(f"rope_type {kind!r} is not supported")


def rope_cos_sin(cfg: TextConfig, positions, dtype):
  """cos, sin [B, T, D] for integer positions [B, T], computed in fp32 and cast like HF."""
  freqs = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg, positions)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
  """x [B, T, H, D]; rotate-half convention (HF's, not the interleaved one of Meta's original code)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


# -- the paged KV cache hook ----------------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k_pool", "v_pool", "write_slots", "read_pages"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PagedKV:
  """One layer's share of a paged KV pool: k_pool, v_pool [num_pages, page_size, K, D]; the new tokens' flat slots
  (page * page_size + offset) write_slots int32 [B, T]; each row's pages in order read_pages int32 [B, P]. The
  layer writes, then attends to its row's pages as one [B, P * page_size] sequence (key j at position j): the
  caller's mask says which of those keys each query sees."""
  k_pool: jax.Array
  v_pool: jax.Array
  write_slots: jax.Array
  read_pages: jax.Array

  def write_and_read(self, k, v):
    """Scatters k, v [B, T, K, D] into the pools; returns (the updated PagedKV, keys, values [B, P * page, K, D])."""
    pools = []
    for pool, new in ((self.k_pool, k), (self.v_pool, v)):
      flat = pool.reshape(-1, *pool.shape[2:])
      flat = flat.at[self.write_slots.reshape(-1)].set(new.reshape(-1, *new.shape[2:]).astype(pool.dtype))
      pools.append(flat.reshape(pool.shape))
    b, p = self.read_pages.shape
    read = [pool[self.read_pages].reshape(b, p * pool.shape[1], *pool.shape[2:]) for pool in pools]
    return dataclasses.replace(self, k_pool=pools[0], v_pool=pools[1]), read[0], read[1]


# -- layers ----------------------------------------------------------------------------------------------------


class LlamaAttention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, options: ModelOptions):
    d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if h % k:
      raise ValueError(f"num_attention_heads {h} is not a multiple of num_key_value_heads {k}")
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    qkv_bias = cfg.attention_bias or cfg.qkv_bias  # Qwen2 biases q/k/v only; LLaMA's attention_bias all four
    self.q_proj = Dense(d, h * hd, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.k_proj = Dense(d, k * hd, ("embed", "kv_heads"), use_bias=qkv_bias, **kw)
    self.v_proj = Dense(d, k * hd, ("embed", "kv_heads"), use_bias=qkv_bias, **kw)
    self.o_proj = Dense(h * hd, d, ("heads", "embed"), use_bias=cfg.attention_bias, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim, self.options = h, k, hd, options

  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    b, t, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if isinstance(cache, PagedKV):
      cache, k, v = cache.write_and_read(k, v)
    elif cache is not None:
      k_cache, v_cache = cache
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      cache = (k, v)
    out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.head_dim ** -0.5,
                                impl=self.options.attention_impl)
    return self.o_proj(out.reshape(b, t, -1)), cache


class LlamaMLP(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, options: ModelOptions):
    kw = dict(use_bias=cfg.mlp_bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act)
    self.options = options

  def __call__(self, x):
    b, t, d = x.shape
    chunk = self.options.seq_chunk
    if not 0 < chunk < t:
      return self._mlp(x)
    out = over_position_pieces(self._mlp, (x,), chunk, (0,))  # [pieces, B, seq_chunk, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, d)[:, :t]

  def _mlp(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, options: ModelOptions):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = LlamaAttention(cfg, options=options, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = LlamaMLP(cfg, options=options, **kw)

  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class DecoderOutput(NamedTuple):
  hidden: jax.Array                # [B, T, D], final-normed
  caches: list | None              # the updated KV caches, when caches were given
  all_hidden: list | None          # HF's `hidden_states`: embeddings, each layer's output, the last final-normed


class LlamaModel(nnx.Module):
  """The decoder body (no head): embeddings in, final-normed hidden states out."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
               options: ModelOptions = ModelOptions()):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.config, self.dtype, self.options = cfg, dtype, options
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
    layer = lambda: LlamaDecoderLayer(cfg, options=options, **kw)
    self.layers = make_layers(layer, cfg.num_hidden_layers, stacked=options.scan_layers)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def __call__(self, inputs_embeds, positions, mask, *, caches=None, cache_index=None,
               return_hidden: bool = False) -> DecoderOutput:
    """inputs_embeds [B, T, D], positions [B, T] int, mask bool [B, 1, T, S] or a `SelfAttentionMask`
    (models/attention.py); `caches` (one (k, v) per layer, each [B, S, K, D]) are written at `cache_index` and
    returned updated."""
    cos, sin = rope_cos_sin(self.config, positions, self.dtype)
    mask = prepare_mask(mask, self.options.attention_impl)  # dense once here, not per layer, where the impl needs it
    x = inputs_embeds.astype(self.dtype)

    def call(layer, x, cache):
      x, cache = layer(x, cos, sin, mask, cache, cache_index)
      return x, (x if return_hidden else None, cache)

    x, outputs = run_layers(self.layers, x, call, self.options, per_layer=caches)
    x = self.norm(x)
    all_hidden = None
    if return_hidden:
      all_hidden = [inputs_embeds.astype(self.dtype)] + [h for h, _ in outputs]
      all_hidden[-1] = x
    return DecoderOutput(x, None if caches is None else [c for _, c in outputs], all_hidden)
