"""Decoding, one definition for every caller (`generate` / `stream`, the serving engine, the eval runner, the CLI):
prefill into a KV cache that grows in buckets, the one-token decode step, sampling, stop strings and incremental
detokenization.

Sampling is greedy at temperature 0 (exactly argmax), else temperature -> top-k -> top-p (the order and semantics
of transformers' logits warpers), with settings per row. Row r of a request with seed s draws its n-th new token
with the key fold_in(fold_in(key(s), r), n), so what a prompt samples depends on its seed, its row within its own
request and the token's index only: `generate`, `stream` and the engine (every request is row 0 of its own) agree,
whatever else shares the batch.

Shapes are static: prompts come left-padded to a bucket (positions come from the mask, so a row generates what it
would alone) and the KV cache grows through a few fixed sizes (`cache_schedule`), so one compile serves every call
of the same shapes and a decode step reads about the filled prefix, not the room for every new token.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llava import Llava, attention_mask_4d, positions_from_mask


# -- sampling ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  top_k: int = 0  # 0: off

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"bad sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")

  def rows(self, b: int):
    """These settings for each of `b` rows: (temperature, top_p, top_k) as `sample` takes them."""
    return (jnp.full((b,), self.temperature, jnp.float32), jnp.full((b,), self.top_p, jnp.float32),
            jnp.full((b,), self.top_k, jnp.int32))


def filter_logits(logits, temperature, top_p, top_k):
  """Temperature, then top-k (0: off), then top-p (nucleus) on logits [B, V], settings per row [B]; removed tokens
  get -inf. One ascending sort serves both filters (top-k only sends values to -inf, which keeps the order)."""
  logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  v = logits.shape[-1]
  order = jnp.argsort(logits, axis=-1)  # ascending, as transformers sorts
  ascending = jnp.take_along_axis(logits, order, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jnp.take_along_axis(ascending, (v - k)[:, None], axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  ascending = jnp.where(ascending < kth, -jnp.inf, ascending)
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  remove_sorted = (cumulative <= (1 - top_p)[:, None]).at[..., -1].set(False)  # keep at least one
  remove_sorted &= (top_p < 1)[:, None]
  remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
  return jnp.where(remove, -jnp.inf, logits)


def greedy(logits):
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def row_keys(seeds, rows, counters):
  """Each row's key for one token: fold_in(fold_in(key(seed), row), counter), all [B]."""
  return jax.vmap(lambda s, r, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), c))(
      seeds, rows, counters)


def sample(logits, temperature, top_p, top_k, keys):
  """The next token of every row [B] from logits [B, V]: argmax where temperature == 0, else a draw from
  `filter_logits` with the row's key (`row_keys`)."""
  drawn = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, temperature, top_p, top_k))
  return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy(logits))


def choose(logits, sampling: Sampling, seeds, counter):
  """`sample` with one static setting for rows 0..B-1 of one request; greedy needs no keys and no sort."""
  if sampling.temperature == 0:
    return greedy(logits)
  b = logits.shape[0]
  keys = row_keys(seeds, jnp.arange(b), jnp.full((b,), counter, jnp.int32))
  return sample(logits, *sampling.rows(b), keys)


TOP_LOGPROBS = 20  # the most top_logprobs a request may ask for (OpenAI's bound): one static shape for all


def token_logprobs(logits, tokens, top_n: int = TOP_LOGPROBS):
  """The model's log-probabilities for the tokens chosen: log_softmax of the raw logits [B, V] in fp32, before
  temperature / top-k / top-p (what vLLM returns by default, its "raw_logprobs"). Returns (the chosen tokens'
  log-probabilities [B], the `top_n` most likely ids [B, N] and their log-probabilities [B, N], descending)."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logprobs, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
  top, ids = jax.lax.top_k(logprobs, min(top_n, logprobs.shape[-1]))
  return chosen, ids.astype(jnp.int32), top


def seed_array(seed: int):
  """A seed as the traced uint32 the compiled functions take (any int; one compile for every seed)."""
  return jnp.uint32(int(seed) % 2**32)


# -- the two model steps -----------------------------------------------------------------------------------------


FIRST_ROOM = 32  # the smallest room for new tokens that a cache size has past the prompt (a prompt bucket's size)


def cache_schedule(prompt_len: int, max_new: int) -> tuple[int, ...]:
  """The KV cache sizes a reply of up to `max_new` tokens after a `prompt_len`-slot prompt decodes over, in order;
  the last, prompt_len + max_new, holds every token. Prefill fills the first; when a size is full, one copy (a pad,
  `grow_cache`) moves the cache to the next.

  Why these: a decode step attends over its whole cache, so it reads the current size, not the filled prefix. The
  room past the prompt doubles from FIRST_ROOM (or 1/8 of the prompt, if more): a step reads the prompt plus less
  than twice the tokens made so far (or the first room), under twice the filled prefix, and a reply that stops
  early (EOS; eval's one-letter answers under max_new_tokens 1024) never reads the room it did not use. Each size
  costs one copy of the cache, amortised over as many steps as the room before it (a fixed step would copy a long
  prompt's cache every few tokens), and one compiled step: about log2(max_new / first room) + 1 sizes. The floor
  of 1/8 of the prompt spares a long prompt sizes that would save it a few percent of its reads.
  """
  room = FIRST_ROOM
  while room * 8 < prompt_len:
    room *= 2
  sizes = []
  while room < max_new:
    sizes.append(prompt_len + room)
    room *= 2
  return (*sizes, prompt_len + max_new)


@functools.partial(jax.jit, static_argnames=("size",))
def grow_cache(caches, key_valid, *, size: int):
  """The caches [B, S, K, D] and key_valid [B, S] padded to `size` slots (empty, not valid): a schedule's next
  size, one copy."""
  pad = size - key_valid.shape[1]
  caches = [tuple(jnp.pad(c, ((0, 0), (0, pad), (0, 0), (0, 0))) for c in kv) for kv in caches]
  return caches, jnp.pad(key_valid, ((0, 0), (0, pad)))


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


def image_inputs(model: Llava, input_ids, pixel_values=None, image_mask=None, image_sizes=None,
                 pixel_values_videos=None) -> dict:
  """`Llava.embed`'s image (and OneVision's video) inputs for (left-padded) prompts; LLaVA-NeXT's feature rows
  (OneVision's taps and weights) are computed here, on the host, so the compiled prefill sees fixed shapes
  whatever the image sizes."""
  images = model.feature_inputs(np.asarray(input_ids), pixel_values,
                                None if image_sizes is None else np.asarray(image_sizes), pixel_values_videos)
  images = {k: v for k, v in images.items() if v is not None}  # the keys a caller without them expects
  images.update(pixel_values=None if pixel_values is None else jnp.asarray(pixel_values), image_mask=image_mask)
  images.setdefault("image_feature_rows", None)
  if pixel_values_videos is not None:
    images["pixel_values_videos"] = jnp.asarray(pixel_values_videos)
  return images


# -- compiled: the whole loop (generate, eval), prefill + step (stream); the engine's are in serve/paged.py ---------


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id"))
def decode_loop(graphdef, state, input_ids, attention_mask, images, seed, *, max_new_tokens: int,
                sampling: Sampling, eos_ids: tuple, pad_id: int):
  """New tokens [B, max_new_tokens] for prompts already left-padded to their final shape (they stay where the
  caller put them, e.g. row-sharded over a mesh); rows past EOS continue with `pad_id`. One `while_loop` per size
  of `cache_schedule`, each step attending over that size; the loop stops, and the cache stops growing, once
  every row is done."""
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  sizes = cache_schedule(t, max_new_tokens)
  seeds = jnp.full((b,), seed, jnp.uint32)
  logits, caches, key_valid, position = prefill(model, input_ids, attention_mask, images, sizes[0])
  token = choose(logits, sampling, seeds, 0)
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def body(carry):
    i, tokens, token, caches, key_valid, position, done = carry
    logits, caches, key_valid = decode_step(model, token, caches, key_valid, position, t + i - 1)
    new = jnp.where(done, pad_id, choose(logits, sampling, seeds, i))
    return i + 1, tokens.at[:, i].set(new), new, caches, key_valid, position + 1, done | jnp.isin(new, eos)

  def run(segment, carry):
    """Tokens while cache size `segment` has room (token i writes slot t + i - 1), then the next size, if any row
    still runs; returns the tokens."""
    end = min(sizes[segment] - t + 1, max_new_tokens)
    carry = jax.lax.while_loop(lambda c: (c[0] < end) & ~jnp.all(c[-1]), body, carry)
    if segment + 1 == len(sizes):
      return carry[1]

    def grow(carry):
      i, tokens, token, caches, key_valid, position, done = carry
      caches, key_valid = grow_cache(caches, key_valid, size=sizes[segment + 1])
      return run(segment + 1, (i, tokens, token, caches, key_valid, position, done))

    return jax.lax.cond(jnp.all(carry[-1]), lambda c: c[1], grow, carry)

  return run(0, (jnp.int32(1), tokens, token, caches, key_valid, position, jnp.isin(token, eos)))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "sampling"))
def prefill_sample(graphdef, state, input_ids, attention_mask, images, seed, *, cache_len: int, sampling: Sampling):
  """Prefill and the first token: (token [B], caches, key_valid, next position [B])."""
  logits, caches, key_valid, position = prefill(nnx.merge(graphdef, state), input_ids, attention_mask, images,
                                                cache_len)
  return choose(logits, sampling, jnp.full(input_ids.shape[:1], seed, jnp.uint32), 0), caches, key_valid, position


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("caches",))
def step_sample(graphdef, state, token, caches, key_valid, position, index, seed, counter, *, sampling: Sampling):
  """One decode step and the token it samples (the `counter`-th new one): (token [B], caches, key_valid)."""
  logits, caches, key_valid = decode_step(nnx.merge(graphdef, state), token, caches, key_valid, position, index)
  return choose(logits, sampling, jnp.full(token.shape, seed, jnp.uint32), counter), caches, key_valid


def sample_requests(logits, settings):
  """Each row is row 0 of its own request: settings = (temperature, top_p, top_k, seed, counter), all [B] (the
  serving engine's steps, serve/paged.py)."""
  temperature, top_p, top_k, seeds, counters = settings
  return sample(logits, temperature, top_p, top_k, row_keys(seeds, jnp.zeros_like(counters), counters))


# -- text: stop strings and incremental detokenization -----------------------------------------------------------


def stop_at(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
  """Cuts `text` at the first stop string; says whether one was found."""
  cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def _stop_prefix_len(text: str, stop_strings: Sequence[str]) -> int:
  """Length of the longest end of `text` that a stop string starts with (the next tokens may complete it)."""
  return max((k for s in stop_strings for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
             default=0)


def byte_token_ids(tokenizer) -> frozenset[int]:
  """Ids of SentencePiece's byte-fallback tokens ("<0x0A>"): a run of them decodes to text only once complete."""
  return frozenset(i for token, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token))


class Detokenizer:
  """A reply's text as its tokens come, without decoding the whole reply per token: each token decodes only the
  window of ids since the text shown before last (the prefix / read offsets of text-generation-inference and
  vLLM) and shows what the window's text gained. Held back: a trailing run of byte-fallback tokens (a later byte
  of the run can rewrite all of it), text ending in U+FFFD (a character cut mid-way) and an end of the text that a
  stop string starts with. `finish` decodes the reply once, so the text shown ends equal to the full decode, cut
  at the first stop string."""

  def __init__(self, decode: Callable[[list], str], stop_strings: Sequence[str] = (),
               byte_tokens: Iterable[int] = ()):
    self.decode, self.stop_strings = decode, tuple(s for s in stop_strings if s)
    self.byte_tokens = frozenset(int(i) for i in byte_tokens)
    self.ids: list[int] = []
    self.text = ""  # shown so far
    self.held = ""  # decoded but held back: a stop string may start there
    self.prefix = self.read = 0  # ids[prefix:read]: the window's part already shown (or held)
    self.stopped = False  # a stop string appeared: the text ends before it

  def add(self, token: int) -> str:
    """Takes the next token; returns the text it lets show ('' while held back)."""
    self.ids.append(int(token))
    end = len(self.ids)
    while end > self.read and self.ids[end - 1] in self.byte_tokens:
      end -= 1
    if self.stopped or end == self.read:
      return ""
    before = self.decode(self.ids[self.prefix:self.read])
    after = self.decode(self.ids[self.prefix:end])
    if len(after) <= len(before) or after.endswith("\ufffd"):
      return ""
    self.prefix, self.read = self.read, end
    text, self.stopped = stop_at(self.held + after[len(before):], self.stop_strings)
    keep = 0 if self.stopped else _stop_prefix_len(text, self.stop_strings)
    shown, self.held = text[:len(text) - keep], text[len(text) - keep:]
    self.text += shown
    return shown

  def finish(self) -> str:
    """The rest of the reply, past what was shown: the whole reply decoded once, cut at the first stop string."""
    final = stop_at(self.decode(self.ids), self.stop_strings)[0]
    rest = final[len(self.text):] if final.startswith(self.text) else ""
    self.text, self.held = final, ""
    return rest
