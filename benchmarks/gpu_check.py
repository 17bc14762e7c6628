"""One GPU, under 8 minutes: is llava-jax right there, and how fast is it beside transformers + torch?

  python benchmarks/gpu_check.py --out gpu_check.md       # on one H100 / H200 (the default when a GPU is seen)
  python benchmarks/gpu_check.py --smoke                  # the same code paths on CPU with tiny shapes (CI)

Sections, in this order, each in its own process on the GPU (one side at a time owns the memory), each timed;
when the time budget (`--budget`, 450 s) would be passed a section reports "skipped: budget" instead:

  parity     a tiny random transformers LLaVA, saved with save_pretrained and loaded into llava-jax, on the GPU.
             fp32: both sides in true fp32 (jax matmul precision "highest", torch TF32 off), max |logit diff| <=
             1e-4 (tests/test_model_parity.py's bound). bf16: our error against the fp32 logits <= 2 x transformers'
             own bf16 error + 0.02 (the bound of test_bfloat16_is_as_close_to_exact_as_transformers_bfloat16).
             Greedy decoding in fp32: the same 8 new tokens as transformers' `generate`.
  attention  `cudnn` and `xla` (models/attention.py) against torch's scaled_dot_product_attention at the 7B shape
             (1 x 2048 tokens, 32 heads of 128, bf16, causal): forward + backward time, and output / gradient error
             against an fp32 reference, relative to its largest value, <= 2 x torch's bf16 error + 0.01. Without a
             GPU the cudnn row is skipped (cuDNN is GPU only). Later rows use cudnn if it passed here (`--attention
             auto`), else xla (and a row whose cudnn attempt raises is measured with xla, with a note); decode
             always uses xla (one query against the cache).
  stage2     one stage-2 AdamW step (projector + LLM trainable, CLIP frozen) of a 7B-shaped model: CLIP ViT-L/14 at
             336 px, LLaMA layers of Vicuna-7B's shape (4096 wide, 32 heads, MLP 11008, vocab 32000), 1 row of 2048
             tokens (576 image tokens), bf16 compute with fp32 master weights and Adam moments, remat as the 7B
             recipe (full, scanned layers, seq_chunk 512; torch: gradient checkpointing, autocast bf16, fused
             AdamW). Only `--train-layers` (8) of the 32 layers: the full 7B stage 2 holds 16 bytes per trainable
             parameter (fp32 weight, gradient, two moments: 7B x 16 = 112 GB), more than one 80 GB GPU, for either
             side. The same per-layer shapes give the same per-layer efficiency; MFU is this model's step FLOPs
             (benchmarks/flops.py, causal attention counted half, no recomputation) / time / peak; the FLOPs
             computed with remat and dense attention are noted beside it (XLA's cost analysis counts a scanned
             loop's body once, so it is printed but not used).
  inference  the full 32-layer 7B shape in bf16 (14 GB of weights, random): prefill of 1 x 2048 tokens (last
             logits, KV cache written; torch: forward with use_cache, logits_to_keep=1), and greedy decode tokens/s
             at batch 1 and 32 after a 640-token prompt (576 image tokens), 128 new tokens (ours: prefill + one
             compiled decode loop, llava_jax.decoding; torch: one forward per token with a DynamicCache, sdpa
             attention, no torch.compile). Decode's "% of peak" is of HBM bandwidth: the weights and KV cache one
             step reads (flops.decode_bytes) / step time / bandwidth.

Times are medians of `--repeats` (3) runs after a warm-up run that compiles; jax keeps compiled programs in a
persistent cache (JAX_COMPILATION_CACHE_DIR, under /tmp), which a rerun on the same machine reads. Exit status 1:
a check failed or a section raised (its cells say so); "skipped: budget" is not a failure.

Peaks (dense, no sparsity) by device name, from NVIDIA's H100 and H200 datasheets: H100 SXM 989 TFLOP/s bf16,
3.35 TB/s; H100 NVL 835, 3.9; H100 PCIe 756, 2.0; H200 989, 4.8; H200 NVL 835, 4.8 (half the datasheets' "with
sparsity" figures; `--peak-tflops`, `--peak-tbps` override).

What the GPU machine needs (`NEEDED`; checked before anything runs, exit status 2 naming what is missing): jax with
CUDA, flax, optax, torch, transformers, safetensors, numpy from its image, this checkout, and what the image lacks
of: ml_collections with its absl-py and PyYAML (`llava_jax.train.step` imports `train/recipes.py`, which imports
it) and pillow (`data/anyres.py`, which the model's image layout imports). Carry their wheels beside the script,
e.g. `pip download ml_collections==1.1.0 --no-deps -d benchmarks/wheels` on a machine with internet (compiled ones
for the GPU machine's Python and platform: `--python-version 3.X --platform manylinux2014_x86_64 --only-binary=:all:`);
every *.whl in `--wheels` (default benchmarks/wheels) is unpacked once beside it and put on sys.path, nothing is
installed. grain, orbax and tensorboardX are not imported on these paths (`llava_jax.data` loads its grain pipeline
on first use).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # gpu_check_jobs.py beside this file; llava_jax from the checkout
from gpu_check_jobs import JOB_FNS  # noqa: E402

# (name in the device name, dense bf16 FLOP/s, HBM bytes/s); the first match wins.
PEAKS = (("h200 nvl", 835e12, 4.8e12), ("h200", 989e12, 4.8e12), ("h100 nvl", 835e12, 3.9e12),
         ("h100 pcie", 756e12, 2.0e12), ("h100", 989e12, 3.35e12))
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)  # = llava_jax.train.recipes.CLIP_L_336
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128)  # = recipes.VICUNA_7B
SHAPES = {
    "full": dict(vision=CLIP_L_336, text=VICUNA_7B, train_layers=8, seq=2048, prompt=640, new_tokens=128,
                 batches=(1, 32), attention=(1, 2048, 32, 128), seq_chunk=512, repeats=3),
    # A few layers of small width; the same code paths.
    "smoke": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=7),
                  text=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, head_dim=16),
                  train_layers=2, seq=64, prompt=24, new_tokens=4, batches=(1, 4), attention=(1, 64, 4, 16),
                  seq_chunk=32, repeats=1),
}
# job: (sections it fills, the side whose process runs it, seconds it needs at least on an H100 (a guess))
JOBS = (("parity", "both", 60), ("attention", "both", 45), ("stage2", "jax", 120), ("stage2", "torch", 60),
        ("inference", "jax", 120), ("inference", "torch", 90))


# What the jobs import beyond the standard library: module -> the distribution to carry if it is missing.
NEEDED = {"jax": "jax + jaxlib (CUDA)", "flax": "flax", "optax": "optax", "torch": "torch",
          "transformers": "transformers", "safetensors": "safetensors", "numpy": "numpy",
          "ml_collections": "ml_collections (train/recipes.py)", "absl": "absl-py (ml_collections)",
          "yaml": "PyYAML (ml_collections)", "PIL": "pillow (data/anyres.py, imported by the model's image layout)"}


def use_wheels(directory: str) -> list[str]:
  """Every *.whl in `directory` unpacked once into directory/.unpacked/NAME and put first on sys.path (compiled
  wheels too, for this Python and platform; nothing is installed). Returns the folders."""
  folders = []
  for wheel in sorted(glob.glob(os.path.join(directory, "*.whl"))):
    folder = os.path.join(directory, ".unpacked", os.path.basename(wheel)[:-4])
    if not os.path.isdir(folder):
      with zipfile.ZipFile(wheel) as z:
        z.extractall(folder + ".part")
      os.replace(folder + ".part", folder)
    folders.append(folder)
  sys.path[:0] = folders
  return folders


def missing_modules() -> list[str]:
  return [f"{module} ({dist})" for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


def row_keys(section: str, shape: dict) -> list[str]:
  return {"parity": ["parity fp32", "parity bf16", "greedy fp32"], "attention": ["attention cudnn", "attention xla"],
          "stage2": ["stage2"], "inference": ["prefill"] + [f"decode b{b}" for b in shape["batches"]]}[section]


def device_kind() -> str:
  """The GPU's name, '' without one; from nvidia-smi, else a throwaway torch process (this one starts neither jax
  nor torch on the GPU: each job's process has it to itself)."""
  for cmd in (["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
              [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() "
                                     "else '')"]):
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if out.returncode == 0 and out.stdout.strip():
      return out.stdout.strip().splitlines()[0]
  return ""


def peaks_for(kind: str, args) -> tuple[float | None, float | None]:
  match = next((p for p in PEAKS if p[0] in kind.lower()), (None, None, None))
  return (args.peak_tflops * 1e12 if args.peak_tflops else match[1],
          args.peak_tbps * 1e12 if args.peak_tbps else match[2])


# -- running the jobs, the table ---------------------------------------------------------------------------------


def mark(table: dict, keys, side: str, reason: str):
  """Rows of a job that did not run: the whole row for a job of both sides, else that side's cell."""
  for key in keys:
    row = table.setdefault(key, {"label": key, "kind": "time"})
    if side == "both":
      table[key] = {"label": row["label"], "kind": "skip", "reason": reason}
    else:
      row[f"{'ours' if side == 'jax' else 'torch'}_note"] = reason


def run_isolated(section: str, side: str, args, timeout: float) -> dict:
  """The job in a fresh process (this script with --job): it owns the GPU's memory while it runs."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "job.json")
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--job", f"{section}:{side}", "--job-out", path,
           "--attention", args.attention]
    # jax takes 75% of the GPU at its first use by default: all of it for a jax-only job, less beside torch. A rerun
    # on the same machine reads the compiled programs from jax's persistent cache (compiles are a third of a run).
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.9" if side == "jax" else "0.4")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llava_jax_gpu_check_cache"))
    proc = subprocess.run(cmd, env=env, timeout=timeout, check=False)
    if proc.returncode:
      raise RuntimeError(f"the job's process exited with {proc.returncode} (its output is above)")
    with open(path) as f:
      return json.load(f)


def run_jobs(args, shape: dict, jobs=JOBS) -> tuple[dict, list, list]:
  """Runs the chosen sections' jobs in order within the budget; returns (rows by key, notes, failures)."""
  table, notes, failures = {}, [], []
  start = time.perf_counter()
  for section, side, need in jobs:
    if section not in args.sections:
      continue
    keys = row_keys(section, shape)
    if section != "attention" and args.attention == "auto":  # the attention check did not run or pass
      args.attention = "xla"
    left = args.budget - (time.perf_counter() - start)
    if left < (0 if args.smoke else need):
      mark(table, keys, side, "skipped: budget")
      print(f"[{section} / {side}] skipped: {left:.0f} s of the budget left, it needs about {need} s", flush=True)
      continue
    t0 = time.perf_counter()
    print(f"[{section} / {side}] running ({left:.0f} s of the budget left)", flush=True)
    try:
      result = (run_isolated(section, side, args, left) if args.isolate else
                JOB_FNS[(section, side)](shape, args))
    except subprocess.TimeoutExpired:
      mark(table, keys, side, f"skipped: budget (stopped after {time.perf_counter() - t0:.0f} s)")
      continue
    except Exception as e:  # pylint: disable=broad-except  (one failed section does not hide the others)
      traceback.print_exc()
      mark(table, keys, side, f"failed: {type(e).__name__}: {str(e)[:160]}")
      failures.append(f"{section} / {side}: {e}")
      continue
    notes += result.get("notes", [])
    notes.append(f"{section} / {side}: {time.perf_counter() - t0:.0f} s")
    for key, row in result["rows"].items():
      table.setdefault(key, {}).update(row)
      print(f"  {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in row.items() if k not in ("label", "kind")), flush=True)
    if section == "attention" and args.attention == "auto":
      args.attention = "cudnn" if result.get("attention_ok") else "xla"
  return table, notes, failures


HEAD = ["row", "llava-jax", "transformers+torch", "speed-up", "llava-jax of peak", "transformers of peak", "check"]


def cells(row: dict, peak_flops, peak_bw) -> list[str]:
  label = row.get("label", "?")
  if row["kind"] == "skip":
    return [label, row["reason"], "", "", "", "", ""]
  verdict = f"{row['check']}: {'ok' if row['ok'] else '**FAIL**'}" if "check" in row else ""
  if row["kind"] == "check":
    return [label, row["ours_text"], row["torch_text"], "", "", "", verdict]
  peak, what = (peak_flops, "MFU") if row["kind"] == "time" else (peak_bw, "of HBM bw")

  def side(name):
    s = row.get(f"{name}_s")
    if s is None:
      return row.get(f"{name}_note", "not run"), ""
    value = f"{s * 1e3:.1f} ms" if row["kind"] == "time" else f"{row['tokens'] / s:.1f} tok/s"
    return value, f"{100 * row['work'] / s / peak:.1f}% {what}" if peak else ""

  (ours, ours_pct), (torch_, torch_pct) = side("ours"), side("torch")
  speed = f"{row['torch_s'] / row['ours_s']:.2f}x" if row.get("ours_s") and row.get("torch_s") else ""
  return [label, ours, torch_, speed, ours_pct, torch_pct, verdict]


def markdown(table: dict, peak_flops, peak_bw) -> str:
  lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
  lines += ["| " + " | ".join(cells(r, peak_flops, peak_bw)) + " |" for r in table.values()]
  return "\n".join(lines)


def versions() -> str:
  from importlib import metadata
  found = []
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      found.append(f"{name} absent")
  return ", ".join(found)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, the same code paths (CI)")
  parser.add_argument("--sections", default="parity,attention,stage2,inference")
  parser.add_argument("--budget", type=float, default=450.0, help="seconds for all sections (full mode)")
  parser.add_argument("--train-layers", type=int, default=0, help="LLM layers of the stage-2 step (default 8)")
  parser.add_argument("--repeats", type=int, default=0, help="timed runs per row after one warm-up (default 3)")
  parser.add_argument("--attention", default="auto", choices=("auto", "cudnn", "xla"),
                      help="the stage-2 and prefill rows' attention (auto: cudnn if its check passed)")
  parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                      help="each job in its own process (default: on, but off with --smoke)")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (default: by device name)")
  parser.add_argument("--peak-tbps", type=float, default=0.0, help="HBM TB/s (default: by device name)")
  parser.add_argument("--wheels", default=os.path.join(HERE, "wheels"), help="*.whl here go on sys.path")
  parser.add_argument("--out", default="", help="also write the table: X.md (markdown) and X.json")
  parser.add_argument("--job", default="", help=argparse.SUPPRESS)
  parser.add_argument("--job-out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
  wheels = use_wheels(args.wheels)
  missing = missing_modules()
  if missing:
    print(f"missing: {', '.join(missing)}. Put their wheels (for this Python and platform) in {args.wheels} or "
          "pass --wheels DIR: see this script's docstring.", file=sys.stderr)
    return 2
  shape = dict(SHAPES["smoke" if args.smoke else "full"])
  shape["train_layers"] = args.train_layers or shape["train_layers"]
  shape["repeats"] = args.repeats or shape["repeats"]
  args.sections = args.sections.split(",")
  unknown = sorted(set(args.sections) - {s for s, _, _ in JOBS})
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from parity, attention, stage2, inference")
  if args.job:
    section, side = args.job.split(":")
    with open(args.job_out, "w") as f:
      json.dump(JOB_FNS[(section, side)](shape, args), f)
    return 0

  if args.smoke:  # both sides on the CPU, even on a GPU machine
    os.environ["JAX_PLATFORMS"], os.environ["CUDA_VISIBLE_DEVICES"] = "cpu", ""
  kind = "" if args.smoke else device_kind()
  if not kind and not args.smoke:
    parser.error("no GPU found (neither nvidia-smi nor torch names one): run with --smoke for the CPU check")
  args.isolate = (not args.smoke) if args.isolate is None else args.isolate
  peak_flops, peak_bw = peaks_for(kind, args)
  print(f"device: {kind or 'CPU (smoke)'}; peaks: {peak_flops and peak_flops / 1e12} TFLOP/s bf16, "
        f"{peak_bw and peak_bw / 1e12} TB/s; {versions()}; shapes: {'smoke' if args.smoke else 'full'}; carried "
        f"wheels: {', '.join(os.path.basename(w) for w in wheels) or 'none'}", flush=True)
  t0 = time.perf_counter()
  table, notes, failures = run_jobs(args, shape)
  text = markdown(table, peak_flops, peak_bw)
  print(f"\n{text}\n")
  for note in notes + [f"total {time.perf_counter() - t0:.0f} s"]:
    print(f"- {note}")
  bad = [r["label"] for r in table.values() if r.get("ok") is False]
  if args.out:
    stem = args.out[:-3] if args.out.endswith(".md") else args.out
    with open(stem + ".md", "w") as f:
      f.write(text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(stem + ".json", "w") as f:
      json.dump({"device": kind, "peak_flops": peak_flops, "peak_bandwidth": peak_bw, "versions": versions(),
                 "rows": table, "notes": notes, "failures": failures, "checks_failed": bad}, f, indent=1)
  for line in [f"FAILED: {f}" for f in failures] + [f"CHECK FAILED: {b}" for b in bad]:
    print(line)
  return 1 if failures or bad else 0


if __name__ == "__main__":
  sys.exit(main())
