"""Where the CPU train step's time goes: a jax.profiler trace of `Trainer.step`, its XLA ops summed by kind.

  python benchmarks/profile_step.py                    # mid model of compare_torch.py, stage 2
  python benchmarks/profile_step.py --size small --stage stage1 --steps 2

The model has compare_torch.py's shapes and random weights (timing does not depend on their values). The step is
compiled and warmed up, then `--steps` steps run under `jax.profiler.trace`; every XLA:CPU op event (one per
thunk, on whichever pool thread ran it) is grouped by the HLO op's name, and each group's wall time is divided by
the step's wall time. Events on different threads overlap, so shares can sum past 100%; "busy" is the summed op
time per step over the step time (2.0 = both cores busy throughout on this 2-core machine).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
# pylint: disable-next=wrong-import-position
from compare_torch import SIZES, add_malloc_flag, apply_malloc, make_rows  # noqa: E402


def build(size: str, stage: str, seq: int, rows: int = 1):
  from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
  from llava_jax.sharding import make_mesh
  from llava_jax.train.optim import OptimConfig
  from llava_jax.train.step import Trainer

  s = SIZES[size]
  text = dict(s["text"])
  cfg = LlavaConfig(vision=VisionConfig(**s["vision"]), text=TextConfig(**text),
                    image_token_index=text["vocab_size"] - 1)
  trainer = Trainer(cfg, stage, OptimConfig(lr=2e-5, warmup_ratio=0.0), 1000, make_mesh((1, 1, 1)))
  ids, mask, labels, px = make_rows(cfg, rows, seq, np.random.default_rng(3))
  batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px,
           "image_mask": np.ones(rows, bool)}
  return trainer, trainer.init_state(), batch


def timed_steps(trainer, state, batch, n: int):
  import jax
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return state, times, float(metrics["loss"])


def op_events(trace_dir: str):
  """(name, duration in seconds) of every XLA op event in the trace."""
  from jax.profiler import ProfileData
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  data = ProfileData.from_file(path)
  out = []
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        out.append((plane.name, line.name, ev.name, ev.duration_ns * 1e-9))
  return out


def hlo_sources(hlo: str, depth: int = 3) -> dict:
  """{instruction name: "fwd|bwd  file:function:line < caller..."} from the compiled HLO text's metadata: the
  innermost `depth` frames in llava_jax or optax of each instruction's stack, and whether it sits under jax's transpose
  (the backward pass)."""
  def table(title):
    m = re.search(rf"^{title}\n(.*?)(?:\n\n|\n(?=[A-Z]))", hlo, re.S | re.M)
    return dict(re.match(r"(\d+) (.*)", l).groups() for l in m.group(1).splitlines()) if m else {}
  files, funcs, locs, frames = (table(t) for t in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"))
  def frame_chain(fid):
    out, seen = [], set()
    while fid and fid not in seen and fid in frames:
      seen.add(fid)
      f = dict(kv.split("=") for kv in frames[fid].strip("{}").split())
      loc = dict(kv.split("=") for kv in locs[f["file_location_id"]].strip("{}").split())
      file = files[loc["file_name_id"]].strip('"')
      if "/llava_jax/" in file or "/optax/" in file:
        out.append(f"{os.path.basename(file)}:{funcs[loc['function_name_id']].strip(chr(34))}:{loc['line']}")
      fid = str(int(f.get("parent_frame_id", "0")) - 1)  # the printed table's parents are off by one
    return out
  meta_re = r"metadata=\{op_name=\"([^\"]*)\"(?: stack_frame_id=(\d+))?"
  # A fusion XLA made without metadata takes that of the first instruction inside it that has some.
  inner, blocks = {}, {}
  for m in re.finditer(r"^%(\S+) \(.*?\n\}", hlo, re.M | re.S):
    blocks[m.group(1)] = m.group(0)
    found = re.search(meta_re, m.group(0))
    if found:
      inner[m.group(1)] = found.groups()
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = [^\n]*", hlo, re.M):
    name, line = m.group(1), m.group(0)
    found = re.search(meta_re, line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    if found:
      op_name, fid = found.groups()
    elif calls and calls.group(1) in inner:
      op_name, fid = inner[calls.group(1)]
    elif calls and "lhs_batch_dims={0}" in blocks.get(calls.group(1), ""):
      out[name] = "bwd? batched dot without metadata (attention core)"
      continue
    else:
      continue
    chain = frame_chain(fid)[:depth] if fid else []
    kind = "bwd" if "transpose(" in op_name else "fwd"
    out[name] = f"{kind} {op_name.rsplit('/', 1)[-1]} @ " + (" < ".join(chain) or "?")
  return out


# A Dense product, its custom VJP's forward frame (layers.dense_dot) between the op and Dense.__call__ or not.
DENSE = r"dot_general @ (layers.py:_?dense_dot\w*:\d+ < )?layers.py:Dense.__call__:\d+ < "
BUCKETS = (  # (bucket, regex on the source string); the first match wins
    ("lm_head matmuls", r"logits_from_hidden"),
    ("loss over the vocabulary (log-softmax, pick, shift)", r"cross_entropy"),
    ("decoder MLP matmuls", DENSE + r"llama.py:LlamaMLP"),
    ("decoder MLP elementwise (SiLU * up)", r"LlamaMLP"),
    ("decoder q/k/v/o projections", DENSE + r"llama.py:LlamaAttention"),
    ("decoder attention core (scores, softmax, PV)", r"attention.py:.*< llama.py|attention core"),
    ("decoder rope", r"apply_rope|rope_cos_sin"),
    ("decoder RMSNorm + residual + other", r"llama.py|RMSNorm"),
    ("vision tower (frozen: forward only)", r"clip.py|LayerNorm|attention.py"),
    ("projector", r"MultiModalProjector"),
    ("embedding lookup / gradient", r"Embed.__call__"),
    ("image splice (Llava.embed)", r"Llava\._?embed|image_features"),
    ("optimizer: clip + AdamW + finite checks", r"optax|_clipping|_tree_math|transform.py|_combining|_masking|update|all_finite|_train_step|partition|combine"),
)


def bucket_of(source: str) -> str:
  for name, pattern in BUCKETS:
    if re.search(pattern, source):
      return name
  return "other"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="mid", choices=sorted(SIZES))
  parser.add_argument("--stage", default="stage2")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=3, help="profiled steps")
  parser.add_argument("--repeats", type=int, default=3, help="timed steps before the trace (best counts)")
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--trace-dir", default="")
  parser.add_argument("--dump-lines", action="store_true", help="print every plane/line name and event count")
  add_malloc_flag(parser)
  args = parser.parse_args(argv)
  malloc = apply_malloc(args.malloc)
  from llava_jax.cpu_defaults import apply_cpu_flags
  apply_cpu_flags(cpu_run=True)  # before JAX starts: our XLA:CPU flags, printed below

  import jax
  print(f"jax {jax.__version__}; load average {os.getloadavg()[0]:.2f}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; malloc: {malloc}", flush=True)
  trainer, state, batch = build(args.size, args.stage, args.seq)
  t0 = time.perf_counter()
  state, times, loss = timed_steps(trainer, state, batch, 1)
  print(f"compile + first step {time.perf_counter() - t0:.1f} s (compile {trainer.compile_seconds:.1f} s), "
        f"loss {loss:.5f}", flush=True)
  state, times, _ = timed_steps(trainer, state, batch, args.repeats)
  best = min(times)
  print(f"step: best {best:.3f} s of {[round(t, 3) for t in times]}; load average {os.getloadavg()[0]:.2f}; "
        f"XLA {trainer.flops_per_step / 1e9:.0f} GFLOP -> {trainer.flops_per_step / best / 1e9:.0f} GFLOP/s",
        flush=True)

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="step_trace_")
  with jax.profiler.trace(trace_dir):
    state, ptimes, _ = timed_steps(trainer, state, batch, args.steps)
  step_s = sum(ptimes) / len(ptimes)
  print(f"profiled steps {[round(t, 3) for t in ptimes]} (trace in {trace_dir})", flush=True)
  events = op_events(trace_dir)
  if args.dump_lines:
    lines = collections.Counter((p, l) for p, l, _, _ in events)
    for (p, l), n in sorted(lines.items()):
      print(f"  plane {p!r} line {l!r}: {n} events")
  ops = collections.defaultdict(float)
  for plane, line, name, dur in events:
    if plane.startswith("/host:CPU") and not line.startswith("python") and "::" not in name and \
       not name.startswith(("Thunk", "$", "PjRt", "ThunkExecutor", "XlaModule", "TfrtCpu")):
      ops[name] += dur / args.steps
  busy = sum(ops.values())
  compiled = next(iter(trainer._compiled.values()))  # pylint: disable=protected-access
  hlo = compiled.as_text()
  with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
    f.write(hlo)
  sources = hlo_sources(hlo)
  by_source = collections.defaultdict(float)
  for name, sec in ops.items():
    by_source[sources.get(name, "? " + name)] += sec
  print(f"\nsummed op time per step {busy:.3f} s over step {step_s:.3f} s: busy {busy / step_s:.2f}\n")
  print("| op | s/step | share of step | source |")
  print("|---|---|---|---|")
  for name, s in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"| {name} | {s:.4f} | {100 * s / step_s:.1f}% | {sources.get(name, '')} |")
  buckets = collections.defaultdict(lambda: [0.0, 0.0])
  for src, sec in by_source.items():
    buckets[bucket_of(src)][src.startswith("bwd")] += sec
  print("\n| part of the step | fwd s | bwd s | total s/step | share of step |")
  print("|---|---|---|---|---|")
  for name, (fwd, bwd) in sorted(buckets.items(), key=lambda kv: -sum(kv[1])):
    print(f"| {name} | {fwd:.3f} | {bwd:.3f} | {fwd + bwd:.3f} | {100 * (fwd + bwd) / step_s:.1f}% |")
  print(f"| (summed op time / step time) | | | {busy:.3f} | {100 * busy / step_s:.1f}% |")
  print("\n| where (fwd/bwd, root op, llava_jax frames) | s/step | share of step |")
  print("|---|---|---|")
  for name, s in sorted(by_source.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"| {name} | {s:.4f} | {100 * s / step_s:.1f}% |")


if __name__ == "__main__":
  main()
