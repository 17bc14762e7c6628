"""Hardware presets: device count, hosts, and the (data, fsdp, tensor) mesh we train 7B/13B with on each.

Used by configs (`--config.mesh`) and by `launch/` (accelerator type, TPU runtime, host count). FSDP over all
chips fits 7B/13B stage 2 and has the fewest collectives per layer, so tensor parallelism stays at 1 until the
global batch (128 sequences in stage 2) no longer covers the batch axes: on v5e-256 a 4-way tensor axis takes
the rest.
"""

PRESETS = {
    # TPU v4: the name counts TensorCores, 2 per chip; JAX sees one device per chip.
    "v4-32": dict(kind="tpu", accelerator_type="v4-32", runtime="tpu-ubuntu2204-base", devices=16, hosts=4,
                  mesh=(1, 16, 1)),
    # TPU v5p: likewise 2 TensorCores per chip, one JAX device per chip.
    "v5p-64": dict(kind="tpu", accelerator_type="v5p-64", runtime="v2-alpha-tpuv5", devices=32, hosts=8,
                   mesh=(1, 32, 1)),
    # TPU v5e: the name counts chips, 1 TensorCore each, 4 per host; 16 GiB HBM per chip.
    "v5e-256": dict(kind="tpu", accelerator_type="v5litepod-256", runtime="v2-alpha-tpuv5-lite", devices=256,
                    hosts=64, mesh=(1, 64, 4)),
    # One node of 8 GPUs (e.g. 8x A100/H100 80 GB).
    "gpu-8": dict(kind="gpu", accelerator_type="8xGPU", runtime="", devices=8, hosts=1, mesh=(1, 8, 1)),
}


def get(name: str) -> dict:
  if name not in PRESETS:
    raise ValueError(f"unknown hardware preset {name!r}; known: {sorted(PRESETS)}")
  return dict(PRESETS[name])
