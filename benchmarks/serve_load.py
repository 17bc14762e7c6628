"""Serving II load test of `llava-jax serve`, side by side with transformers, in one run (issue 28):

1. Multi-turn chat: time to first token (first streamed content chunk) of turns 1, 2 and 3 of conversations
   about one image (turn n+1 resends the history: the image, the replies, a new question), with the engine's
   prefill / prefix-hit / image-cache counters per turn. Target: turn 2 <= 0.25x turn 1.
2. Tokens/s at 1, 8 and 32 concurrent streaming clients, and transformers' batched `generate` (greedy, left
   padding, min_new_tokens = max_new_tokens, batch = the client count) on the same requests (image + question,
   `ignore_eos`, so both sides produce the same token count). Target: ahead of transformers at 32.
3. Decoding rows' inter-token gaps (between streamed content chunks) while a ~3,000-token prompt is admitted: 8
   clients decode long replies, then one long prompt arrives; gaps p50 (all), and p99 / max of the gaps that
   overlap the admission window (from its submission to its first token). Target: p99 <= 2x p50.
4. KV memory with 32 rows of mixed prompt lengths (60-1,500 tokens), read from GET /metrics once every row has
   streamed a token: "kv_bytes_in_use" against the bytes of the rows' tokens (computed here: layers x 2 x
   kv_heads x head_dim x dtype bytes per token; "kv_token_bytes" if the engine reports it). Target: <= 1.25x.
   The static-cache engine holds max_batch x max_len slots whatever is in use, shown as a computed column.

The model: a random LlavaForConditionalGeneration saved and converted (`llava-jax convert`), so both sides hold
the same weights: LLaMA 4 layers x 256 wide (8 heads of 32, 4 KV heads, MLP 688, 4,096 positions) and CLIP
224 px / 14 px patches (256 image tokens, 2 layers x 128), the synthetic SentencePiece tokenizer. Big enough that
a step's matmuls outweigh the Python per step and a 3,000-token prefill takes seconds on 2 CPU cores (so a
stalled decode shows), small enough for the whole run to take minutes there. The server runs as a subprocess
(`python -m llava_jax.cli serve`, so its engine does not share the GIL with the 32 client threads); metrics
the engine lacks print "n/a". Every part first sends warm-up requests of the same shapes but other content
(compiles; no prefix or image cache hit on the measured ones). `--size mid` takes LLaVA-1.5's proportions instead
(CLIP ViT-B at 336 px, 576 image tokens; LLaMA 8 x 1024), for the multi-turn part, where on the load model a
turn's fixed costs (HTTP, rendering, preprocessing) outweigh the prefill that prefix reuse saves.

  python benchmarks/serve_load.py                  # the full run (~6 min on 2 cores at load average 11)
  python benchmarks/serve_load.py --quick          # every part, smaller (~2 min there)
  python benchmarks/serve_load.py --size mid --parts turns   # turn 2 against turn 1 at LLaVA-1.5's proportions
  python benchmarks/serve_load.py --serve-arg=--prefill-chunk=128 --serve-arg=--page-size=16   # engine flags
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

# The load test's model, and one with LLaVA-1.5's proportions (CLIP at 336 px: 576 image tokens through a 12-layer
# ViT-B; a 1024-wide, 8-layer LLaMA, compare_torch.py's "mid"), where the tower and the prefill, not the request's
# fixed costs, make turn 1's time, as they do for the published models.
SIZES = {
    "load": dict(text=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=4096),
                 vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             image_size=224, patch_size=14)),
    "mid": dict(text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=4096),
                vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=336, patch_size=14)),
}
PARTS = ("turns", "levels", "long", "kv")
WORDS = ("the a cat dog red blue house tree river light small large old new quick slow green bright dark cold warm "
         "stone water field road city window door table chair book paper music garden morning evening story king "
         "queen ship sea mountain cloud rain snow fire bird fish horse apple bread milk coffee friend teacher "
         "school market bridge tower forest island").split()
QUESTIONS = ["What is in the image?", "Describe the picture in detail.", "What colours do you see?",
             "Is there anything unusual here?", "What is in the background of this photo?", "Name the main object.",
             "Where might this picture have been taken?", "Tell me a short story about this image."]
FOLLOW_UPS = ["Can you say more about that?", "And what would you change in it?"]
MAX_REPLY = 1024  # serve --max-tokens
KV_LENGTHS = (56, 248, 760, 1496)  # rendered prompt tokens, each 8 short of a 32-token bucket
QUICK_KV_LENGTHS = (56, 120, 248, 504)


def build(root: str, text: dict, vision: dict):
  """The random transformers model (for its side) and its converted checkpoint (for the server)."""
  import torch
  import transformers

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  import hf_tiny  # tests/hf_tiny.py: random transformers LLaVA models

  from llava_jax.cli import main as cli
  from llava_jax.data.synthetic import build_tokenizer
  from llava_jax.decoding import byte_token_ids

  hf_dir = os.path.join(root, "hf")
  build_tokenizer(hf_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)  # + "<image>", as llava-hf adds it
  tokenizer.add_tokens([transformers.AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
  tokenizer.save_pretrained(hf_dir)
  vocab = len(tokenizer)
  hf = hf_tiny.llava_model(vision=hf_tiny.vision_config(**vision), text=hf_tiny.text_config(vocab_size=vocab, **text))
  hf.config.image_token_id = hf.config.image_token_index = vocab - 1
  # Zero output rows for SentencePiece's byte-fallback and the special tokens: their logit is then 0, below the
  # largest of ~340 random logits, so greedy replies are whole pieces that stream one per step (a random model
  # otherwise emits runs of byte tokens, which streaming rightly holds back until they form a character).
  with torch.no_grad():
    silent = sorted(byte_token_ids(tokenizer)) + tokenizer.all_special_ids + [vocab - 1]
    hf.get_output_embeddings().weight[silent] = 0
  hf.save_pretrained(hf_dir)
  size = vision["image_size"]
  with open(os.path.join(hf_dir, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
               "crop_size": {"height": size, "width": size}, "do_resize": True, "do_center_crop": True,
               "resample": 3}, f)
  assert cli(["convert", "--hf", hf_dir, "--out", os.path.join(root, "ckpt"), "--quiet"]) == 0
  return hf.eval(), os.path.join(root, "ckpt")


def start_server(ckpt: str, args, env: dict, log_path: str):
  """`llava-jax serve` in a subprocess; returns (process, url) once /health answers."""
  import httpx

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  command = [sys.executable, "-m", "llava_jax.cli", "serve", "--ckpt", ckpt, "--port", str(port), "--max-batch",
             str(args.max_batch), "--max-len", str(args.max_len), "--max-tokens", str(MAX_REPLY), "--max-queue",
             "512",
             "--model-name", "bench", *args.serve_arg]
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
  url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
  while time.time() < deadline and server.poll() is None:
    try:
      if httpx.get(url + "/health", trust_env=False, timeout=5).status_code == 200:
        return server, url
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  server.kill()
  with open(log_path) as f:
    raise RuntimeError(f"the server did not start ({' '.join(command)}):\n{f.read()[-3000:]}")


def image(seed: int):
  from PIL import Image

  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (180, 240, 3), np.uint8))


def data_uri(im) -> str:
  buffer = io.BytesIO()
  im.save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, im=None) -> dict:
  if im is None:
    return {"role": "user", "content": text}
  return {"role": "user", "content": [{"type": "text", "text": text},
                                      {"type": "image_url", "image_url": {"url": data_uri(im)}}]}


def body(messages: list, max_tokens: int) -> dict:
  return {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}}


def in_threads(url: str, payloads: list, outs: list, stop: threading.Event | None = None) -> list:
  """Starts one thread per payload streaming into its `outs` dict; a failure is kept in out["error"] (and the
  out marked done, so nobody waits for it) and raised by `join`."""
  def run(payload, out):
    try:
      stream(client(), url, payload, out, stop)
    except Exception as e:  # pylint: disable=broad-except
      out.update(error=e, done=True)

  threads = [threading.Thread(target=run, args=(p, o), daemon=True) for p, o in zip(payloads, outs)]
  for t in threads:
    t.start()
  return threads


def join(threads: list, outs: list):
  for t in threads:
    t.join()
  for o in outs:
    if "error" in o:
      raise RuntimeError(f"a streamed request failed: {o['error']}")


def stream(http, url: str, payload: dict, out: dict | None = None, stop: threading.Event | None = None) -> dict:
  """One streamed completion: out["times"] (arrival of each content chunk, perf_counter), "text", "ttft",
  "tokens" (usage); `stop` set: leave early (the server frees the row)."""
  out = {} if out is None else out
  out.update(start=time.perf_counter(), times=[], text="", tokens=0, done=False)
  with http.stream("POST", url + "/v1/chat/completions", json=payload) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:500]!r}")
    for line in r.iter_lines():
      if stop is not None and stop.is_set():
        break
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[len("data: "):])
      if chunk.get("usage"):
        out["tokens"], out["prompt_tokens"] = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
      elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        out["times"].append(time.perf_counter())
        out["text"] += chunk["choices"][0]["delta"]["content"]
  out["end"], out["done"] = time.perf_counter(), True
  out["ttft"] = (out["times"][0] if out["times"] else out["end"]) - out["start"]
  return out


def client():
  import httpx

  return httpx.Client(trust_env=False, timeout=900)


def metrics(url: str) -> dict:
  import httpx

  return httpx.get(url + "/metrics", trust_env=False, timeout=60).json()


def prompt_text(proc, target: int, seed: int) -> str:
  """Random words whose rendered prompt is at most `target` tokens, as close as a word allows (a binary search on
  the word count); every seed gives other words, so prompts share no prefix beyond the template's."""
  from llava_jax.processor import PromptTooLongError

  words = np.random.default_rng(seed).choice(WORDS, size=target)

  def length(n):
    try:
      return proc(proc.prompt([" ".join(words[:n])]))["input_ids"].shape[1]
    except PromptTooLongError:
      return target + 1

  lo, hi = 1, target
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if length(mid) <= target else (lo, mid - 1)
  return " ".join(words[:lo])


def concurrently(url: str, payloads: list, clients: int) -> list:
  local = threading.local()

  def send(payload):
    if not hasattr(local, "http"):
      local.http = client()
    return stream(local.http, url, payload)

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    return list(pool.map(send, payloads))


def _get(m: dict, key: str):
  return m.get(key) if isinstance(m, dict) else None


def _fmt(value, spec: str = "", unit: str = "") -> str:
  return "n/a" if value is None else format(value, spec) + unit


def _diff(after: dict, before: dict, key: str):
  return None if key not in after or key not in before else after[key] - before[key]


# -- the four parts ------------------------------------------------------------------------------------------------


def multi_turn(url: str, conversations: int, max_tokens: int) -> list[dict]:
  """Median TTFT per turn over `conversations` (after one warm-up conversation), with metric deltas per turn."""
  http, per_turn = client(), [[] for _ in range(1 + len(FOLLOW_UPS))]
  for c in range(conversations + 1):
    messages = []
    for turn, question in enumerate([QUESTIONS[0], *FOLLOW_UPS]):  # only the image differs: the same buckets
      messages.append(user(question, image(500 + c) if turn == 0 else None))
      before = metrics(url)
      out = stream(http, url, body(messages, max_tokens))
      after = metrics(url)
      messages.append({"role": "assistant", "content": out["text"]})
      if c > 0:  # conversation 0 is the warm-up
        per_turn[turn].append({"ttft": out["ttft"], "prompt_tokens": out.get("prompt_tokens"),
                               **{k: _diff(after, before, k) for k in ("prefill_tokens", "prefix_hit_tokens",
                                                                        "image_cache_hits")}})
  print("multi-turn TTFT (s), per turn, per conversation:", [[round(r["ttft"], 3) for r in rows] for rows in per_turn],
        file=sys.stderr)
  return [{k: (None if any(r[k] is None for r in rows) else float(np.median([r[k] for r in rows])))
           for k in rows[0]} for rows in per_turn]


def load_levels(url: str, hf, proc, levels: list[int], requests: int, max_tokens: int) -> list[dict]:
  """Tokens/s of the server at each client count and of transformers' generate at batch = that count, on the
  same requests, measured level by level (interleaved: the machine's load hits both sides alike)."""
  import torch

  concurrently(url, [body([user(q, image(10_000 + i))], 2) for i, q in enumerate(QUESTIONS)],
               len(QUESTIONS))  # warm-up: every question's prompt length once (other images)
  pad = proc.tokenizer.pad_token_id if proc.tokenizer.pad_token_id is not None else 0

  def generate(batch_cases):
    inputs = proc([proc.prompt([q], image=True) for q, _ in batch_cases], [im for _, im in batch_cases])
    with torch.no_grad():
      out = hf.generate(input_ids=torch.as_tensor(inputs["input_ids"], dtype=torch.long),
                        attention_mask=torch.as_tensor(inputs["attention_mask"], dtype=torch.long),
                        pixel_values=torch.from_numpy(np.ascontiguousarray(inputs["pixel_values"].transpose(0, 3, 1,
                                                                                                             2))),
                        max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    return (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch_cases)

  generate([(QUESTIONS[0], image(10_000))])  # warm-up
  rows = []
  for k, clients in enumerate(levels):
    n = max(clients, requests if clients > 1 else max(requests // 4, 1))
    # Each level its own images: a server that caches prefixes or image features gets no hit from an earlier level
    level = [(QUESTIONS[i % len(QUESTIONS)], image(1_000 * (k + 1) + i)) for i in range(n)]
    start = time.perf_counter()
    results = concurrently(url, [body([user(q, im)], max_tokens) for q, im in level], clients)
    ours = sum(r["tokens"] for r in results) / (time.perf_counter() - start)
    start = time.perf_counter()
    tokens = sum(generate(level[b:b + clients]) for b in range(0, n, clients))
    theirs = tokens / (time.perf_counter() - start)
    rows.append({"clients": clients, "requests": n, "ours": ours, "theirs": theirs,
                 "ttft_p50": float(np.median([r["ttft"] for r in results])),
                 "latency_p50": float(np.median([r["end"] - r["start"] for r in results]))})
  return rows


def long_prompt(url: str, proc, decoders: int, decode_tokens: int, long_tokens: int) -> dict:
  """Gaps between the decoding rows' content chunks while a `long_tokens` prompt is admitted."""
  http = client()

  def admit_while_decoding(seed: int):
    """`decoders` rows decoding, then the long prompt: the scene, so the warm-up compiles its shapes (the step
    with the long row beside the decoding ones included)."""
    outs = [{} for _ in range(decoders)]
    payloads = [body([user(f"Tell me a long story, number {seed + i}.")], decode_tokens) for i in range(decoders)]
    threads = in_threads(url, payloads, outs)
    while not all(len(o.get("times", ())) >= 5 or o.get("done") for o in outs):
      time.sleep(0.01)
    submitted = time.perf_counter()
    long = stream(http, url, body([user(prompt_text(proc, long_tokens, seed))], 4))
    join(threads, outs)
    return outs, long, submitted

  admit_while_decoding(7_000)  # warm-up: other content, the same shapes
  outs, long, submitted = admit_while_decoding(7_100)
  admitted = long["times"][0] if long["times"] else long["end"]
  gaps, window = [], []
  for o in outs:
    times = np.asarray(o["times"])
    for begin, end in zip(times[:-1], times[1:]):
      gaps.append(end - begin)
      if end > submitted and begin < admitted:
        window.append(end - begin)
  before = [g for o in outs for b, g in zip(o["times"][:-1], np.diff(o["times"])) if b + g <= submitted]
  still = sum(o["end"] > admitted for o in outs)
  return {"rows": decoders, "long_tokens": long.get("prompt_tokens"), "long_ttft": long["ttft"],
          "p50_before": float(np.median(before)), "p50": float(np.median(gaps)),
          "p99_window": float(np.percentile(window, 99)) if window else None,
          "max_window": max(window) if window else None, "window_gaps": len(window), "still_decoding": still}


def kv_memory(url: str, proc, rows: int, max_tokens: int, bytes_per_token: int, max_batch: int, max_len: int,
              kv_lengths: tuple) -> dict:
  """The engine's KV metrics once each of `rows` mixed-length requests has streamed a token."""
  lengths = [kv_lengths[i % len(kv_lengths)] for i in range(rows)]
  concurrently(url, [body([user(prompt_text(proc, n, 8_000 + n))], 2) for n in kv_lengths], len(kv_lengths))
  texts = [prompt_text(proc, n, 9_000 + i) for i, n in enumerate(lengths)]
  prompt_tokens = [proc(proc.prompt([t]))["input_ids"].shape[1] for t in texts]
  outs, stop = [{} for _ in range(rows)], threading.Event()
  threads = in_threads(url, [body([user(t)], max_tokens) for t in texts], outs, stop)
  deadline = time.time() + 900
  while not all(o.get("times") or o.get("done") for o in outs) and time.time() < deadline:
    time.sleep(0.01)
  m = metrics(url)
  streamed = sum(len(o.get("times", ())) for o in outs)  # content chunks, about one per token so far
  finished = sum(bool(o.get("done")) for o in outs)
  stop.set()
  join(threads, outs)
  tokens = sum(prompt_tokens) + streamed
  return {"rows": rows, "lengths": kv_lengths, "active": _get(m, "active_rows"), "finished_early": finished,
          "tokens": tokens,
          "token_bytes": tokens * bytes_per_token, "static_bytes": max_batch * max_len * bytes_per_token,
          **{k: _get(m, k) for k in ("kv_token_bytes", "kv_bytes_in_use", "kv_bytes_allocated", "kv_pages_in_use")}}


# -- the run ---------------------------------------------------------------------------------------------------


def _target(ok) -> str:
  return "n/a" if ok is None else ("met" if ok else "NOT met")


def print_turns(turns):
  print("\n### Multi-turn chat: time to first token per turn (median over the conversations)\n")
  print("| turn | prompt tokens | TTFT (s) | vs turn 1 | prefill tokens | prefix hit tokens | image cache hits |")
  print("|---|---|---|---|---|---|---|")
  for i, t in enumerate(turns):
    print(f"| {i + 1} | {_fmt(t['prompt_tokens'], '.0f')} | {t['ttft']:.3f} | {t['ttft'] / turns[0]['ttft']:.2f}x | "
          f"{_fmt(t['prefill_tokens'], '.0f')} | {_fmt(t['prefix_hit_tokens'], '.0f')} | "
          f"{_fmt(t['image_cache_hits'], '.0f')} |")
  print(f"\nTarget turn 2 <= 0.25x turn 1: {_target(turns[1]['ttft'] <= 0.25 * turns[0]['ttft'])}")


def print_levels(levels):
  print("\n### Tokens/s: llava-jax serve (streaming clients) vs transformers `generate` (batch = clients)\n")
  print("| clients | requests | serve tokens/s | transformers tokens/s | serve / transformers | serve TTFT p50 (s) | "
        "serve latency p50 (s) |")
  print("|---|---|---|---|---|---|---|")
  for r in levels:
    print(f"| {r['clients']} | {r['requests']} | {r['ours']:.0f} | {r['theirs']:.0f} | {r['ours'] / r['theirs']:.2f}x"
          f" | {r['ttft_p50']:.3f} | {r['latency_p50']:.3f} |")
  top = [r for r in levels if r["clients"] == 32]
  print(f"\nTarget ahead of transformers at 32 clients: {_target(top[0]['ours'] > top[0]['theirs'] if top else None)}")


def print_long(long):
  print("\n### Decoding rows' inter-token gaps while a long prompt is admitted\n")
  print("| decoding rows | long prompt tokens | long prompt TTFT (s) | gap p50 before (s) | gap p50 (s) | "
        "gap p99 in window (s) | max gap in window (s) | p99 / p50 | gaps in window |")
  print("|---|---|---|---|---|---|---|---|---|")
  ratio = None if long["p99_window"] is None else long["p99_window"] / long["p50"]
  print(f"| {long['rows']} | {_fmt(long['long_tokens'])} | {long['long_ttft']:.3f} | {long['p50_before']:.4f} | "
        f"{long['p50']:.4f} | {_fmt(long['p99_window'], '.4f')} | {_fmt(long['max_window'], '.4f')} | "
        f"{_fmt(ratio, '.1f', 'x')} | {long['window_gaps']} |")
  note = "" if long["still_decoding"] == long["rows"] else (
      f" ({long['rows'] - long['still_decoding']} rows finished before the long prompt's first token: raise "
      "--decode-tokens)")
  print(f"\nTarget p99 in window <= 2x p50: {_target(None if ratio is None else ratio <= 2)}{note}")


def print_kv(kv):
  print(f"\n### KV memory: {kv['rows']} rows of mixed prompt lengths ({', '.join(map(str, kv['lengths']))} tokens), "
        "all active\n")
  mib = lambda b: None if b is None else b / 2**20  # noqa: E731
  print("| rows (active) | tokens | token bytes (MiB, computed) | kv_token_bytes (MiB) | kv_bytes_in_use (MiB) | "
        "kv_bytes_allocated (MiB) | kv_pages_in_use | in use / token bytes | static cache (MiB, computed) | "
        "static / token bytes |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  tokens_bytes = kv["kv_token_bytes"] or kv["token_bytes"]
  used = None if kv["kv_bytes_in_use"] is None else kv["kv_bytes_in_use"] / tokens_bytes
  print(f"| {kv['rows']} ({_fmt(kv['active'])}) | {kv['tokens']} | {mib(kv['token_bytes']):.1f} | "
        f"{_fmt(mib(kv['kv_token_bytes']), '.1f')} | {_fmt(mib(kv['kv_bytes_in_use']), '.1f')} | "
        f"{_fmt(mib(kv['kv_bytes_allocated']), '.1f')} | {_fmt(kv['kv_pages_in_use'])} | {_fmt(used, '.2f', 'x')} | "
        f"{mib(kv['static_bytes']):.1f} | {kv['static_bytes'] / kv['token_bytes']:.2f}x |")
  early = f" ({kv['finished_early']} rows finished before all were active)" if kv["finished_early"] else ""
  print(f"\nTarget in use <= 1.25x token bytes: {_target(None if used is None else used <= 1.25)}{early}")


def part(name: str, show, fn, *args):
  """Runs one part and prints its table at once (a later part's failure keeps the earlier tables)."""
  start = time.perf_counter()
  out = fn(*args)
  show(out)
  print(f"\n({name}: {time.perf_counter() - start:.0f} s)", flush=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="every part with fewer requests and tokens (~2 min)")
  parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
  parser.add_argument("--requests", type=int, default=64, help="requests per load level (1 client: a quarter)")
  parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply in the load levels and turns")
  parser.add_argument("--conversations", type=int, default=3, help="measured multi-turn conversations")
  parser.add_argument("--long-tokens", type=int, default=3000, help="the long prompt's rendered tokens")
  parser.add_argument("--decode-tokens", type=int, default=160, help="reply tokens of the 8 decoding rows")
  parser.add_argument("--max-batch", type=int, default=32, help="the engine's rows (serve --max-batch)")
  parser.add_argument("--max-len", type=int, default=3136, help="serve --max-len: room for the long prompt")
  parser.add_argument("--serve-arg", action="append", default=[], help="an extra `llava-jax serve` flag, passed "
                      "verbatim (repeat it), e.g. --serve-arg=--prefill-chunk=128; a later flag overrides these")
  parser.add_argument("--size", default="load", choices=sorted(SIZES), help="the model: `load` (the default, "
                      "for every part) or `mid` (LLaVA-1.5's proportions; for the multi-turn part: --parts turns)")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
  parser.add_argument("--threads", type=int, default=1, help="CPU threads for each side: torch.set_num_threads and "
                      "the server's XLA intra-op pool (0: the libraries' defaults)")
  args = parser.parse_args(argv)
  parts = set(args.parts.split(","))
  if not parts <= set(PARTS):
    parser.error(f"--parts: {', '.join(sorted(parts - set(PARTS)))} is not one of {', '.join(PARTS)}")
  text, vision = SIZES[args.size]["text"], SIZES[args.size]["vision"]
  if args.quick:
    args.requests, args.max_tokens, args.conversations, args.decode_tokens = 16, 8, 2, 48

  env = dict(os.environ)
  if args.threads == 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
  import torch

  from llava_jax import load_checkpoint
  from llava_jax.processor import Processor

  if args.threads:
    torch.set_num_threads(args.threads)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
  started = time.time()
  with tempfile.TemporaryDirectory() as root:
    hf, ckpt = build(root, text, vision)
    model = load_checkpoint(ckpt)
    proc = Processor.from_model(model)
    t = model.config.text
    bytes_per_token = (t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim
                       * np.dtype(model.config.dtype).itemsize)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    print(f"## serve_load: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {args.threads or 'default'} thread(s) each side; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n\nmodel: LLaMA {text['num_hidden_layers']} x "
          f"{text['hidden_size']} ({text['num_key_value_heads']} KV heads, {bytes_per_token} KV bytes per token), "
          f"CLIP {vision['num_hidden_layers']} x {vision['hidden_size']}, {vision['image_size']} px / {vision['patch_size']} ({image_tokens} image tokens); serve --max-batch "
          f"{args.max_batch} --max-len {args.max_len} "
          f"{' '.join(args.serve_arg)}; {args.max_tokens} tokens per reply{' (--quick)' if args.quick else ''}",
          flush=True)
    server, url = start_server(ckpt, args, env, os.path.join(root, "server.log"))
    try:
      # The engine's first prefill compiles against its fresh cache and again once the cache is a step's output:
      # one request first, so that no measured request pays for that.
      stream(client(), url, body([user("Hello there.")], 2))
      if "turns" in parts:
        part("multi-turn", print_turns, multi_turn, url, args.conversations, args.max_tokens)
      if "levels" in parts:
        part("load levels", print_levels, load_levels, url, hf, proc, [int(c) for c in args.clients.split(",")],
             args.requests, args.max_tokens)
      if "long" in parts:
        part("long prompt", print_long, long_prompt, url, proc, 8, args.decode_tokens, args.long_tokens)
      if "kv" in parts:
        part("KV memory", print_kv, kv_memory, url, proc, 32, min(4 * args.decode_tokens, MAX_REPLY),
             bytes_per_token, args.max_batch, args.max_len, QUICK_KV_LENGTHS if args.quick else KV_LENGTHS)
      final = metrics(url)
    finally:
      server.terminate()
      server.wait(timeout=30)
  print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {time.time() - started:.0f} s in "
        f"all; engine metrics at the end: { {k: v for k, v in final.items() if k != 'rows_per_step'} }")
  return 0


if __name__ == "__main__":
  sys.exit(main())
