"""Decode speed against transformers' generate, same weights, same CPU, same thread count, in one run.

Decode tokens/s = B * (N - 1) / (time(N new tokens) - time(1 new token)), so the prefill cancels out; each side is
warmed up first (our compile is excluded; it happens once per shape). Greedy, fp32.
Usage: python benchmarks/generate_speed.py [--size tiny|small] [--new 64] [--repeats 3]
"""

import argparse
import os
import tempfile
import time

import numpy as np

SIZES = {
    # The README demo's tiny model: per-token overhead dominates.
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256)),
    # ~70M-parameter LLaMA (32k vocabulary) with a small CLIP: memory-bandwidth-bound decode.
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=14),
                  text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=32000)),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="small", choices=sorted(SIZES))
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", default="1,8")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from llava_jax import load_hf_checkpoint
  from llava_jax.generate import generate

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  size = SIZES[args.size]
  vision = transformers.CLIPVisionConfig(**size["vision"])
  text = transformers.LlamaConfig(max_position_embeddings=2048, **size["text"])
  image_token = text.vocab_size - 1
  torch.manual_seed(0)
  hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    ours = load_hf_checkpoint(tmp)
  n_img = (vision.image_size // vision.patch_size) ** 2
  params = sum(p.numel() for p in hf.parameters())
  print(f"model: {args.size}, {params / 1e6:.1f}M parameters, {n_img} image tokens; {threads} threads; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}")
  print("| batch | transformers decode tok/s | llava-jax decode tok/s | ratio |")
  print("|---|---|---|---|")
  rng = np.random.default_rng(0)
  for b in map(int, args.batches.split(",")):
    ids = np.concatenate([np.ones((b, 1), np.int64), np.full((b, n_img), image_token),
                          rng.integers(3, 200, (b, 20))], axis=1)
    mask = np.ones_like(ids)
    px = rng.standard_normal((b, vision.image_size, vision.image_size, 3)).astype(np.float32)
    px_t = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())

    def hf_run(n):
      with torch.no_grad():
        hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=px_t,
                    do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def our_run(n):
      generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=n, eos_token_id=())

    rates = []
    for run in (hf_run, our_run):
      run(args.new), run(1)  # warm-up (and our compiles)
      best_n = min(_timed(run, args.new) for _ in range(args.repeats))
      best_1 = min(_timed(run, 1) for _ in range(args.repeats))
      rates.append(b * (args.new - 1) / max(best_n - best_1, 1e-9))
    print(f"| {b} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |")


def _timed(fn, n):
  t = time.perf_counter()
  fn(n)
  return time.perf_counter() - t


if __name__ == "__main__":
  main()
