"""The serving engine's paged KV memory: a page allocator with reference counts and a prefix cache, the content
keys that let a prompt reuse pages another request wrote, an image-feature cache, and the compiled forward
passes over the page pool (a prefill chunk, a decode step).

Every layer's K and V live in pools [num_pages, page_size, K, D]; a row owns a list of pages (its page table,
on the host) and its token j sits at slot j % page_size of page j // page_size, at position j. A full page is
keyed by a hash chain over its row's content (token ids; an image placeholder carries its image's content hash
and its index within the image), so a later prompt with the same beginning reuses the pages instead of
prefilling them again. Pages nobody references stay cached (least recently used first out) until the allocator
needs them (before the pool grows) or the cache's bound is reached. Page 0 is never handed out: padded queries write their K/V there.

Compiled shapes stay bounded: pool sizes are powers of two (the pool doubles when pages run out), a step reads a
power-of-two count of pages, a prefill chunk is a power of two tokens long or `prefill_chunk`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.decoding import sample_requests, image_inputs, token_logprobs
from llava_jax.models.llama import PagedKV

ROOT_KEY = b"llava-jax pages"
log = logging.getLogger("llava_jax.serve")


def pow2(n: int) -> int:
  """The smallest power of two >= n (>= 1)."""
  return 1 << max(int(n) - 1, 0).bit_length()


# -- the allocator and its prefix cache ----------------------------------------------------------------------------


class PageAllocator:
  """Pages 1..capacity-1 of a pool that can grow to `max_pages`. A page is free, in use (referenced by rows:
  `refs`), or idle (registered under a content key, referenced by nobody: kept for a later prefix hit, evicted
  least recently used first when a page is needed and none is free, or when more than `cache_pages` are idle).
  `grow(new_capacity)` is called to double the device pool."""

  def __init__(self, capacity: int, max_pages: int, cache_pages: int, grow: Callable[[int], None] | None = None):
    if capacity < 2 or capacity > max_pages or cache_pages < 0:
      raise ValueError(f"bad page pool: capacity {capacity}, max_pages {max_pages}, cache_pages {cache_pages}")
    self.capacity, self.max_pages, self.cache_pages, self.grow = capacity, max_pages, cache_pages, grow
    self.free = list(range(capacity - 1, 0, -1))  # pop() hands out the lowest first
    self.refs: dict[int, int] = {}
    self.key_of: dict[int, bytes] = {}
    self.page_of: dict[bytes, int] = {}
    self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # least recently used first
    self.evictions = 0

  @property
  def in_use(self) -> int:
    return len(self.refs)

  def available(self) -> int:
    """Pages that could still be handed out (free, idle or not yet grown)."""
    return self.max_pages - 1 - len(self.refs)

  def allocate(self) -> int:
    """A page for a row to write (reference count 1): a free one, else the least recently used idle page is
    evicted, else the pool grows (so it grows with the pages in use, not with the cache, and recompiles seldom).
    RuntimeError when every page is in use (the engine reserves pages so it is not)."""
    if not self.free and self.idle:
      self._evict(next(iter(self.idle)))
    if not self.free and self.capacity < self.max_pages:
      new = min(self.capacity * 2, self.max_pages)
      if self.grow is not None:
        self.grow(new)
      self.free = list(range(new - 1, self.capacity - 1, -1))
      self.capacity = new
    if not self.free:
      raise RuntimeError(f"all {self.max_pages - 1} KV pages are in use")
    page = self.free.pop()
    self.refs[page] = 1
    return page

  def acquire(self, page: int) -> None:
    self.refs[page] = self.refs.get(page, 0) + 1
    self.idle.pop(page, None)

  def release(self, page: int) -> None:
    self.refs[page] -= 1
    if self.refs[page]:
      return
    del self.refs[page]
    if page in self.key_of:
      self.idle[page] = None
      while len(self.idle) > self.cache_pages:
        self._evict(next(iter(self.idle)))
    else:
      self.free.append(page)

  def register(self, page: int, key: bytes) -> bool:
    """Makes a full page (in use) findable under its content key; False if that content is cached already (the
    page is then freed as usual when released)."""
    if key in self.page_of or page in self.key_of:
      return False
    self.key_of[page], self.page_of[key] = key, page
    return True

  def lookup(self, keys: Sequence[bytes]) -> list[int]:
    """The cached pages of the longest run of `keys` from the first, each acquired (reference +1)."""
    pages = []
    for key in keys:
      page = self.page_of.get(key)
      if page is None:
        break
      self.acquire(page)
      pages.append(page)
    return pages

  def _evict(self, page: int) -> None:
    del self.idle[page]
    del self.page_of[self.key_of.pop(page)]
    self.free.append(page)
    self.evictions += 1


# -- content keys ---------------------------------------------------------------------------------------------------


def image_hash(pixels: np.ndarray, size=None) -> str:
  """The content hash of one image (or video): its pixel array's bytes, shape and dtype, and its original size."""
  h = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
  h.update(repr((pixels.shape, str(pixels.dtype), None if size is None else tuple(int(s) for s in size))).encode())
  return h.hexdigest()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """(start, end) of each run of True in a 1-D bool array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def content_ids(input_ids: np.ndarray, placeholders: Sequence[tuple[int, list[str]]]) -> list[Hashable]:
  """What each prompt position holds: its token id, or for an image (video) placeholder (its image's hash, its
  index within it). `placeholders`: (token id, the hashes of its images in order). The k-th run of a placeholder
  id is the k-th image; where runs and images do not pair up, every placeholder carries the hash of all of them
  and its index among all (never a wrong reuse, only fewer hits)."""
  ids = np.asarray(input_ids).reshape(-1)
  content: list[Hashable] = [int(t) for t in ids]
  for token, hashes in placeholders:
    if token is None:
      continue
    runs = _runs(ids == token)
    if not runs:
      continue
    if len(runs) == len(hashes):
      for (start, end), h in zip(runs, hashes):
        for j in range(start, end):
          content[j] = (h, j - start)
    else:
      every = hashlib.sha256("".join(hashes).encode()).hexdigest()
      for n, j in enumerate(np.flatnonzero(ids == token).tolist()):
        content[j] = (every, n)
  return content


def chain_key(previous: bytes, page_content: Sequence[Hashable]) -> bytes:
  """key_i = sha256(key_{i-1}, the content of page i)."""
  return hashlib.sha256(previous + repr(tuple(page_content)).encode()).digest()


def page_keys(content: Sequence[Hashable], page_size: int, previous: bytes = ROOT_KEY) -> list[bytes]:
  """The chain keys of every full page of `content`."""
  keys = []
  for start in range(0, len(content) - page_size + 1, page_size):
    previous = chain_key(previous, content[start:start + page_size])
    keys.append(previous)
  return keys


class FeatureCache:
  """`Llava.image_features` per image content hash, least recently used out past `max_images`."""

  def __init__(self, max_images: int):
    self.max_images, self.items = max_images, collections.OrderedDict()
    self.hits = 0

  def get(self, key: str):
    value = self.items.get(key)
    if value is not None:
      self.items.move_to_end(key)
      self.hits += 1
    return value

  def put(self, key: str, value) -> None:
    if self.max_images < 1:
      return
    self.items[key] = value
    self.items.move_to_end(key)
    while len(self.items) > self.max_images:
      self.items.popitem(last=False)


# -- a row's pages, and the memory that holds every row's -------------------------------------------------------------


@dataclasses.dataclass
class RowPages:
  """One row's share of the memory: what each position holds (prompt content ids, then reply tokens as they are
  written), the chain keys of its full pages, its page table, the most pages it will hold, positions filled."""
  content: list
  keys: list
  pages: list
  reserved: int
  filled: int = 0


class KVMemory:
  """The page pools (device) and their allocator (host) for a model: rows admitted with their cached prefix and
  their pages reserved, a slot per written position, full pages registered, pages released.

  max_tokens: the pool's bound (rounded up to a power-of-two page count, one page for padding); row_tokens: the
  most positions one row holds (the pool must hold one row); cache_tokens: positions of idle pages kept."""

  def __init__(self, model, *, page_size: int, max_tokens: int, row_tokens: int, cache_tokens: int,
               initial_pages: int):
    max_pages = pow2(-(-max_tokens // page_size))
    if max_pages - 1 < -(-row_tokens // page_size):
      raise ValueError(f"max_kv_tokens {max_tokens} cannot hold one row of max_len {row_tokens} (in pages of "
                       f"{page_size}, a power-of-two count of them, one for padding)")
    capacity = min(max_pages, pow2(max(initial_pages, 2)))
    self.page_size, self.pools = page_size, init_pools(model, capacity, page_size)
    self.allocator = PageAllocator(capacity, max_pages, cache_tokens // page_size, grow=self._grow)
    t = model.config.text
    self.token_bytes = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * jnp.dtype(
        model.config.dtype).itemsize

  def _grow(self, pages: int):
    self.pools = grow_pools(self.pools, pages=pages)
    log.info("KV pool grown to %d pages of %d positions", pages, self.page_size)

  def admit(self, content: list, prompt_tokens: int, most_tokens: int, rows: Sequence[RowPages]) -> RowPages | None:
    """A row for a prompt: its longest cached prefix (at least its last token left to prefill: it gives the
    logits) and `most_tokens` positions' pages reserved, or None when the pool cannot hold them beside what
    `rows` (those in flight) may still take."""
    ps, pages = self.page_size, self.allocator
    keys = page_keys(content[:prompt_tokens - 1], ps)
    hits = pages.lookup(keys)
    reserved = -(-most_tokens // ps)
    if sum(r.reserved - len(r.pages) for r in rows) + reserved - len(hits) > pages.available():
      for page in hits:
        pages.release(page)
      return None
    return RowPages(list(content), keys[:len(hits)], hits, reserved, len(hits) * ps)

  def slot(self, row: RowPages, position: int) -> int:
    """The flat pool slot of the row's `position`, taking a new page when it starts one."""
    page = position // self.page_size
    if page == len(row.pages):
      row.pages.append(self.allocator.allocate())
    return row.pages[page] * self.page_size + position % self.page_size

  def register(self, row: RowPages) -> None:
    """Keys the row's pages that are now full, so a later prompt that begins the same reuses them."""
    ps = self.page_size
    while len(row.keys) < row.filled // ps:
      k = len(row.keys)
      row.keys.append(chain_key(row.keys[-1] if row.keys else ROOT_KEY, row.content[k * ps:(k + 1) * ps]))
      self.allocator.register(row.pages[k], row.keys[-1])

  def release(self, row: RowPages) -> None:
    for page in reversed(row.pages):  # the end of a prefix is the first to go from the cache, not its start
      self.allocator.release(page)
    row.pages = []

  def page_table(self, rows: Sequence[RowPages | None]) -> np.ndarray:
    """The rows' page tables, padded with page 0 to a power-of-two count (bounded compiles); None: page 0."""
    table = np.zeros((len(rows), pow2(max(len(r.pages) if r else 1 for r in rows))), np.int32)
    for b, r in enumerate(rows):
      if r is not None:
        table[b, :len(r.pages)] = r.pages
    return table

  def usage(self, rows: Sequence[RowPages]) -> dict:
    """The metrics of the memory: pages and bytes in use, allocated, and the K/V of the positions rows hold."""
    held: dict[int, int] = {}  # page -> positions filled in it, by any row that holds it
    for r in rows:
      for i, page in enumerate(list(r.pages)):
        held[page] = max(held.get(page, 0), min(self.page_size, r.filled - i * self.page_size))
    pages, page_bytes = self.allocator, self.page_size * self.token_bytes
    return {"kv_pages_in_use": pages.in_use, "kv_bytes_in_use": pages.in_use * page_bytes,
            "kv_bytes_allocated": pages.capacity * page_bytes, "kv_token_bytes": sum(held.values()) * self.token_bytes,
            "kv_pages_cached": len(pages.idle), "kv_page_evictions": pages.evictions, "page_size": self.page_size}


# -- compiled: the pool, the embeddings, a forward pass over pages --------------------------------------------------


def init_pools(model, pages: int, page_size: int) -> list[tuple]:
  t = model.config.text
  shape = (pages, page_size, t.num_key_value_heads, t.head_dim)
  dtype = jnp.dtype(model.config.dtype)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(t.num_hidden_layers)]


@functools.partial(jax.jit, static_argnames=("pages",))
def grow_pools(pools, *, pages: int):
  """The pools with zero pages appended up to `pages`."""
  return [tuple(jnp.concatenate([p, jnp.zeros((pages - p.shape[0], *p.shape[1:]), p.dtype)]) for p in kv)
          for kv in pools]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def image_features(graphdef, state, pixel_values):
  """`Llava.image_features` of one image's pixels [N, H, W, C] (N: 1, or its tiles)."""
  return nnx.merge(graphdef, state).image_features(pixel_values)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed_prompt(graphdef, state, input_ids, images: dict, features):
  """A prompt's input embeddings [1, T, D], image features `features` given (or computed, if None)."""
  return nnx.merge(graphdef, state).embed(input_ids, **images, precomputed_features=features)


@functools.partial(jax.jit, static_argnames=("length",))
def slice_tokens(embeds, start, *, length: int):
  """embeds[:, start:start + length] (the array is padded so that it is always in range)."""
  return jax.lax.dynamic_slice_in_dim(embeds, start, length, axis=1)


def prompt_embeddings(model, graphdef, state, input_ids, pixels, sizes, videos, image_keys: Sequence[str],
                      features: FeatureCache):
  """A prompt's input embeddings [1, T, D] for input_ids [1, T] (padded as the caller likes), each image's features
  from `features` (keyed by `image_keys`) or the tower (then kept there); videos always through the tower."""
  images = image_inputs(model, input_ids, pixels, None, sizes, videos)
  computed = None
  if pixels is not None:
    per_image = []
    for key, p in zip(image_keys, pixels):
      f = features.get(key)
      if f is None:
        f = image_features(graphdef, state, jnp.asarray(p.reshape(-1, *p.shape[-3:])))
        features.put(key, f)
      per_image.append(f)
    computed = jnp.concatenate(per_image)
  return embed_prompt(graphdef, state, jnp.asarray(input_ids), images, computed)


def paged_mask(positions, lengths, key_count: int, sliding_window=None):
  """bool [B, 1, T, S]: key j of a row (at position j) is visible to a query at position p if j <= p, j is filled
  (< the row's length) and, with Mistral's `sliding_window`, j > p - window."""
  j = jnp.arange(key_count)[None, None, :]
  p = positions[:, :, None]
  mask = (j <= p) & (j < lengths[:, None, None])
  if sliding_window is not None:
    mask = mask & (j > p - sliding_window)
  return mask[:, None]


def _forward(model, pools, embeds, positions, write_slots, read_pages, lengths, last, settings, logprobs: bool):
  key_count = read_pages.shape[1] * pools[0][0].shape[1]
  mask = paged_mask(positions, lengths, key_count, model.config.text.sliding_window)
  caches = [PagedKV(k, v, write_slots, read_pages) for k, v in pools]
  out = model.decode(embeds, positions, mask, caches=caches)
  hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]
  logits = model.logits_from_hidden(hidden).astype(jnp.float32)
  tokens = sample_requests(logits, settings)
  return (tokens, [(c.k_pool, c.v_pool) for c in out.caches],
          token_logprobs(logits, tokens) if logprobs else None)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pools",))
def prefill_chunk(graphdef, state, pools, embeds, positions, write_slots, read_pages, lengths, last, settings):
  """A chunk of prompt embeddings [B, T, D] at `positions` [B, T] written at `write_slots` [B, T]; the token
  sampled from each row's query `last` [B] (used after a prompt's final chunk). Returns (tokens [B], pools, the
  tokens' `token_logprobs`: a few rows' top-k is cheap next to a prefill, so always computed)."""
  return _forward(nnx.merge(graphdef, state), pools, embeds, positions, write_slots, read_pages, lengths, last,
                  settings, True)


@functools.partial(jax.jit, static_argnames=("graphdef", "logprobs"), donate_argnames=("pools",))
def decode_step(graphdef, state, pools, tokens, positions, write_slots, read_pages, lengths, settings,
                logprobs: bool = False):
  """Every row's token [B] at its position [B], written at its slot [B]; returns (next tokens [B], pools, their
  `token_logprobs` or None): the top-k over the vocabulary only in the variant compiled for steps where a row
  asked for them."""
  model = nnx.merge(graphdef, state)
  embeds = model.language_model.embed_tokens(tokens[:, None])  # a sampled image-token id is a plain token here
  return _forward(model, pools, embeds, positions[:, None], write_slots[:, None], read_pages, lengths,
                  jnp.zeros_like(tokens), settings, logprobs)
