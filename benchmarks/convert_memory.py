"""Peak memory of `llava-jax convert` on a ~1 GB llava-hf checkpoint, as a ratio to the checkpoint's size.

Writes a random-weight checkpoint (sharded safetensors, fp32) to a temporary directory, runs the conversion in a
child process, and reads the child's peak RSS. Also prints the RSS of a child that only imports the package, so
the conversion's own share is visible.  Usage: python benchmarks/convert_memory.py [--layers 12]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.convert import iter_hf_tensors, name_table
from llava_jax.safetensors_io import write_safetensors


def random_checkpoint(cfg: LlavaConfig, out: str):
  rng = np.random.default_rng(0)
  stream = ((e.hf_key, rng.standard_normal(_hf_shape(e), np.float32)) for e in name_table(cfg))
  write_safetensors(stream, out, max_shard_bytes=256 * 2**20)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f)


def _hf_shape(entry):
  from llava_jax.convert import hf_shape
  return hf_shape(entry)


def child_peak_rss(cmd) -> int:
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return max(before, after) * 1024  # KiB on Linux


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=12)
  args = parser.parse_args()
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
      text=TextConfig(vocab_size=32064, hidden_size=1024, intermediate_size=4096, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128))
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt")
    os.makedirs(src)
    random_checkpoint(cfg, src)
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    # Separate children: RUSAGE_CHILDREN keeps the maximum over all children, so measure the small one first.
    base = child_peak_rss([sys.executable, "-c", "import llava_jax.convert, orbax.checkpoint"])
    peak = child_peak_rss([sys.executable, "-m", "llava_jax.cli", "convert", "--hf", src, "--out", dst, "--quiet"])
  gb = 2**30
  print(f"| checkpoint size | peak RSS of convert | ratio | RSS of imports alone | (peak - imports) / size |")
  print(f"|---|---|---|---|---|")
  print(f"| {size / gb:.2f} GiB | {peak / gb:.2f} GiB | {peak / size:.2f} | {base / gb:.2f} GiB | "
        f"{(peak - base) / size:.2f} |")


if __name__ == "__main__":
  main()
