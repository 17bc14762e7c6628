"""One causal self-attention call, forward + backward, on this CPU: each implementation of
`llava_jax/models/attention.py` beside PyTorch's `scaled_dot_product_attention` (what transformers' LLaMA runs).

  python benchmarks/attention_speed.py                        # T = 512, 1024, 2048; 16 heads of 64, batch 1
  python benchmarks/attention_speed.py --lengths 1024 --heads 8 --head-dim 128 --repeats 5

Columns: `xla full` is every [T, T] score at once (what `xla` does under a dense mask); `xla` is what the model runs
under a causal `SelfAttentionMask` (queries in pieces of XLA_QUERY_BLOCK against the keys they can see);
`blockwise` the online-softmax kernel. Each is jitted, fp32, timed best of `--repeats` after a warm-up, the sides
alternating; max |difference| of the output and dQ/dK/dV against `xla full` is printed beside the times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # llava_jax from the checkout


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch

  from llava_jax.models import attention
  from llava_jax.models.attention import SelfAttentionMask

  scale = args.head_dim ** -0.5
  print(f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
        f"{args.heads} heads of {args.head_dim}, fp32, causal; xla pieces of {attention.XLA_QUERY_BLOCK} queries, "
        f"blockwise blocks of {attention.BLOCKWISE_KEY_BLOCK} keys; best of {args.repeats}; load average "
        f"{os.getloadavg()[0]:.1f}\n")
  print("| T | xla full | xla (causal pieces) | blockwise | torch SDPA | xla / xla full | max diff vs xla full |")
  print("|---|---|---|---|---|---|---|")
  for t in args.lengths:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((args.batch, t, args.heads, args.head_dim)).astype(np.float32) for _ in "qkv")
    weight = rng.standard_normal((args.batch, t, args.heads, args.head_dim)).astype(np.float32)
    mask = SelfAttentionMask(jnp.ones((args.batch, t), bool))
    dense = mask.dense()
    impls = {"xla full": lambda q, k, v: attention.xla_attention(q, k, v, dense, scale=scale),
             "xla": lambda q, k, v: attention.dot_product_attention(q, k, v, attention.prepare_mask(mask, "xla"),
                                                                    scale=scale, impl="xla"),
             "blockwise": lambda q, k, v: attention.dot_product_attention(q, k, v, mask, scale=scale,
                                                                          impl="blockwise")}

    def jitted(fn):
      loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weight)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    fns = {name: jitted(fn) for name, fn in impls.items()}
    results = {name: jax.block_until_ready(fn(q, k, v)) for name, fn in fns.items()}
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for name in ("xla", "blockwise")
               for a, b in zip(jax.tree.leaves(results[name]), jax.tree.leaves(results["xla full"])))

    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
    tw = torch.from_numpy(weight).transpose(1, 2)

    def torch_run():
      out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale)
      (out * tw).sum().backward()
      tq.grad = tk.grad = tv.grad = None

    runs = {name: (lambda fn=fn: jax.block_until_ready(fn(q, k, v))) for name, fn in fns.items()}
    runs["torch SDPA"] = torch_run
    runs["torch SDPA"]()
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
      for name, run in runs.items():
        t0 = time.perf_counter()
        run()
        best[name] = min(best[name], time.perf_counter() - t0)
    ms = lambda name: f"{1e3 * best[name]:.1f} ms"
    print(f"| {t} | {ms('xla full')} | {ms('xla')} | {ms('blockwise')} | {ms('torch SDPA')} | "
          f"{best['xla'] / best['xla full']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
