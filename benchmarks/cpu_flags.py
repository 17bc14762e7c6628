"""XLA:CPU options side by side: the mid model's matmuls (forward and backward layouts) and a small stage-2 step
under each candidate XLA_FLAGS set, with PyTorch's matmul on the same shapes.

  python benchmarks/cpu_flags.py                               # every candidate, 2 rounds
  python benchmarks/cpu_flags.py --candidates default,no-ynn --rounds 3 --no-step

XLA reads XLA_FLAGS once, when JAX starts its CPU client, so every candidate runs in a fresh subprocess with
exactly its flags (llava_jax/cpu_defaults.py is switched off there: LLAVA_JAX_CPU_FLAGS=none); PyTorch runs in a
subprocess of its own. Rounds go through every candidate in turn and the best time per cell counts, which evens
out the load from other processes on a shared machine (the load average is printed at the start and end).

Shapes are compare_torch.py's mid model (T = 1024 tokens, d = 1024, MLP 2816, 8 heads of 128, vocab 32000, CLIP
MLP 768 -> 3072 over 577 positions). `nn` is x @ W (forward), `nt` is dY @ W^T (the backward's input gradient), `tn`
is X^T @ dY (the weight gradient); `b` is batched over the 8 heads. The step is compare_torch.py's `small` model
(2 LLaMA layers, 3 CLIP layers) through `Trainer.step` at stage 2, one row of 1024 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

# name -> XLA_FLAGS. What each does, from XLA's debug_options_flags.cc: docs/PERFORMANCE.md, "XLA:CPU settings".
CANDIDATES = {
    "default": "",
    "no-ynn": "--xla_cpu_experimental_ynn_fusion_type=",  # dots back to XLA's Eigen runtime calls
    "no-ynn+onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true "
                     "--xla_cpu_experimental_onednn_fusion_type=dot",
    "no-ynn+xnn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn+eltwise": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "vec512": "--xla_cpu_prefer_vector_width=512",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "mem-sched": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "fast-runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
}

T, D, F, V, H, HD = 1024, 1024, 2816, 32000, 8, 128
# name -> (lhs shape, rhs shape, dot_general dimension numbers ((lc, rc), (lb, rb)), FLOPs)
MATMULS = {
    "qkvo nn 1024x1024x1024": ((T, D), (D, D), (((1,), (0,)), ((), ())), 2 * T * D * D),
    "mlp up nn 1024x1024x2816": ((T, D), (D, F), (((1,), (0,)), ((), ())), 2 * T * D * F),
    "mlp up dX nt 1024x2816x1024": ((T, F), (D, F), (((1,), (1,)), ((), ())), 2 * T * D * F),
    "mlp up dW tn 1024x1024x2816": ((T, D), (T, F), (((0,), (0,)), ((), ())), 2 * T * D * F),
    "mlp down nn 1024x2816x1024": ((T, F), (F, D), (((1,), (0,)), ((), ())), 2 * T * D * F),
    "lm_head nn 1024x1024x32000": ((T, D), (D, V), (((1,), (0,)), ((), ())), 2 * T * D * V),
    "lm_head dW tn 1024x1024x32000": ((T, D), (T, V), (((0,), (0,)), ((), ())), 2 * T * D * V),
    "attn QK^T b nt 8x1024x128x1024": ((H, T, HD), (H, T, HD), (((2,), (2,)), ((0,), (0,))), 2 * H * T * T * HD),
    "attn dV b tn 8x1024x1024x128": ((H, T, T), (H, T, HD), (((1,), (1,)), ((0,), (0,))), 2 * H * T * T * HD),
    "clip mlp nn 577x768x3072": ((577, 768), (768, 3072), (((1,), (0,)), ((), ())), 2 * 577 * 768 * 3072),
}
BF16 = ("mlp up nn 1024x1024x2816", "mlp up dW tn 1024x1024x2816")  # bf16 in, fp32 accumulation and out


def _inputs(name, dtype):
  lhs, rhs, dims, _ = MATMULS[name]
  rng = np.random.default_rng(0)
  return rng.standard_normal(lhs).astype(dtype), rng.standard_normal(rhs).astype(dtype), dims


def _best(fn, n):
  fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def child_jax(n: int, step: bool) -> dict:
  import jax
  import jax.numpy as jnp
  out = {}
  for dtype_name, names in (("fp32", tuple(MATMULS)), ("bf16", BF16)):
    for name in names:
      a, b, dims = _inputs(name, np.float32)
      dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
      a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
      fn = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32))
      out[f"{name} {dtype_name}"] = _best(lambda: fn(a, b).block_until_ready(), n)
  if step:
    from profile_step import build, timed_steps
    trainer, state, batch = build("small", "stage2", 1024)
    state, _, loss = timed_steps(trainer, state, batch, 1)
    state, times, _ = timed_steps(trainer, state, batch, n)
    out["stage-2 step (small model)"] = min(times)
    out["loss"] = loss
    out["compile s"] = trainer.compile_seconds
  return out


def child_torch(n: int, threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  out = {}
  for dtype_name, names in (("fp32", tuple(MATMULS)), ("bf16", BF16)):
    for name in names:
      a, b, ((lc, rc), (lb, _)) = _inputs(name, np.float32)
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      if dtype_name == "bf16":
        ta, tb = ta.bfloat16(), tb.bfloat16()
      # the same contraction as a view: transpose the operands so the contracted dims meet
      ta = ta.transpose(-1, -2) if lc[0] == ta.dim() - 2 else ta
      tb = tb.transpose(-1, -2) if rc[0] == tb.dim() - 1 else tb
      out[f"{name} {dtype_name}"] = _best(lambda ta=ta, tb=tb: torch.matmul(ta, tb), n)
  return out


def run_child(candidate: str, n: int, step: bool, threads: int) -> dict:
  env = dict(os.environ, LLAVA_JAX_CPU_FLAGS="none", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = CANDIDATES.get(candidate, "")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", candidate, "--n", str(n), "--threads", str(threads)]
  if not step:
    cmd.append("--no-step")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names: " +
                      ", ".join(CANDIDATES))
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--n", type=int, default=4, help="timed calls per cell per round (best counts)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  parser.add_argument("--no-step", dest="step", action="store_false")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    if args.child == "torch":
      result = child_torch(args.n, args.threads)
    else:
      from compare_torch import apply_malloc
      apply_malloc("keep")
      result = child_jax(args.n, args.step)
    print(json.dumps(result))
    return

  names = [c for c in args.candidates.split(",") if c]
  unknown = [c for c in names if c not in CANDIDATES]
  if unknown:
    raise SystemExit(f"--candidates: unknown {unknown}; known: {list(CANDIDATES)}")
  import jax
  import torch
  print(f"jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds, best of {args.n} per round; load average {os.getloadavg()[0]:.2f}", flush=True)
  best: dict = {c: {} for c in names + ["torch"]}
  for r in range(args.rounds):
    for c in names + ["torch"]:
      t0 = time.perf_counter()
      res = run_child(c, args.n, args.step, args.threads)
      print(f"  round {r + 1} {c}: {time.perf_counter() - t0:.0f} s "
            f"{res.get('error', '')}{'' if 'loss' not in res else 'loss %.5f' % res['loss']}", flush=True)
      for k, v in res.items():
        if k in ("loss", "compile s", "error"):
          best[c][k] = v
        else:
          best[c][k] = min(v, best[c].get(k, float("inf")))
  print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
  cols = names + ["torch"]
  print("| GFLOP/s | " + " | ".join(cols) + " |")
  print("|---|" + "---|" * len(cols))
  for dtype_name, mm in (("fp32", tuple(MATMULS)), ("bf16", BF16)):
    for name in mm:
      key = f"{name} {dtype_name}"
      flops = MATMULS[name][3]
      cells = [f"{flops / best[c][key] / 1e9:.0f}" if key in best[c] else "-" for c in cols]
      print(f"| {key} | " + " | ".join(cells) + " |")
  if args.step:
    key = "stage-2 step (small model)"
    print(f"| {key}, s | " + " | ".join(f"{best[c][key]:.3f}" if key in best[c] else "-" for c in cols) + " |")
    print("| first loss | " + " | ".join(f"{best[c]['loss']:.5f}" if "loss" in best[c] else "-" for c in cols)
          + " |")
    print("| compile, s | " + " | ".join(f"{best[c]['compile s']:.1f}" if "compile s" in best[c] else "-"
                                        for c in cols) + " |")
  print("\nflags: " + "; ".join(f"{c}: {CANDIDATES[c] or '(none)'}" for c in names))


if __name__ == "__main__":
  main()
