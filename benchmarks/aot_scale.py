"""Ahead-of-time scale-out check: compile the LLaVA-1.5, 1.6 and OneVision train steps for pod-sized meshes on
this CPU.

  python benchmarks/aot_scale.py                                   # 7B and 13B, stage1/stage2/lora, 8/32/64/256
  python benchmarks/aot_scale.py --sizes 7b --devices 32 --stages stage2
  python benchmarks/aot_scale.py --sizes 7b --devices 32 --stages stage2 --attention blockwise
  python benchmarks/aot_scale.py --sizes 7b --topology v5p:2x4x4 --stages stage2 --attention splash  # libtpu
  python benchmarks/aot_scale.py --sizes ov-7b --topology v5p:2x4x4 --stages si --attention splash --accum 8

Nothing is allocated: the train state and the batch are `jax.ShapeDtypeStruct`s carrying their shardings (the
Trainer builds them with `nnx.eval_shape`), and `jit(...).lower(...).compile()` runs XLA's SPMD partitioner for a
mesh of N fake CPU devices (`--xla_force_host_platform_device_count=N`, set before jax is imported, so each device
count runs in its own subprocess). The recipe is configs/llava_v1_5_{7b,13b}.py: bf16 compute, fp32 master weights
and AdamW moments, remat "full", layers scanned, 2048 tokens per row, one 336 px image per row, the reference
global batch (256 rows in stage 1, 128 in stage 2 and LoRA), split into micro-batches by gradient accumulation
where a device would need more than a v5p chip's 95 GB (`--accum auto`).

`--sizes` also takes the LLaVA-1.6 recipes (1.6-7b, 1.6-34b: every row one image in the pinpoints' maximum of
tiles) and LLaVA-OneVision's (ov-7b, ov-72b: configs/llava_onevision_qwen2_{7b,72b}.py, stages stage1 / si / ov,
32768 tokens per row in si and ov, the SigLIP tower trained there; every row one image in `OneVisionLayout.max_tiles`
= 37 tile slots of 384 px, whose tokens each mix four feature rows: `image_feature_rows` and
`image_feature_weights` [B, L, 4], data/pipeline.py's batch contract). A size is compiled for the stages of its own
recipe family among `--stages` (default: all of them).

Printed per (model, stage, devices):
  memory    per device, from XLA's memory analysis of the compiled step: arguments (params + optimizer state +
            batch shard), temporaries, and their peak (the state is donated, so outputs alias the arguments);
            "compiler's peak" is the compiler's own figure (`peak_memory_in_bytes`, arguments included), which
            for the TPU compiler is below arguments + temporaries: its temporaries are not all live at once.
  FLOPs     per step, from XLA's cost analysis, against benchmarks/flops.py's analytic count. XLA counts a loop
            body once whatever its trip count, so the scanned step cannot be read directly: the cost is measured
            on the same mesh for unrolled 1- and 2-layer variants of each tower and extrapolated linearly to the
            full depth (`--flops-on` picks the device counts that do so; the others leave XLA's column empty and
            base their times on the analytic count).
  time      the step time if every device ran the compiled FLOPs at the TPU's peak (v5p 459, v5e 197 bf16
            TFLOP/s): a compute-bound lower bound that ignores communication and memory stalls; the MFU bound is
            model FLOPs / (devices x peak x that time).
`--attention` picks the attention implementation (models/attention.py; default the config's), `--seq-chunk` the
positions per piece of the MLP and the loss (ModelOptions.seq_chunk; default the config's, 512 in the recipes).

`--topology` (e.g. `v5p:2x4x4`, 32 chips; `v5e:16x16`) compiles with the TPU compiler instead, on this host and
without a TPU: the mesh is made of the devices of `jax.experimental.topologies.get_topology_desc`, which needs
libtpu importable (`pip install "jax[tpu]"`, or the `libtpu` wheel that jax's `tpu` extra pins). The figures are
then the TPU compiler's own (its fusion, layouts, bf16 and memory-space assignment). Without it the fake CPU
devices' compiler stands in: its figures are an estimate of the TPU's (XLA:CPU widens bf16 to fp32, for one),
docs/PERFORMANCE.md compares the two. `splash` is a Pallas TPU kernel: it compiles only with `--topology`
(on CPU it would run in Pallas interpret mode, whose buffers say nothing about the kernel's), so without one the
script refuses it; `blockwise` is the plain-JAX stand-in with the same memory shape ([T, block] scores per head).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEAK_TFLOPS = {"v5p": 459.0, "v5e": 197.0}
HBM_GB = {"v5p": 95.0, "v5e": 16.0}
# Meshes (data, fsdp, tensor) per device count: the hardware presets of llava_jax.train.recipes.PRESETS where one has that
# many devices (8 = gpu-8, 32 = v5p-64, 256 = v5e-256), else FSDP over every device. Where the global batch cannot
# give every batch shard a row, a factor of 2 at a time moves from fsdp to tensor parallelism.
PRESET_FOR = {8: "gpu-8", 32: "v5p-64", 256: "v5e-256"}
LLAVA_STAGES = ("stage1", "stage2", "lora")
ONEVISION_STAGES = ("stage1", "si", "ov")
STAGES = LLAVA_STAGES + ONEVISION_STAGES[1:]
SIZES = {"7b": "llava_v1_5_7b.py", "13b": "llava_v1_5_13b.py", "tiny": "tiny.py",  # tiny: a seconds-long smoke run
         "1.6-7b": "llava_v1_6_mistral_7b.py", "1.6-34b": "llava_v1_6_34b.py", "tiny-next": "tiny_next.py",
         "ov-7b": "llava_onevision_qwen2_7b.py", "ov-72b": "llava_onevision_qwen2_72b.py",
         "tiny-ov": "tiny_onevision.py"}
ONEVISION_SIZES = ("ov-7b", "ov-72b", "tiny-ov")


def size_stages(size: str) -> tuple[str, ...]:
  """The stages the size's recipe offers."""
  return ONEVISION_STAGES if size in ONEVISION_SIZES else LLAVA_STAGES


def load_config(size: str, stage: str):
  from llava_jax.train.cli import load_config as load  # pylint: disable=import-outside-toplevel
  return load(f"{os.path.join(ROOT, 'configs', SIZES[size])}:{stage}")


def mesh_for(devices: int, batch: int, accum: int) -> tuple[int, int, int]:
  data, fsdp, tensor = (1, devices, 1)
  if devices in PRESET_FOR:
    from llava_jax.train import recipes  # pylint: disable=import-outside-toplevel
    data, fsdp, tensor = recipes.preset(PRESET_FOR[devices])["mesh"]
  while (batch // accum) % (data * fsdp) and fsdp % 2 == 0:
    if data > 1:
      data, fsdp = 1, data * fsdp
      continue
    fsdp, tensor = fsdp // 2, tensor * 2
  return data, fsdp, tensor


def compile_step(model_cfg, config, mesh_shape, rows: int, seq: int, accum: int, scan: bool, attention: str,
                 devices=None):
  """(compiled step, Trainer) for abstract inputs: no array is allocated. The config's model options with this
  `scan` and `attention`; `devices`: the mesh's (default all)."""
  import jax
  import jax.numpy as jnp

  from llava_jax.sharding import batch_sharding, make_mesh, rules_from_config
  from llava_jax.train import run_config
  from llava_jax.train.step import Trainer

  mesh = make_mesh(mesh_shape, devices)
  rules = rules_from_config(config.sharding_rules)
  lora = run_config.lora_config(config)
  options = run_config.model_options(config).replace(scan_layers=scan, attention_impl=attention)
  trainer = Trainer(model_cfg, config.stage, run_config.optim_config(config), config.total_steps, mesh, rules,
                    options=options, grad_accum_steps=accum, lora=lora, seed=config.seed)
  size = model_cfg.vision.image_size
  shapes = {"input_ids": ((rows, seq), jnp.int32), "labels": ((rows, seq), jnp.int32),
            "attention_mask": ((rows, seq), jnp.int32), "pixel_values": ((rows, size, size, 3), jnp.float32),
            "image_mask": ((rows,), jnp.bool_)}
  if model_cfg.is_next:  # every row's image in the layout's maximum of tiles, placed by host-computed rows
    from llava_jax.data.layout import layout_for  # pylint: disable=import-outside-toplevel
    taps = layout_for(model_cfg).taps  # OneVision: each token mixes `taps` rows by weights
    shapes["pixel_values"] = ((rows, tiles_per_image(model_cfg), size, size, 3), jnp.float32)
    shapes["image_feature_rows"] = ((rows, seq) + ((taps,) if taps > 1 else ()), jnp.int32)
    if taps > 1:
      shapes["image_feature_weights"] = ((rows, seq, taps), jnp.float32)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s), rules)) for k, (s, d) in
           shapes.items()}
  return trainer.compile(trainer.abstract_state, batch), trainer


def tiles_per_image(model_cfg) -> int:
  """Tile slots per image: 1 for LLaVA-1.5, the pinpoints' maximum (base tile included) for LLaVA-NeXT and
  OneVision (37 of 384 px for anyres_max_9: 36 grid tiles and the base one)."""
  from llava_jax.data.layout import layout_for  # pylint: disable=import-outside-toplevel

  return layout_for(model_cfg).max_tiles


def splash_block(seq: int) -> int:
  """The splash kernel's square tile for `seq` positions (models/attention.py's `_splash_local`)."""
  from llava_jax.models.attention import SPLASH_MAX_BLOCK  # pylint: disable=import-outside-toplevel

  return min(SPLASH_MAX_BLOCK, -(-seq // 128) * 128)


def trains_vision(trainer) -> bool:
  """Whether the step trains the vision tower (LLaVA-1.6's train_vision_tower, OneVision's si and ov)."""
  import jax  # pylint: disable=import-outside-toplevel

  from llava_jax.train.optim import FROZEN, path_str  # pylint: disable=import-outside-toplevel

  return any("vision_tower" in path_str(path) and label != FROZEN
             for path, label in jax.tree_util.tree_leaves_with_path(trainer.labels))


def _replace(dc, **kw):
  import dataclasses
  return dataclasses.replace(dc, **kw)


def topology_devices(name: str) -> list:
  """The devices of a TPU topology (e.g. "v5p:2x4x4"), to compile for without the hardware."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"--topology {name}: no TPU compiler here ({type(e).__name__}: {e}); install libtpu "
                     "(`pip install \"jax[tpu]\"`)") from e


def worker(args) -> None:
  """One device count: every requested (size, stage); one JSON line per result."""
  import jax

  sys.path[:0] = [HERE, ROOT]
  import flops as fl
  from llava_jax.train import run_config

  devices = topology_devices(args.topology) if args.topology else jax.devices()
  if len(devices) != args.devices:
    raise SystemExit(f"{len(devices)} devices, {args.devices} asked for")
  platform = devices[0].platform
  if args.attention == "splash" and platform != "tpu":
    raise SystemExit(f"--attention splash compiles only for a TPU (these devices: {platform}); use --topology "
                     "(TPU compiler, no TPU needed) or --attention blockwise for the same memory shape in plain JAX")
  for size in args.sizes:
    for stage in [s for s in args.stages if s in size_stages(size)]:
      config = load_config(size, stage)
      attention = args.attention or config.attention_impl
      if args.seq_chunk is not None:
        config.seq_chunk = args.seq_chunk
      model_cfg = run_config.model_config(config)
      rows, seq = config.batch_size, config.data.seq_len
      accum = config.grad_accum_steps if args.accum == "auto" else int(args.accum)
      while True:
        mesh_shape = mesh_for(args.devices, rows, accum)
        t0 = time.perf_counter()
        try:
          compiled, trainer = compile_step(model_cfg, config, mesh_shape, rows, seq, accum,
                                           scan=config.scan_layers, attention=attention, devices=devices)
        except Exception as e:  # pylint: disable=broad-except  (one failed configuration must not hide the rest)
          print(f"FAILED {size} {stage} on {args.devices} devices, mesh {mesh_shape}: {type(e).__name__}: {e}",
                flush=True)
          compiled = None
          break
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - \
            mem.alias_size_in_bytes
        micro_rows = rows // accum // (mesh_shape[0] * mesh_shape[1])
        if args.accum != "auto" or peak <= HBM_GB["v5p"] * 1e9 or micro_rows <= 1:
          break
        print(f"  {size} {stage} on {args.devices} devices: {peak / 1e9:.0f} GB per device with {micro_rows} rows "
              f"per micro-batch; accumulating over {2 * accum} micro-batches instead", flush=True)
        accum *= 2
      if compiled is None:
        continue
      result = dict(size=size, stage=stage, devices=args.devices, mesh=mesh_shape, rows=rows, seq=seq,
                    attention=attention, compiler=args.topology or platform, seq_chunk=config.seq_chunk,
                    accum=accum, compile_s=compile_s, argument=mem.argument_size_in_bytes,
                    output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
                    compiler_peak=getattr(mem, "peak_memory_in_bytes", 0),
                    state_bytes=_state_bytes_per_device(trainer.abstract_state),
                    scanned_flops=trainer.flops_per_step)
      vision = trains_vision(trainer)
      del compiled, trainer
      lora_r = config.lora.r if stage == "lora" else 0
      tiles = rows * tiles_per_image(model_cfg)  # the tower runs every tile slot
      # splash skips the key blocks a causal mask hides; the other implementations' count stays the dense one
      causal_share = fl.causal_block_share(seq, splash_block(seq)) if attention == "splash" else 1.0
      model = fl.train_step(model_cfg, stage, rows, seq, tiles, lora_r=lora_r, train_vision=vision)
      hardware = fl.train_step(model_cfg, stage, rows, seq, tiles, lora_r=lora_r, remat=config.remat != "none",
                               train_vision=vision, hardware=True, seq_chunk=config.seq_chunk,
                               causal_share=causal_share)
      result.update(model_flops=model.total, hardware_flops=hardware.total)
      if args.flops_on == "all" or str(args.devices) in args.flops_on.split(","):
        t0 = time.perf_counter()
        micro = rows // accum

        def flops(vision_run: int, text_layers: int) -> float:
          cfg = model_cfg.replace(vision=_replace(model_cfg.vision, num_hidden_layers=vision_run + 1),
                                  text=_replace(model_cfg.text, num_hidden_layers=text_layers))
          whole_rows = copy.deepcopy(config)  # position pieces would hide their trip count from XLA's count
          whole_rows.seq_chunk = 0
          _, small = compile_step(cfg, whole_rows, mesh_shape, micro, seq, 1, scan=False, attention=attention,
                                  devices=devices)
          return small.flops_per_step

        f11, f21, f12 = flops(1, 1), flops(2, 1), flops(1, 2)
        v_run = fl.vision_layers_run(model_cfg)
        per_device = f11 + (v_run - 1) * (f21 - f11) + (model_cfg.text.num_hidden_layers - 1) * (f12 - f11)
        result.update(xla_flops_per_device=per_device * accum, flops_compile_s=time.perf_counter() - t0)
      print("RESULT " + json.dumps(result), flush=True)


def _state_bytes_per_device(abstract_state) -> int:
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(abstract_state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def run_device_count(devices: int, args) -> list[dict]:
  env = dict(os.environ)
  # The device count, and a cheaper LLVM pipeline: the code is never run, and buffer assignment (the memory
  # figures) happens before it.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
                      " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--devices", str(devices),
         "--sizes", ",".join(args.sizes), "--stages", ",".join(args.stages), "--accum", str(args.accum)]
  cmd += ["--flops-on", args.flops_on]
  if args.topology:
    cmd += ["--topology", args.topology]
  if args.attention:
    cmd += ["--attention", args.attention]
  if args.seq_chunk is not None:
    cmd += ["--seq-chunk", str(args.seq_chunk)]
  results = []
  with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT) as proc:
    for line in proc.stdout:
      if line.startswith("RESULT "):
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"  compiled {r['size']} {r['stage']} on {devices} devices ({r['attention']} attention, "
              f"{r['compiler']} compiler) in "
              f"{r['compile_s']:.0f} s", flush=True)
      else:
        print("  " + line.rstrip(), flush=True)
  if proc.returncode:
    raise SystemExit(f"the worker for {devices} devices failed (exit {proc.returncode})")
  return results


def print_tables(results: list[dict]) -> None:
  gb = 1e9
  print("| model | stage | devices | compiler | attention | mesh (data, fsdp, tensor) | rows/device x accum | "
        "state/device | temporaries/device | peak/device | compiler's peak | fits v5p (95 GB) | fits v5e (16 GB) | "
        "compile |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    data, fsdp, _ = r["mesh"]
    per_device_rows = r["rows"] // (data * fsdp) // r["accum"]
    peak = _peak(r)
    compiler_peak = f"{r['compiler_peak'] / gb:.1f} GB" if r.get("compiler_peak") else ""
    print(f"| {r['size']} | {r['stage']} | {r['devices']} | {r['compiler']} | {r['attention']} | {tuple(r['mesh'])} "
          f"| {per_device_rows} x {r['accum']} "
          f"| {r['state_bytes'] / gb:.1f} GB | {r['temp'] / gb:.1f} GB | {peak / gb:.1f} GB | {compiler_peak} | "
          f"{'yes' if peak <= HBM_GB['v5p'] * gb else '**no**'} | {'yes' if peak <= HBM_GB['v5e'] * gb else 'no'} | "
          f"{r['compile_s']:.0f} s |")
  print()
  print("| model | stage | devices | tokens/step | XLA TFLOP/step | analytic hardware TFLOP | XLA / analytic | "
        "model TFLOP (MFU numerator) | v5p step (roofline) | v5p MFU bound | v5e step (roofline) | v5e MFU bound |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    tokens = r["rows"] * r["seq"]
    xla = r.get("xla_flops_per_device")
    if xla is None:
      cells = ["", f"{r['hardware_flops'] / 1e12:,.0f}", "", f"{r['model_flops'] / 1e12:,.0f}"]
      per_device = r["hardware_flops"] / r["devices"]
    else:
      total = xla * r["devices"]
      cells = [f"{total / 1e12:,.0f}", f"{r['hardware_flops'] / 1e12:,.0f}", f"{total / r['hardware_flops']:.2f}",
               f"{r['model_flops'] / 1e12:,.0f}"]
      per_device = xla
    for chip in ("v5p", "v5e"):
      t = per_device / (PEAK_TFLOPS[chip] * 1e12)
      mfu = r["model_flops"] / (r["devices"] * PEAK_TFLOPS[chip] * 1e12 * t)
      cells += [f"{t:.2f} s", f"{100 * mfu:.0f}%"]
    print(f"| {r['size']} | {r['stage']} | {r['devices']} | {tokens:,} | " + " | ".join(cells) + " |")


def _peak(r: dict) -> int:
  """Per-device peak: arguments + temporaries + outputs that do not reuse a (donated) argument's buffer."""
  return r["argument"] + r["temp"] + r["output"] - r["alias"]


def main(argv=None):
  sys.path[:0] = [] if ROOT in sys.path else [ROOT]
  from llava_jax.models.attention import IMPLS  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="7b,13b")
  parser.add_argument("--stages", default=",".join(STAGES),
                      help="stages to compile, each for the sizes whose recipe has it (LLaVA-1.x: stage1, stage2, "
                           "lora; OneVision: stage1, si, ov)")
  parser.add_argument("--devices", default="8,32,64,256")
  parser.add_argument("--topology", help="compile for this TPU topology with the TPU compiler (no TPU needed, "
                                         "libtpu must be importable), e.g. v5p:2x4x4 (32 chips); sets --devices")
  parser.add_argument("--accum", default="auto",
                      help="gradient accumulation steps; 'auto': the config's, doubled until a device needs at "
                           "most 95 GB (a v5p chip)")
  parser.add_argument("--flops-on", default="32",
                      help="device counts (comma-separated, 'all' or 'none') whose rows also measure XLA's FLOP "
                           "count: three more small compiles per step")
  parser.add_argument("--attention", choices=IMPLS, default=None,
                      help="attention implementation (default: the config's attention_impl); splash needs "
                           "--topology")
  parser.add_argument("--seq-chunk", type=int, default=None,
                      help="positions per piece of the MLP and the loss (default: the config's; 0: whole rows)")
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.sizes = [s for s in args.sizes.split(",") if s]
  args.stages = [s for s in args.stages.split(",") if s]
  bad = [s for s in args.sizes if s not in SIZES] + [s for s in args.stages if s not in STAGES]
  if bad:
    parser.error(f"unknown {bad}: sizes are {sorted(SIZES)}, stages {STAGES}")
  if args.topology:  # "v5p:2x4x4" -> 32 chips
    dims = args.topology.split(":")[-1].split("x")
    if not all(d.isdigit() for d in dims):
      parser.error(f"--topology {args.topology!r}: expected e.g. v5p:2x4x4")
    args.devices = str(math.prod(int(d) for d in dims))
  if args.topology and args.flops_on != "none":
    # The TPU compiler's cost analysis counts on another scale (about half of XLA:CPU's and the analytic count).
    print("--topology: FLOP columns from the analytic count only (run without --topology for XLA's)", flush=True)
    args.flops_on = "none"
  if args.worker:
    args.devices = int(args.devices)
    worker(args)
    return
  device_counts = [int(d) for d in args.devices.split(",")]
  compiler = f"the TPU compiler for {args.topology}" if args.topology else "fake CPU devices"
  print(f"AOT compile on this CPU ({os.cpu_count()} cores, {compiler}): sizes {args.sizes}, stages {args.stages}, "
        f"devices {device_counts}, attention {args.attention or 'from the config'}", flush=True)
  t0 = time.perf_counter()
  results = []
  for n in device_counts:
    results += run_device_count(n, args)
  print(f"\n{len(results)} steps compiled in {time.perf_counter() - t0:.0f} s\n")
  print_tables(results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
