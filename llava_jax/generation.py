"""`generate` (whole replies, one compiled loop) and `stream` (a token at a time, for chat): thin front ends of
`llava_jax.decoding` that left-pad the prompts to a bucket and pick the EOS / pad ids. Both sample with the same
keys, so `stream(..., seed=s)` yields the tokens `generate(..., seed=s)` returns."""

from __future__ import annotations

from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.decoding import (Sampling, cache_schedule, decode_loop, grow_cache, image_inputs, prefill_sample,
                                seed_array, step_sample)
from llava_jax.models.llava import Llava
from llava_jax.padding import left_pad


def _prompts(input_ids, attention_mask, bucket: int, pad_id: int):
  input_ids = np.asarray(input_ids)
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if not mask[:, -1].all():
    raise ValueError("generation needs left-padded prompts: every row's last position must be a real token")
  ids, mask = left_pad(input_ids, pad_id, bucket, masks=mask)
  return jnp.asarray(ids), jnp.asarray(mask)


def _pad_id(model, pad_token_id) -> int:
  return pad_token_id if pad_token_id is not None else (model.config.text.pad_token_id or 0)


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
  eos = model.config.text.eos_token_id if eos_token_id is None else eos_token_id
  return () if eos is None else tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def generate(model: Llava, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id=None,
             image_mask=None, image_sizes=None, seed: int = 0, prompt_bucket: int = 32,
             pixel_values_videos=None) -> np.ndarray:
  """New tokens [B, max_new_tokens] for left-padded prompts; rows that hit EOS continue with `pad_token_id`.

  `eos_token_id` defaults to the model config's; pass () to never stop early. LLaVA-NeXT needs `image_sizes`;
  OneVision's videos come as `pixel_values_videos` [V, F, H, W, 3].
  """
  pad_id = _pad_id(model, pad_token_id)
  input_ids, attention_mask = _prompts(input_ids, attention_mask, prompt_bucket, pad_id)
  images = image_inputs(model, input_ids, pixel_values, image_mask, image_sizes, pixel_values_videos)
  graphdef, state = nnx.split(model)
  out = decode_loop(graphdef, state, input_ids, attention_mask, images, seed_array(seed),
                    max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_p, top_k),
                    eos_ids=_eos_ids(model, eos_token_id), pad_id=pad_id)
  return np.asarray(out)


def stream(model: Llava, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 512,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id=None,
           seed: int = 0, prompt_bucket: int = 32, image_mask=None, image_sizes=None,
           pixel_values_videos=None) -> Iterator[np.ndarray]:
  """Yields the next token of every row as it is produced ([B] int32); stops when all rows have hit EOS or after
  `max_new_tokens`. The caller may stop early (e.g. on a stop string). The cache grows as `generate`'s does
  (`cache_schedule`): one compiled step per cache size, each reused by every call of the same shapes."""
  sampling = Sampling(temperature, top_p, top_k)
  input_ids, attention_mask = _prompts(input_ids, attention_mask, prompt_bucket, _pad_id(model, pad_token_id))
  images = image_inputs(model, input_ids, pixel_values, image_mask, image_sizes, pixel_values_videos)
  graphdef, state = nnx.split(model)
  t, seed = input_ids.shape[1], seed_array(seed)
  sizes = cache_schedule(t, max_new_tokens)
  token, caches, key_valid, position = prefill_sample(graphdef, state, input_ids, attention_mask, images, seed,
                                                      cache_len=sizes[0], sampling=sampling)
  eos = list(_eos_ids(model, eos_token_id))
  done = np.zeros(input_ids.shape[0], bool)
  for i in range(max_new_tokens):
    host = np.asarray(token)
    yield host
    done |= np.isin(host, eos)
    if done.all() or i == max_new_tokens - 1:
      return
    if t + i == key_valid.shape[1]:  # this step writes slot t + i: the cache is full, move it to the next size
      caches, key_valid = grow_cache(caches, key_valid, size=sizes[sizes.index(t + i) + 1])
    token, caches, key_valid = step_sample(graphdef, state, token, caches, key_valid, position, jnp.int32(t + i),
                                           seed, jnp.int32(i + 1), sampling=sampling)
    position = position + 1
