"""Load test of `llava-jax serve` on the tiny model: tokens/s and latency percentiles at 1, 8 and 32 concurrent
clients, against the same requests sent one by one (1 client).

Builds the demo's tiny random checkpoint (no downloads), serves it in-process on a free 127.0.0.1 port and
streams chat completions over HTTP (`ignore_eos`, so every reply has exactly --max-tokens tokens); half of the
requests carry an image. Prints a markdown table (docs/PERFORMANCE.md has one).

  python benchmarks/serve_load.py [--requests 64] [--clients 1,8,32] [--max-batch 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np


def build_checkpoint(root: str) -> str:
  from llava_jax.convert import convert_checkpoint
  from llava_jax.data.synthetic import build_tokenizer, tokenizer_training_text
  from llava_jax.demo import write_tiny_hf_parts

  tokenizer = build_tokenizer(os.path.join(root, "tokenizer"), tokenizer_training_text(0))
  clip_dir, llm_dir = write_tiny_hf_parts(os.path.join(root, "hf"), tokenizer)
  ckpt = os.path.join(root, "tiny")
  convert_checkpoint(ckpt, clip=clip_dir, llm=llm_dir, progress=False)
  return ckpt


def image_uri(seed: int) -> str:
  from PIL import Image

  pixels = np.random.default_rng(seed).integers(0, 255, (64, 56, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(i: int, max_tokens: int) -> dict:
  question = ["What is in the image?", "What colour is the shape?", "Describe the picture.",
              "What is the background?"][i % 4]
  content = question if i % 2 else [{"type": "text", "text": question},
                                    {"type": "image_url", "image_url": {"url": image_uri(i)}}]
  return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
          "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


def one_request(http, url: str, payload: dict) -> tuple[float, float, int]:
  """(latency s, time to first token s, completion tokens) of one streamed completion."""
  start = time.perf_counter()
  first, tokens = None, 0
  with http.stream("POST", url + "/v1/chat/completions", json=payload) as r:
    r.raise_for_status()
    for line in r.iter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[len("data: "):])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        first = time.perf_counter() - start
  latency = time.perf_counter() - start
  return latency, latency if first is None else first, tokens


def run_load(url: str, payloads: list[dict], clients: int, engine) -> dict:
  import httpx

  before = engine.metrics()
  local = threading.local()

  def send(payload):
    if not hasattr(local, "http"):
      local.http = httpx.Client(trust_env=False, timeout=600)
    return one_request(local.http, url, payload)

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(send, payloads))
  wall = time.perf_counter() - start
  after = engine.metrics()
  latency = np.array([r[0] for r in results])
  ttft = np.array([r[1] for r in results])
  tokens = sum(r[2] for r in results)
  steps = after["steps"] - before["steps"]
  rows = sum(int(k) * (v - before["rows_per_step"].get(k, 0)) for k, v in after["rows_per_step"].items())
  return {"clients": clients, "requests": len(payloads), "wall": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
          "p50": np.percentile(latency, 50), "p90": np.percentile(latency, 90), "p99": np.percentile(latency, 99),
          "ttft_p50": np.percentile(ttft, 50), "rows_per_step": rows / steps if steps else 0.0}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--requests", type=int, default=64, help="requests per load level")
  parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
  parser.add_argument("--max-batch", type=int, default=8, help="the engine's rows")
  parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
  parser.add_argument("--max-queue", type=int, default=256)
  args = parser.parse_args(argv)

  import uvicorn

  from llava_jax import load_checkpoint
  from llava_jax.processor import Processor
  from llava_jax.serve import serve_model
  from llava_jax.serve.api import create_app

  import jax

  with tempfile.TemporaryDirectory() as root:
    model = load_checkpoint(build_checkpoint(root))
    proc = Processor.from_model(model)
    served = serve_model(model, proc, max_batch=args.max_batch, max_len=256, max_tokens=args.max_tokens,
                         max_queue=args.max_queue, model_name="tiny")
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
      time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    payloads = [body(i, args.max_tokens) for i in range(args.requests)]
    run_load(url, payloads[:4], 4, served.engine)  # compile every prefill bucket and the step first
    rows = [run_load(url, payloads, int(c), served.engine) for c in args.clients.split(",")]
    server.should_exit = True
    thread.join(timeout=10)
    served.engine.close()

  print(f"tiny model ({jax.devices()[0].platform}, {jax.device_count()} device(s)), engine max_batch "
        f"{args.max_batch}, {args.max_tokens} tokens per reply, {args.requests} requests per level (half with an "
        f"image); latency = whole streamed reply\n")
  print("| clients | tokens/s | speed-up vs one by one | latency p50 / p90 / p99 (s) | first token p50 (s) | "
        "rows per decode step |")
  print("|---|---|---|---|---|---|")
  base = rows[0]["tokens_per_s"]
  for r in rows:
    label = f"{r['clients']}" + (" (one by one)" if r["clients"] == 1 else "")
    print(f"| {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.1f}x | {r['p50']:.3f} / "
          f"{r['p90']:.3f} / {r['p99']:.3f} | {r['ttft_p50']:.3f} | {r['rows_per_step']:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
