"""The engine's paged KV memory: greedy replies equal `llava_jax.generate`'s with prefix reuse (a chat's next
turn, rows sharing a prefix, evictions from a tiny pool), chunked prefill while other rows decode, a pool that
grows, the image-feature cache; and the page allocator, prefix cache and content keys on their own."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
import serve_tiny
from llava_jax import generate, load_checkpoint, load_hf_checkpoint
from llava_jax.processor import Processor
from llava_jax.serve import paged as paged_module
from llava_jax.serve.engine import Delta, Engine, Finished, QueueEvents, Request
from llava_jax.serve.paged import PageAllocator, content_ids, image_hash, page_keys

NEW = 10


def ids_text(ids) -> str:
  return "".join(f"{i} " for i in ids)


def make_engine(model, **kw) -> Engine:
  """Replies as token ids (the text is the ids), no EOS: every reply is max_tokens long."""
  return Engine(model, **{"max_batch": 4, "max_len": 256, "prompt_bucket": 32, "eos_id": None,
                          "decode": ids_text, "page_size": 8, "prefill_chunk": 16, **kw})


def reference(model, ids, pixels=None, sizes=None, new=NEW) -> list[int]:
  return generate(model, np.asarray([ids]), None if pixels is None else jnp.asarray(pixels), max_new_tokens=new,
                  eos_token_id=(), image_sizes=None if sizes is None else np.asarray(sizes)).tolist()[0]


def ask(engine, ids, pixels=None, sizes=None, new=NEW, events=None) -> list[int]:
  events = events or QueueEvents()
  engine.submit(Request(np.asarray(ids, np.int32), pixel_values=pixels, image_sizes=sizes, max_tokens=new), events)
  finished = [e for e in events if isinstance(e, Finished)][0]
  return [int(t) for t in finished.text.split()]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  """LLaVA-1.5: the serving tests' tiny converted checkpoint and its processor."""
  model = load_checkpoint(serve_tiny.make_checkpoint(tmp_path_factory.mktemp("paged")))
  return model, Processor.from_model(model)


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
  """LLaVA-NeXT (anyres, 56-px tiles) with a tokenizer that has <image> and its processor."""
  return hf_tiny.next_checkpoint(str(tmp_path_factory.mktemp("paged_next")))[1:]


def first_turn(proc, question, image):
  inputs = proc(proc.prompt([question], image=image is not None), None if image is None else [image])
  return inputs["input_ids"][0].tolist(), inputs["pixel_values"], inputs.get("image_sizes")


def next_turn(proc, ids, reply, question) -> list[int]:
  """The next turn's prompt as the ids: this turn's prompt, its reply, then the new question's tokens."""
  return ids + reply + proc.tokenizer.encode(" USER: " + question + " ASSISTANT:", add_special_tokens=False)


class CountingTower:
  """Counts the engine's calls of the tower (`paged.image_features`)."""

  def __init__(self, monkeypatch):
    self.calls, real = 0, paged_module.image_features

    def counted(*args):
      self.calls += 1
      return real(*args)

    monkeypatch.setattr(paged_module, "image_features", counted)


@pytest.mark.parametrize("family", ["llava", "next"])
def test_two_turns_match_generate_and_the_second_reuses_pages_and_features(family, llava, next_model, monkeypatch):
  """Turn 2 = turn 1's prompt + reply + a new question: its answer is generate's, with the pages of turn 1's
  prompt and reply reused (prefix hit) and the image's features from the cache (the tower not run again). The
  pool starts at 2 pages and grows; prompts are prefilled 16 tokens a chunk."""
  model, proc = llava if family == "llava" else next_model
  tower = CountingTower(monkeypatch)
  image = serve_tiny.image(0, (40, 30) if family == "llava" else (70, 50))
  ids, pixels, sizes = first_turn(proc, "What is in the image?", image)
  engine = make_engine(model, initial_pages=2, max_len=512)
  try:
    reply = ask(engine, ids, pixels, sizes)
    assert reply == reference(model, ids, pixels, sizes)
    m1 = engine.metrics()
    assert m1["prefix_hit_tokens"] == 0 and m1["prefill_tokens"] == len(ids) and tower.calls == 1
    assert m1["prefill_chunks"] == -(-len(ids) // 16)
    assert m1["kv_bytes_allocated"] > 2 * 8 * engine.token_bytes  # grew from 2 pages (one of them the padding's)
    ids2 = next_turn(proc, ids, reply, "Describe it.")
    assert ask(engine, ids2, pixels, sizes) == reference(model, ids2, pixels, sizes)
    m2 = engine.metrics()
  finally:
    engine.close()
  written = len(ids) + NEW - 1  # turn 1's prompt and reply, but its last token: sampled, never fed back
  assert m2["prefix_hit_tokens"] == written // 8 * 8
  assert m2["prefill_tokens"] - m1["prefill_tokens"] == len(ids2) - written // 8 * 8
  assert tower.calls == 1 and m2["image_cache_hits"] == 1
  assert m2["kv_pages_in_use"] == 0 and m2["kv_bytes_in_use"] == 0 and m2["kv_token_bytes"] == 0


def test_rows_share_a_cached_prefix_and_a_tiny_pool_evicts(llava):
  """Two rows at once extend a cached prompt (both reuse its pages); then a pool of one row's pages serves
  prompts one after another, evicting cached pages, every answer still generate's."""
  model, proc = llava
  base, _, _ = first_turn(proc, "Tell me about the weather in the mountains today, please.", None)
  follow = [base + proc.tokenizer.encode(f" And {w}?", add_special_tokens=False) for w in ("rain", "snow")]
  engine = make_engine(model)
  try:
    assert ask(engine, base) == reference(model, base)
    engine.pause()
    sinks = [QueueEvents(), QueueEvents()]
    for ids, sink in zip(follow, sinks):
      engine.submit(Request(np.asarray(ids, np.int32), max_tokens=NEW), sink)
    engine.resume()
    replies = [[int(t) for t in [e for e in sink if isinstance(e, Finished)][0].text.split()] for sink in sinks]
    m = engine.metrics()
  finally:
    engine.close()
  assert replies == [reference(model, ids) for ids in follow]
  assert m["prefix_hit_tokens"] == 2 * (len(base) // 8 * 8)
  assert m["rows_per_step"].get("2")

  prompts = [first_turn(proc, q, None)[0] for q in ("Hi there.", "What is a cloud?", "Name a colour.", "Hi there.")]
  engine = make_engine(model, max_len=120, prompt_bucket=8, max_kv_tokens=128, prefix_cache_tokens=16)
  try:
    sinks = [QueueEvents() for _ in prompts[:3]]
    for ids, sink in zip(prompts, sinks):  # three at once: each waits for the pages of the one before
      engine.submit(Request(np.asarray(ids, np.int32), max_tokens=NEW), sink)
    replies = [[int(t) for t in [e for e in sink if isinstance(e, Finished)][0].text.split()] for sink in sinks]
    replies.append(ask(engine, prompts[3]))
    m = engine.metrics()
  finally:
    engine.close()
  assert replies == [reference(model, ids) for ids in prompts]
  assert m["kv_page_evictions"] > 0 and m["kv_pages_cached"] == 2
  assert m["prefix_hit_tokens"] > 0  # the kept pages are a prefix's first (the template's system text)
  assert m["kv_bytes_allocated"] == 16 * 8 * engine.token_bytes  # 128 tokens: 16 pages of 8, one for padding


def test_a_long_prompt_is_prefilled_in_chunks_while_a_row_decodes(llava):
  model, proc = llava
  short, _, _ = first_turn(proc, "Hi.", None)
  story = lambda what: first_turn(proc, " ".join([f"Tell me a long story about {what}."] * 3), None)[0]  # noqa
  warm, long = story("a dog and a cat"), story("a dragon and a knight")
  assert len(long) > 6 * 16
  order, lock = [], threading.Lock()

  def sink(name, events):
    def emit(event):
      with lock:
        order.append((name, event))
      events(event)
    return emit

  engine = make_engine(model, prefill_chunk=64, decode_prefill_chunk=16)  # 64 alone, 16 beside a decoding row
  try:
    ask(engine, short, new=2), ask(engine, warm, new=2)  # compiled: what follows is not held up by compiles
    first, second = QueueEvents(), QueueEvents()
    before = engine.metrics()
    engine.submit(Request(np.asarray(short, np.int32), max_tokens=60), sink("short", first))
    while not any(name == "short" for name, _ in order):
      threading.Event().wait(0.01)
    middle = engine.metrics()  # the short prompt is in: what follows is the long one's
    engine.submit(Request(np.asarray(long, np.int32), max_tokens=NEW), sink("long", second))
    replies = [[int(t) for t in [e for e in s if isinstance(e, Finished)][0].text.split()] for s in (first, second)]
    after = engine.metrics()
  finally:
    engine.close()
  assert replies == [reference(model, short, new=60), reference(model, long)]
  chunks = after["prefill_chunks"] - before["prefill_chunks"] - 1  # the short prompt's: one (cached but its end)
  long_chunks = after["prefill_chunks"] - middle["prefill_chunks"]
  long_tokens = after["prefill_tokens"] - middle["prefill_tokens"]
  assert long_chunks >= 4 and long_tokens <= 16 * long_chunks, (long_chunks, long_tokens)  # chunks of 16, not 64
  names = [name for name, e in order if isinstance(e, Delta)]
  # One chunk per engine iteration, a decode step after each: the short row kept going while the long one came in.
  assert names[:names.index("long")].count("short") >= chunks


def test_a_sliding_window_model_matches_generate_across_turns(tmp_path):
  """Mistral v0.1's window (8 positions) on pages of 4 and chunks of 8: the mask reads positions, not slots."""
  hf_tiny.llava_model(text=hf_tiny.mistral_text_config(sliding_window=8), seed=2).save_pretrained(tmp_path)
  model = load_hf_checkpoint(str(tmp_path))
  prompt = list(np.random.default_rng(0).integers(1, 59, 29))
  engine = make_engine(model, page_size=4, prefill_chunk=8)
  try:
    reply = ask(engine, prompt)
    turn2 = prompt + reply + [5, 6, 7]
    replies = [reply, ask(engine, turn2)]
    hits = engine.metrics()["prefix_hit_tokens"]
  finally:
    engine.close()
  assert replies == [reference(model, prompt), reference(model, turn2)]
  assert hits == (len(prompt) + NEW - 1) // 4 * 4


def test_logprobs_after_a_prefix_hit_are_those_of_a_full_prefill(llava):
  """Turn 2's reply log-probabilities with turn 1's pages reused equal those of an engine that caches nothing."""
  model, proc = llava
  ids, pixels, _ = first_turn(proc, "What is in the image?", serve_tiny.image(4))

  def run(engine, prompts):
    out = []
    for prompt in prompts:
      events = QueueEvents()
      engine.submit(Request(np.asarray(prompt, np.int32), pixel_values=pixels, max_tokens=NEW, logprobs=3), events)
      out.append([e for e in events if isinstance(e, Finished)][0])
    return out, engine.metrics()

  cached = make_engine(model)
  try:
    reply = [int(t) for t in run(cached, [ids])[0][0].text.split()]
    ids2 = next_turn(proc, ids, reply, "And the colours?")
    (hit,), m_hit = run(cached, [ids2])
  finally:
    cached.close()
  fresh = make_engine(model, prefix_cache_tokens=0, image_cache=0)
  try:
    _, m_fresh = run(fresh, [ids])
    (full,), m_fresh = run(fresh, [ids2])
  finally:
    fresh.close()
  assert m_hit["prefix_hit_tokens"] > len(ids) // 2 and m_fresh["prefix_hit_tokens"] == 0
  assert m_fresh["image_cache_hits"] == 0 and m_fresh["kv_pages_cached"] == 0
  assert [e.token for e in hit.logprobs] == [e.token for e in full.logprobs]
  np.testing.assert_allclose([e.logprob for e in hit.logprobs], [e.logprob for e in full.logprobs], atol=1e-4)
  np.testing.assert_allclose([[p for _, p in e.top] for e in hit.logprobs],
                             [[p for _, p in e.top] for e in full.logprobs], atol=1e-4)


def test_precomputed_features_give_the_plain_embeddings(llava):
  model, proc = llava
  ids, pixels, _ = first_turn(proc, "What?", serve_tiny.image(1))
  ids, pixels = jnp.asarray([ids]), jnp.asarray(pixels)
  plain = model.embed(ids, pixels)
  np.testing.assert_array_equal(model.embed(ids, pixels, precomputed_features=model.image_features(pixels)), plain)
  with pytest.raises(ValueError, match="precomputed_features hold 2"):
    model.embed(ids, pixels, precomputed_features=jnp.concatenate([model.image_features(pixels)] * 2))


# -- the allocator, prefix cache and keys, alone ---------------------------------------------------------------------


def test_pages_are_counted_cached_and_evicted_least_recently_used_first():
  grown = []
  pages = PageAllocator(2, 8, cache_pages=3, grow=grown.append)
  a, b, c = pages.allocate(), pages.allocate(), pages.allocate()
  assert (a, b, c) == (1, 2, 3) and grown == [4]  # page 0 is the padding's; the pool doubled once
  for page, key in ((a, b"a"), (b, b"b"), (c, b"c")):
    assert pages.register(page, key)
  assert not pages.register(pages.allocate(), b"a")  # the same content twice: cached once
  assert grown == [4, 8]
  pages.acquire(a)  # a second row shares page a
  for page in (a, b, c):
    pages.release(page)
  assert pages.refs == {a: 1, 4: 1} and list(pages.idle) == [b, c]
  assert pages.lookup([b"b", b"x", b"c"]) == [b]  # the longest run from the first key
  pages.release(b)
  assert list(pages.idle) == [c, b]  # b used last
  pages.release(a)
  assert list(pages.idle) == [c, b, a]
  taken = [pages.allocate() for _ in range(3)]  # 5, 6, 7: free ones before any cached one goes
  assert taken == [5, 6, 7] and pages.evictions == 0
  assert pages.allocate() == c and pages.evictions == 1  # then the least recently used cached page
  assert pages.lookup([b"c"]) == [] and pages.lookup([b"b", b"a"]) == [b, a]
  with pytest.raises(RuntimeError, match="in use"):
    pages.allocate()  # every page referenced: none is ever taken from a row
  pages.release(a)
  extra = PageAllocator(2, 8, cache_pages=1)
  p, q = extra.allocate(), extra.allocate()
  extra.register(p, b"p"), extra.register(q, b"q")
  extra.release(p), extra.release(q)
  assert list(extra.idle) == [q] and extra.evictions == 1  # past the cache's bound: the older goes
  grown = []
  small = PageAllocator(2, 8, cache_pages=4, grow=grown.append)
  p = small.allocate()
  small.register(p, b"p"), small.release(p)
  assert small.allocate() == p and small.evictions == 1 and grown == []  # a cached page goes before the pool grows


def test_keys_tell_images_apart_where_the_tokens_are_the_same():
  image_token, ps = 9, 4
  ids = np.array([1, 2, 9, 9, 9, 9, 3, 9, 9, 9, 9, 5, 6, 7])
  one, two = np.zeros((2, 3, 3, 3), np.float32), np.ones((2, 3, 3, 3), np.float32)
  h0, h1 = image_hash(one[0]), image_hash(two[0])
  assert h0 != h1 and image_hash(one[0], (5, 6)) != image_hash(one[0], (6, 5))
  same = page_keys(content_ids(ids, [(image_token, [h0, h0])]), ps)
  other_second = page_keys(content_ids(ids, [(image_token, [h0, h1])]), ps)
  assert len(same) == 3
  assert same[0] == other_second[0] and same[1] != other_second[1] and same[2] != other_second[2]
  content = content_ids(ids, [(image_token, [h0, h1])])
  assert content[2:4] == [(h0, 0), (h0, 1)] and content[7] == (h1, 0) and content[0] == 1
  # Runs and images that do not pair up: every placeholder carries all the images' hash.
  merged = content_ids(ids, [(image_token, [h0])])
  assert merged[2][0] == merged[7][0] != h0 and merged[7][1] == 4


def test_the_engine_refuses_memory_settings_it_cannot_run_with(llava):
  model = llava[0]
  for kw, words in [({"page_size": 0}, "page_size"), ({"prefix_cache_tokens": -1}, "prefix_cache_tokens"),
                    ({"max_kv_tokens": 64}, "cannot hold one row"), ({"image_cache": 1.5}, "image_cache"),
                    ({"decode_prefill_chunk": 0}, "decode_prefill_chunk")]:
    with pytest.raises(ValueError, match=words):
      Engine(model, **{"max_len": 64, "prompt_bucket": 32, **kw})
