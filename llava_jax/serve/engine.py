"""One engine owns the model and batches concurrent requests into one compiled decode step (continuous batching).

The batch has a fixed number of rows (`max_batch`); their K/V live in a paged pool (`llava_jax.serve.paged`): each
row holds a table of fixed-size pages, a page full of the same content (same tokens, same images, same beginning)
is shared between rows and kept after its row finished, so a prompt that starts like an earlier one (the next turn
of a chat) prefills only what is new. A request's prompt embeddings are computed once when it takes a row (each
image's features from a cache or the tower), then prefilled in chunks, up to `prefill_chunk` tokens per engine
iteration between decode steps, so the rows already decoding keep producing tokens while a long prompt comes in
(several short prompts share an iteration's budget). One compiled step advances every decoding row by one token,
reading only the pages in use (a power-of-two page count). Each request samples as row 0 of its own with its seed
(`llava_jax.decoding`'s keys), so it gets what `generate(..., seed=...)` gives, and its text streams through
`llava_jax.decoding.Detokenizer`. New requests join and finished ones leave at step boundaries; compiled shapes
stay bounded (prompt buckets, chunk lengths, page-count buckets and pool sizes are powers of two or fixed).

The engine runs in its own thread; callers `submit` a `Request` and receive `Delta` / `Finished` events through a
callback (thread-safe queue for plain threads, `loop.call_soon_threadsafe` for asyncio).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.decoding import TOP_LOGPROBS, Detokenizer, Sampling
from llava_jax.padding import round_up
from llava_jax.serve.paged import (FeatureCache, KVMemory, RowPages, content_ids, decode_step, image_hash, pow2,
                                   prefill_chunk, prompt_embeddings, slice_tokens)

log = logging.getLogger("llava_jax.serve")
MIN_CHUNK = 16  # the shortest prefill chunk compiled (a next turn's few new tokens): fewer shapes to compile


class QueueFull(Exception):
  """The waiting queue is at its bound: the API answers 429."""


class BadRequest(ValueError):
  """The request cannot be served as given (too long, bad settings): the API answers 400."""


@dataclasses.dataclass
class Request:
  """One chat completion: the rendered prompt's model inputs plus how to sample and when to stop."""
  input_ids: np.ndarray                 # [T] int32, the rendered prompt (image tags expanded)
  pixel_values: np.ndarray | None = None  # [N, H, W, 3] (LLaVA-1.5) or [N, P, H, W, 3] (NeXT), or None
  image_sizes: np.ndarray | None = None   # [N, 2] for NeXT and OneVision
  pixel_values_videos: np.ndarray | None = None  # [V, F, H, W, 3] for OneVision
  max_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0  # 0: off
  seed: int = 0
  stop: Sequence[str] = ()
  ignore_eos: bool = False  # vLLM's extension: replies of exactly max_tokens (benchmarks)
  logprobs: int | None = None  # None: no log-probabilities; n: each reply token's and its n most likely (0..20)


class TokenLogprob(NamedTuple):
  """One reply token's log-probability under the model (`llava_jax.decoding.token_logprobs`) and the `n` most
  likely tokens' (id, log-probability), most likely first."""
  token: int
  logprob: float
  top: tuple


@dataclasses.dataclass
class Delta:
  text: str
  logprobs: list | None = None  # the TokenLogprobs of the tokens this text completes (held-back ones included)


@dataclasses.dataclass
class Finished:
  text: str                 # the whole reply (cut at a stop string)
  reason: str               # "stop" (EOS or a stop string), "length" (max_tokens or the context), "cancelled"
  prompt_tokens: int
  completion_tokens: int
  logprobs: list | None = None  # every reply token's TokenLogprob (one per completion token; EOS is none)


@dataclasses.dataclass
class Failed:
  message: str


class Handle:
  """A submitted request: `cancel()` frees its row at the next step boundary (e.g. when the client is gone)."""

  def __init__(self, request: Request, emit: Callable, request_id: int):
    self.request, self.emit, self.id = request, emit, request_id
    self.cancelled = threading.Event()
    self.submitted = time.perf_counter()

  def cancel(self):
    self.cancelled.set()


class QueueEvents:
  """A thread-safe event sink for synchronous callers (the web page, tests): iterate to get events until done."""

  def __init__(self):
    self.queue: queue.Queue = queue.Queue()

  def __call__(self, event):
    self.queue.put(event)

  def __iter__(self):
    while True:
      event = self.queue.get()
      yield event
      if isinstance(event, (Finished, Failed)):
        return


# -- the engine ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
  handle: Handle
  prompt_tokens: int
  text: Detokenizer     # the reply's ids and the text already emitted as deltas
  limit: int            # the reply's most tokens: max_tokens, lowered to what the model's context leaves
  kv: RowPages          # its pages, and the positions filled
  embeds: object = None  # the prompt's input embeddings while it is being prefilled, else None
  token: int = 0        # the last sampled token, not yet in the cache (at position `kv.filled`)
  logprobs: list | None = None  # the reply's TokenLogprobs when asked for; `shown` of them went out with deltas
  shown: int = 0

  def settings(self) -> tuple:
    """`llava_jax.decoding`'s per-request sampling settings; the counter is the next token's index."""
    r = self.handle.request
    return r.temperature, r.top_p, r.top_k, r.seed, len(self.text.ids)


class Engine:
  """Owns the model; serves `Request`s from a bounded queue in one background thread.

  max_batch: rows decoded together. max_len: the most positions a row holds (prompt plus reply). max_queue:
  requests waiting for a row before `submit` raises QueueFull. eos_id: ends a reply; stop_strings: the template's
  stop text, added to every request's `stop`. byte_token_ids: SentencePiece's byte-fallback tokens (<0x..>), whose
  decoding a following byte can still rewrite, so streaming holds them back. context: the model's positions
  (`text.max_position_embeddings`); a reply stops there with "length", as `llava-jax generate` lowers
  --max-new-tokens to what the prompt leaves of it. prompt_bucket: a prompt's embeddings are computed at a length
  rounded up to it (one compile per bucket).

  The KV memory (serve/paged.py): pages of `page_size` positions in a pool that starts at `initial_pages` (default:
  one row of max_len, so one request never makes it grow) and doubles up to `max_kv_tokens` (default: max_batch x
  max_len, what a static cache would take); up to `prefix_cache_tokens` (default: half of max_kv_tokens) of pages
  no row uses stay cached for prefix reuse; `image_cache` images' features are kept; prompts are prefilled up to
  `prefill_chunk` tokens per engine iteration, `decode_prefill_chunk` (default: the same) while other rows decode
  (a chunk delays every decoding row's next token by its time: small chunks keep their gaps near a step's, but
  slow the admission of every new request under load)."""

  def __init__(self, model, *, max_batch: int = 8, max_len: int = 1024, prompt_bucket: int = 32,
               max_queue: int = 64, eos_id: int | None = None, pad_id: int = 0, decode: Callable | None = None,
               stop_strings: Sequence[str] = (), byte_token_ids: Sequence[int] = (), log_every: int = 100,
               context: int | None = None, page_size: int = 16, max_kv_tokens: int | None = None,
               prefix_cache_tokens: int | None = None, image_cache: int = 64, prefill_chunk: int = 256,
               initial_pages: int | None = None, decode_prefill_chunk: int | None = None):
    # A zero batch, bucket, page or chunk would hang or divide by zero; 0 turns the two caches off.
    for name, value, low in (("max_batch", max_batch, 1), ("max_len", max_len, 1), ("prompt_bucket", prompt_bucket, 1),
                             ("max_queue", max_queue, 1), ("page_size", page_size, 1),
                             ("prefill_chunk", prefill_chunk, 1), ("decode_prefill_chunk", decode_prefill_chunk, 1),
                             ("max_kv_tokens", max_kv_tokens, 1),
                             ("initial_pages", initial_pages, 1), ("prefix_cache_tokens", prefix_cache_tokens, 0),
                             ("image_cache", image_cache, 0)):
      if value is None and name in ("max_kv_tokens", "prefix_cache_tokens", "initial_pages",
                                    "decode_prefill_chunk"):  # their defaults
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_len % prompt_bucket or max_len <= prompt_bucket:
      raise ValueError(f"max_len {max_len} must be a multiple of prompt_bucket {prompt_bucket} and larger than it")
    max_kv_tokens = max_kv_tokens or max_batch * max_len
    cache_tokens = max_kv_tokens // 2 if prefix_cache_tokens is None else prefix_cache_tokens
    self.model, self.max_batch, self.max_len, self.prompt_bucket = model, max_batch, max_len, prompt_bucket
    self.page_size, self.prefill_chunk, self.context = page_size, prefill_chunk, context
    self.decode_prefill_chunk = min(decode_prefill_chunk or prefill_chunk, prefill_chunk)  # never the larger
    self.eos_id, self.pad_id, self.decode_ids = eos_id, pad_id, decode or (lambda ids: "")
    self.stop_strings, self.log_every = tuple(s for s in stop_strings if s), log_every
    self.byte_token_ids = frozenset(int(i) for i in byte_token_ids)
    self.graphdef, self.state = nnx.split(model)
    self.kv = KVMemory(model, page_size=page_size, max_tokens=max_kv_tokens, row_tokens=max_len,
                       cache_tokens=cache_tokens, initial_pages=initial_pages or -(-max_len // page_size) + 1)
    self.token_bytes = self.kv.token_bytes
    self.features = FeatureCache(image_cache)
    self.rows: list[_Row | None] = [None] * max_batch
    self.prefilling: collections.deque[int] = collections.deque()  # rows whose prompt is not all in the pages
    self.next_handle: Handle | None = None  # the queue's head, waiting for pages
    self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
    self.wake = threading.Event()
    self.ids = itertools.count()
    self.stats = {"steps": 0, "rows_per_step": collections.Counter(), "prefills": 0, "completed": 0,
                  "cancelled": 0, "failed": 0, "generated_tokens": 0, "rejected": 0, "prefix_hit_tokens": 0,
                  "prefill_tokens": 0, "prefill_chunks": 0}
    self.lock = threading.Lock()
    self.stopping = False
    self.running = threading.Event()
    self.running.set()
    self.thread = threading.Thread(target=self._loop, name="llava-jax-engine", daemon=True)
    self.thread.start()

  # -- public ----------------------------------------------------------------------------------------------------

  def check(self, request: Request) -> None:
    """Raises BadRequest for what no row could serve (checked before queueing, so the client gets a 400)."""
    n = len(request.input_ids)
    padded = round_up(n, self.prompt_bucket)
    if padded >= self.max_len:
      raise BadRequest(f"the prompt is {n} tokens ({padded} padded to the bucket of {self.prompt_bucket}), longer "
                       f"than this server's context of {self.max_len} tokens allows")
    if request.max_tokens < 1:
      raise BadRequest(f"max_tokens must be at least 1, got {request.max_tokens}")
    if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS:
      raise BadRequest(f"top_logprobs must be from 0 to {TOP_LOGPROBS}, got {request.logprobs}")
    try:
      Sampling(request.temperature, request.top_p, request.top_k)
    except ValueError as e:
      raise BadRequest(str(e)) from None

  def reply_limit(self, request: Request) -> int:
    """The most tokens a reply to `request` gets: its max_tokens, lowered to what the prompt leaves of the model's
    context (at least 1: the first new token needs no position of its own), as `llava-jax generate` does."""
    if self.context is None:
      return request.max_tokens
    return min(request.max_tokens, max(self.context - len(request.input_ids), 1))

  def submit(self, request: Request, emit: Callable) -> Handle:
    """Queues a request; its events go to `emit` (called from the engine thread). Raises BadRequest or QueueFull."""
    self.check(request)
    handle = Handle(request, emit, next(self.ids))
    try:
      self.waiting.put_nowait(handle)
    except queue.Full:
      with self.lock:
        self.stats["rejected"] += 1
      raise QueueFull(f"{self.waiting.maxsize} requests are already waiting; retry later") from None
    self.wake.set()
    return handle

  def metrics(self) -> dict:
    with self.lock:
      steps = self.stats["steps"]
      hist = dict(sorted(self.stats["rows_per_step"].items()))
      rows = sum(k * v for k, v in hist.items())
      kv = self.kv.usage([r.kv for r in self.rows if r is not None])
      return {**{k: v for k, v in self.stats.items() if k != "rows_per_step"},
              "rows_per_step": {str(k): v for k, v in hist.items()},
              "mean_rows_per_step": rows / steps if steps else 0.0, "max_batch": self.max_batch,
              "max_len": self.max_len, "active_rows": sum(r is not None for r in self.rows),
              "queued": self.waiting.qsize() + (self.next_handle is not None), **kv,
              "image_cache_hits": self.features.hits}

  def pause(self):
    """Stops taking requests from the queue (after the step in progress) until `resume`; for maintenance and to
    test the queue's bound deterministically."""
    self.running.clear()

  def resume(self):
    self.running.set()
    self.wake.set()

  def close(self):
    self.stopping = True
    self.resume()
    self.thread.join(timeout=10)

  # -- the loop --------------------------------------------------------------------------------------------------

  def _loop(self):
    while not self.stopping:
      if not self.running.is_set():
        self.running.wait(timeout=0.5)
        continue
      try:
        self._admit()
        self._prefill()
        if any(r is not None and r.embeds is None for r in self.rows):
          self._step()
        elif not self.prefilling:
          self.wake.wait(timeout=0.5)
          self.wake.clear()
      except Exception as e:  # pylint: disable=broad-except
        # Never let one bad batch take the server down: fail the rows in flight and go on.
        log.exception("engine step failed")
        for i, row in enumerate(self.rows):
          if row is not None:
            self._finish(i, None, failure=f"internal error: {e}")

  def _admit(self):
    """Starts waiting requests in free rows while their pages can be reserved (a step boundary)."""
    for i in range(self.max_batch):
      if self.rows[i] is not None:
        continue
      handle = self.next_handle
      if handle is None:
        try:
          handle = self.waiting.get_nowait()
        except queue.Empty:
          return
      self.next_handle = None
      if handle.cancelled.is_set():
        self._count("cancelled")
        handle.emit(Finished("", "cancelled", len(handle.request.input_ids), 0))
        continue
      try:
        if not self._start(i, handle):
          self.next_handle = handle  # first in line once pages are released
          return
      except Exception as e:  # pylint: disable=broad-except
        log.exception("prefill failed")
        self._count("failed")
        handle.emit(Failed(f"could not process the prompt: {e}"))

  def _start(self, i: int, handle: Handle) -> bool:
    """Row i takes the request: its cached prefix pages, its pages reserved, its embeddings. False (nothing
    changed) when the pool cannot reserve its pages while the rows in flight hold theirs."""
    req = handle.request
    ids = np.asarray(req.input_ids, np.int32)
    n = len(ids)
    pixels = None if req.pixel_values is None else np.asarray(req.pixel_values, np.float32)
    videos = None if req.pixel_values_videos is None else np.asarray(req.pixel_values_videos, np.float32)
    sizes = None if req.image_sizes is None else np.asarray(req.image_sizes)
    image_keys = [] if pixels is None else [image_hash(p, None if sizes is None else sizes[k])
                                            for k, p in enumerate(pixels)]
    cfg = self.model.config
    content = content_ids(ids, [(cfg.image_token_index, image_keys),
                                (cfg.video_token_index, [] if videos is None else [image_hash(v) for v in videos])])
    limit = self.reply_limit(req)
    kv = self.kv.admit(content, n, min(n + limit, self.max_len), [r.kv for r in self.rows if r is not None])
    if kv is None:
      return False
    row = _Row(handle, n, Detokenizer(self.decode_ids, self.stop_strings + tuple(req.stop), self.byte_token_ids),
               limit, kv, logprobs=None if req.logprobs is None else [])
    try:  # right-padded so that every chunk slices in range; one compile per bucket
      input_ids = np.full((1, round_up(n + self.prefill_chunk, self.prompt_bucket)), self.pad_id, np.int32)
      input_ids[0, :n] = ids
      row.embeds = prompt_embeddings(self.model, self.graphdef, self.state, input_ids, pixels, sizes, videos,
                                     image_keys, self.features)
    except Exception:
      self.kv.release(kv)
      raise
    with self.lock:
      self.stats["prefix_hit_tokens"] += kv.filled
      self.stats["prefills"] += 1
    self.rows[i] = row
    self.prefilling.append(i)
    return True

  def _prefill(self):
    """Prompt chunks up to `prefill_chunk` tokens in all (`decode_prefill_chunk` while rows decode; at least one
    chunk), first come first served: a long prompt takes one chunk per iteration, several short ones share one."""
    decoding = any(r is not None and r.embeds is None for r in self.rows)
    budget = self.decode_prefill_chunk if decoding else self.prefill_chunk
    spent = 0
    while self.prefilling:
      r = self.rows[self.prefilling[0]]
      real = min(r.prompt_tokens - r.kv.filled, budget)
      if spent and spent + real > budget:
        return
      self._prefill_chunk(budget)
      spent += real

  def _prefill_chunk(self, budget: int):
    """The next chunk (at most `budget` tokens) of the first prefilling row's prompt; its first token once the
    prompt is all in."""
    i = self.prefilling[0]
    r = self.rows[i]
    if r.handle.cancelled.is_set():
      self._finish(i, "cancelled")
      return
    start = r.kv.filled
    left = r.prompt_tokens - start
    length = min(budget, pow2(max(left, MIN_CHUNK)))
    real = min(left, length)
    positions = np.full((1, length), start + real - 1, np.int32)
    positions[0, :real] = np.arange(start, start + real)
    slots = np.zeros((1, length), np.int32)  # padding writes to page 0
    slots[0, :real] = [self.kv.slot(r.kv, p) for p in range(start, start + real)]
    embeds = slice_tokens(r.embeds, jnp.int32(start), length=length)
    token, self.kv.pools, logprobs = prefill_chunk(
        self.graphdef, self.state, self.kv.pools, embeds, jnp.asarray(positions), jnp.asarray(slots),
        jnp.asarray(self.kv.page_table([r.kv])), jnp.asarray([start + real], jnp.int32),
        jnp.asarray([real - 1], jnp.int32), _settings([r.settings()]))
    r.kv.filled += real
    self.kv.register(r.kv)
    with self.lock:
      self.stats["prefill_tokens"] += real
      self.stats["prefill_chunks"] += 1
    if r.kv.filled < r.prompt_tokens:
      return
    self.prefilling.popleft()
    r.embeds, r.token = None, int(np.asarray(token)[0])
    self._advance(i, r.token, tuple(np.asarray(x)[0] for x in logprobs))

  def _step(self):
    """One token for every decoding row. The step runs the rows up to the last decoding one, their count rounded up
    to a power of two (new requests take the lowest free row, so a light load runs a small step); prefilling and
    free rows among them ride along on page 0, their output unused."""
    decoding = [i for i, r in enumerate(self.rows) if r is not None and r.embeds is None]
    b = min(pow2(decoding[-1] + 1), self.max_batch)
    rows = [r if r is not None and r.embeds is None else None for r in self.rows[:b]]
    active = [i for i, r in enumerate(rows) if r is not None]
    tokens, positions, slots = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
    lengths = np.ones(b, np.int32)
    for i in active:
      r = rows[i]
      tokens[i], positions[i], slots[i] = r.token, r.kv.filled, self.kv.slot(r.kv, r.kv.filled)
      lengths[i] = r.kv.filled + 1
      r.kv.content.append(r.token)
    settings = _settings([(0.0, 1.0, 0, 0, 0) if r is None else r.settings() for r in rows])  # free: greedy
    table = self.kv.page_table([None if r is None else r.kv for r in rows])
    want_logprobs = any(rows[i].logprobs is not None for i in active)
    new, self.kv.pools, logprobs = decode_step(self.graphdef, self.state, self.kv.pools, jnp.asarray(tokens),
                                               jnp.asarray(positions), jnp.asarray(slots), jnp.asarray(table),
                                               jnp.asarray(lengths), settings, logprobs=want_logprobs)
    new = np.asarray(new)
    logprobs = [np.asarray(x) for x in logprobs] if want_logprobs else None
    with self.lock:
      self.stats["steps"] += 1
      self.stats["rows_per_step"][len(active)] += 1
      steps = self.stats["steps"]
    if self.log_every and steps % self.log_every == 0:
      m = self.metrics()
      log.info("step %d: mean rows per decode step %.2f, histogram %s, %d queued, %d KV pages in use", steps,
               m["mean_rows_per_step"], m["rows_per_step"], m["queued"], m["kv_pages_in_use"])
    for i in active:
      r = rows[i]
      r.kv.filled += 1
      self.kv.register(r.kv)
      r.token = int(new[i])
      self._advance(i, r.token, None if logprobs is None else tuple(x[i] for x in logprobs))

  def _advance(self, i: int, token: int, logprobs: tuple | None = None):
    """Takes row i's newly sampled token (and its `token_logprobs` row): emits text, or finishes the row (EOS,
    stop string, limits, cancel)."""
    r = self.rows[i]
    if r.handle.cancelled.is_set():
      return self._finish(i, "cancelled")
    if self.eos_id is not None and token == self.eos_id and not r.handle.request.ignore_eos:
      return self._finish(i, "stop")
    if r.logprobs is not None:
      chosen, ids, top = logprobs
      n = r.handle.request.logprobs
      r.logprobs.append(TokenLogprob(token, float(chosen), tuple(zip(ids[:n].tolist(), top[:n].tolist()))))
    delta = r.text.add(token)
    if delta:
      r.handle.emit(Delta(delta, self._unshown(r)))
    if r.text.stopped:
      return self._finish(i, "stop")
    if len(r.text.ids) >= r.limit or r.kv.filled >= self.max_len:
      return self._finish(i, "length")
    return None

  def _finish(self, i: int, reason: str | None, failure: str | None = None):
    r = self.rows[i]
    self.rows[i] = None
    if i in self.prefilling:
      self.prefilling.remove(i)
    self.kv.release(r.kv)
    if failure is not None:
      self._count("failed")
      r.handle.emit(Failed(failure))
      return
    rest = r.text.finish()
    if reason != "cancelled" and rest:
      r.handle.emit(Delta(rest, self._unshown(r)))
    with self.lock:
      self.stats["completed" if reason != "cancelled" else "cancelled"] += 1
      self.stats["generated_tokens"] += len(r.text.ids)
    r.handle.emit(Finished(r.text.text, reason, r.prompt_tokens, len(r.text.ids), r.logprobs))

  @staticmethod
  def _unshown(r: _Row) -> list | None:
    """The row's TokenLogprobs not yet sent with a delta (None when the request did not ask for them)."""
    if r.logprobs is None:
      return None
    unshown, r.shown = r.logprobs[r.shown:], len(r.logprobs)
    return unshown

  def _count(self, key: str):
    with self.lock:
      self.stats[key] += 1


def _settings(rows) -> tuple:
  """Per-row (temperature, top_p, top_k, seed, counter) tuples -> the five arrays `llava_jax.decoding` takes."""
  temperature, top_p, top_k, seeds, counters = zip(*rows)
  return (jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32), jnp.asarray(top_k, jnp.int32),
          jnp.asarray([int(s) % 2**32 for s in seeds], jnp.uint32), jnp.asarray(counters, jnp.int32))
