"""Generation: prefill the prompt (text + spliced image features) into a static-size KV cache, then decode inside
one compiled `while_loop`. Greedy when temperature == 0, else temperature -> top-k -> top-p sampling (the order and
semantics of transformers' logits warpers). Prompts are left-padded; positions come from the attention mask, so a
batch of prompts of different lengths generates exactly what each prompt would alone.

Shapes are static: the prompt is left-padded to a multiple of `prompt_bucket` and the cache holds
prompt + max_new_tokens, so one compile serves every call with the same (batch, bucket, max_new_tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llava import Llava, attention_mask_4d, positions_from_mask


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  top_k: int = 0  # 0: off

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"bad sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


def filter_logits(logits, sampling: Sampling):
  """Temperature, then top-k, then top-p (nucleus) on fp32 logits [B, V]; removed tokens get -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending, as transformers sorts
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - sampling.top_p).at[..., -1].set(False)  # keep at least one
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def next_token(logits, sampling: Sampling, key):
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


# -- the two model steps ---------------------------------------------------------------------------------------


def init_cache(model: Llava, batch: int, length: int):
  t = model.config.text
  shape = (batch, length, t.num_key_value_heads, t.head_dim)
  dtype = jnp.dtype(model.config.dtype)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(t.num_hidden_layers)]


def prefill(model: Llava, input_ids, attention_mask, images: dict, cache_len: int):
  """Runs the prompt; returns (last-position logits [B, V], caches, key_valid [B, S], next position [B]).

  `images` holds `Llava.embed`'s image inputs (pixel_values, image_mask, image_feature_rows; any may be None)."""
  b, t = input_ids.shape
  positions = positions_from_mask(attention_mask)
  key_valid = jnp.zeros((b, cache_len), bool).at[:, :t].set(attention_mask.astype(bool))
  embeds = model.embed(input_ids, **images)
  mask = attention_mask_4d(key_valid, t, sliding_window=model.config.text.sliding_window)
  out = model.decode(embeds, positions, mask, caches=init_cache(model, b, cache_len), cache_index=0)
  logits = model.logits_from_hidden(out.hidden[:, -1]).astype(jnp.float32)
  return logits, out.caches, key_valid, positions[:, -1] + 1


def decode_step(model: Llava, token, caches, key_valid, position, index):
  """One token per row at cache slot `index`; returns (logits [B, V], caches, key_valid)."""
  key_valid = key_valid.at[:, index].set(True)
  embeds = model.language_model.embed_tokens(token[:, None])  # a sampled image-token id is a plain token here
  mask = attention_mask_4d(key_valid, 1, index, sliding_window=model.config.text.sliding_window)
  out = model.decode(embeds, position[:, None], mask, caches=caches, cache_index=index)
  return model.logits_from_hidden(out.hidden[:, -1]).astype(jnp.float32), out.caches, key_valid


# -- compiled whole-generation loop ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id"))
def _generate(graphdef, state, input_ids, attention_mask, images, key, *, max_new_tokens, sampling, eos_ids,
              pad_id):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  logits, caches, key_valid, position = prefill(model, input_ids, attention_mask, images, t + max_new_tokens)
  key, sub = jax.random.split(key)
  token = next_token(logits, sampling, sub)
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(carry):
    i, _, _, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tokens, token, caches, key_valid, position, done, key = carry
    logits, caches, key_valid = decode_step(model, token, caches, key_valid, position, t + i - 1)
    key, sub = jax.random.split(key)
    new = jnp.where(done, pad_id, next_token(logits, sampling, sub))
    tokens = tokens.at[:, i].set(new)
    return i + 1, tokens, new, caches, key_valid, position + 1, done | jnp.isin(new, eos), key

  carry = (jnp.int32(1), tokens, token, caches, key_valid, position, done, key)
  return jax.lax.while_loop(cond, body, carry)[1]


def _left_pad(input_ids, attention_mask, bucket: int, pad_id: int):
  input_ids = np.asarray(input_ids)
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if not mask[:, -1].all():
    raise ValueError("generation needs left-padded prompts: every row's last position must be a real token")
  extra = -input_ids.shape[1] % bucket
  if extra:
    input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (extra, 0)))
  return jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def image_inputs(model: Llava, input_ids, pixel_values=None, image_mask=None, image_sizes=None) -> dict:
  """`Llava.embed`'s image inputs for (left-padded) prompts; LLaVA-NeXT's feature rows are computed here, on the
  host, so the compiled prefill sees fixed shapes whatever the image sizes."""
  rows = model.feature_rows(np.asarray(input_ids), pixel_values, None if image_sizes is None else
                            np.asarray(image_sizes))
  return {"pixel_values": None if pixel_values is None else jnp.asarray(pixel_values), "image_mask": image_mask,
          "image_feature_rows": rows}


def _pad_id(model, pad_token_id) -> int:
  return pad_token_id if pad_token_id is not None else (model.config.text.pad_token_id or 0)


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
  eos = model.config.text.eos_token_id if eos_token_id is None else eos_token_id
  return () if eos is None else tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def generate(model: Llava, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id=None,
             image_mask=None, image_sizes=None, seed: int = 0, prompt_bucket: int = 32) -> np.ndarray:
  """New tokens [B, max_new_tokens] for left-padded prompts; rows that hit EOS continue with `pad_token_id`.

  `eos_token_id` defaults to the model config's; pass () to never stop early. LLaVA-NeXT needs `image_sizes`.
  """
  pad_id = _pad_id(model, pad_token_id)
  input_ids, attention_mask = _left_pad(input_ids, attention_mask, prompt_bucket, pad_id)
  images = image_inputs(model, input_ids, pixel_values, image_mask, image_sizes)
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, input_ids, attention_mask, images, jax.random.key(seed),
                  max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_p, top_k),
                  eos_ids=_eos_ids(model, eos_token_id), pad_id=pad_id)
  return np.asarray(out)


# -- streaming (chat): compiled prefill and a compiled single step, driven from Python ---------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_jit(graphdef, state, input_ids, attention_mask, images, *, cache_len):
  return prefill(nnx.merge(graphdef, state), input_ids, attention_mask, images, cache_len)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def _step_jit(graphdef, state, token, caches, key_valid, position, index):
  return decode_step(nnx.merge(graphdef, state), token, caches, key_valid, position, index)


def stream(model: Llava, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 512,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id=None,
           seed: int = 0, prompt_bucket: int = 32, image_mask=None, image_sizes=None) -> Iterator[np.ndarray]:
  """Yields the next token of every row as it is produced ([B] int32); stops when all rows have hit EOS or after
  `max_new_tokens`. The caller may stop early (e.g. on a stop string). One compile per shape, as `generate`."""
  sampling = Sampling(temperature, top_p, top_k)
  input_ids, attention_mask = _left_pad(input_ids, attention_mask, prompt_bucket, _pad_id(model, pad_token_id))
  images = image_inputs(model, input_ids, pixel_values, image_mask, image_sizes)
  graphdef, state = nnx.split(model)
  t = input_ids.shape[1]
  logits, caches, key_valid, position = _prefill_jit(graphdef, state, input_ids, attention_mask, images,
                                                     cache_len=t + max_new_tokens)
  eos = set(_eos_ids(model, eos_token_id))
  done = np.zeros(input_ids.shape[0], bool)
  key = jax.random.key(seed)
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    token = next_token(logits, sampling, sub)
    host = np.asarray(token)
    yield host
    done |= np.isin(host, list(eos))
    if done.all() or i == max_new_tokens - 1:
      return
    logits, caches, key_valid = _step_jit(graphdef, state, token, caches, key_valid, position, jnp.int32(t + i))
    position = position + 1


def stop_at(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
  """Cuts `text` at the first stop string; says whether one was found."""
  cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)
