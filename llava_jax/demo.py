"""The tiny end-to-end job behind README's first command, on weights it makes locally (no downloads).

Today: make a tiny random llava-hf checkpoint -> `convert` -> Orbax checkpoint -> load -> forward on an image ->
`export-hf` -> check the export is bit-identical to the source. Training and generation join as they land.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.checkpoint import load_checkpoint
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.convert import convert_checkpoint, export_hf
from llava_jax.models.llava import Llava
from llava_jax.safetensors_io import SafetensorsReader

TINY = LlavaConfig(
    vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    image_token_index=255)


def run(workdir: str) -> dict:
  t0 = time.time()
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  hf_dir, ckpt, out = (os.path.join(workdir, n) for n in ("hf_tiny", "ckpt", "hf_export"))

  export_hf(Llava(TINY, rngs=nnx.Rngs(0)), hf_dir)
  print(f"[1/4] made a tiny random llava-hf checkpoint in {hf_dir}")
  convert_checkpoint(ckpt, hf=hf_dir, progress=False)
  print(f"[2/4] converted it to an Orbax checkpoint in {ckpt}")

  model = load_checkpoint(ckpt)
  n = TINY.num_image_tokens
  ids = jnp.asarray([[1, 10, 11] + [TINY.image_token_index] * n + [12, 13]])
  pixels = jax.random.normal(jax.random.key(0), (1, 56, 56, 3))
  logits = nnx.jit(lambda m, i, p: m(i, p))(model, ids, pixels)
  print(f"[3/4] forward: input_ids {tuple(ids.shape)} + pixel_values {tuple(pixels.shape)} -> logits "
        f"{tuple(logits.shape)}, next token {int(jnp.argmax(logits[0, -1]))}")

  export_hf(model, out)
  src, dst = SafetensorsReader(hf_dir), SafetensorsReader(out)
  identical = src.keys() == dst.keys() and all(np.array_equal(src.get(k), dst.get(k)) for k in src.keys())
  print(f"[4/4] exported back to {out}: {len(dst.keys())} tensors, bit-identical to the source: {identical}")
  print(f"done in {time.time() - t0:.1f}s")
  if not identical:
    raise SystemExit("export differs from the source checkpoint")
  return {"identical": identical, "logits_shape": tuple(logits.shape)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="runs/demo")
  run(parser.parse_args(argv).workdir)
