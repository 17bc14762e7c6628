"""Questions/s of `llava-jax eval`'s generation against transformers' `generate` on the same model and questions.

A random transformers LlavaForConditionalGeneration (with a SentencePiece tokenizer) is saved and converted, so both
sides hold the same weights; both get the same prompts and pixels (llava-jax's processor builds them) and decode
greedily for the same number of new tokens (EOS disabled, so every question costs the same on both sides). Rows:
batch 1 and batched (left-padded on both sides). A first pass over all questions on each side is a warm-up
(llava-jax compiles once per prompt-length bucket there) and is not timed; the best of `--repeats` timed passes
is reported. Prints a markdown table for docs/PERFORMANCE.md, with the load average before and after.

Threads: both sides get `--threads` CPU threads (torch.set_num_threads; XLA's intra-op pool through XLA_FLAGS), 1 by
default. On a machine shared with other jobs, torch with 2 OpenMP threads on 2 loaded cores ran 10-20x slower than
with 1 (every op ends in a barrier that waits for a descheduled thread), which made transformers look 50x slower
than it is; compare at equal threads and quote the load average.

  python benchmarks/eval_speed.py                       # 32 questions, 16 new tokens, batch 1 and 8, 1 thread
  python benchmarks/eval_speed.py --questions 8 --new-tokens 4 --batch 4    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def build(root: str, size: str):
  import transformers

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  import hf_tiny  # tests/hf_tiny.py: random transformers LLaVA models

  from llava_jax.cli import main as cli
  from llava_jax.data.synthetic import build_tokenizer

  build_tokenizer(os.path.join(root, "hf"))
  vocab = len(transformers.AutoTokenizer.from_pretrained(os.path.join(root, "hf"))) + 1
  wide = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8) if size == "small" else {}
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(vocab_size=vocab, max_position_embeddings=512, **wide))
  hf.config.image_token_id = hf.config.image_token_index = vocab - 1
  hf.save_pretrained(os.path.join(root, "hf"))
  with open(os.path.join(root, "hf", "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
               "crop_size": {"height": 28, "width": 28}, "do_resize": True, "do_center_crop": True,
               "resample": 3}, f)
  assert cli(["convert", "--hf", os.path.join(root, "hf"), "--out", os.path.join(root, "ckpt"), "--quiet"]) == 0
  return hf, os.path.join(root, "ckpt")


def questions(n: int, seed: int = 0):
  from PIL import Image

  from llava_jax.eval.tasks import Question

  rng = np.random.default_rng(seed)
  subjects = ["dog", "cat", "car", "person", "bicycle", "tree", "chair", "cup"]
  out = []
  for i in range(n):
    image = Image.fromarray(rng.integers(0, 255, (30 + i % 9, 40, 3), np.uint8))
    text = f"Is there a {subjects[i % len(subjects)]} in the image?" + " Look closely." * (i % 3)
    text += "\nAnswer the question using a single word or phrase."
    out.append(Question(i, text, text, lambda image=image: image))
  return out


def best_rate(run, n: int, repeats: int) -> float:
  """Questions/s of the fastest of `repeats` timed passes after one untimed warm-up pass (load spikes from other
  jobs only ever slow a pass down)."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return n / min(times)


def time_llava_jax(model, proc, qs, batch, new_tokens, devices, repeats):
  from llava_jax.eval import runner

  def run():
    with tempfile.TemporaryDirectory() as out:
      runner.generate_answers(model, proc, qs, out, batch_size=batch, max_new_tokens=new_tokens, progress=False,
                              devices=devices, eos_token_id=-1)  # all new tokens, as transformers

  return best_rate(run, len(qs), repeats)  # the warm-up compiles every prompt-length bucket


def time_transformers(hf, proc, qs, batch, new_tokens, repeats):
  import torch

  def run():
    for begin in range(0, len(qs), batch):
      chunk = qs[begin:begin + batch]
      inputs = proc([proc.prompt([q.text], image=True) for q in chunk], [q.image() for q in chunk])
      with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(inputs["input_ids"], dtype=torch.long),
                          attention_mask=torch.as_tensor(inputs["attention_mask"], dtype=torch.long),
                          pixel_values=torch.from_numpy(np.ascontiguousarray(
                              inputs["pixel_values"].transpose(0, 3, 1, 2))),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
      # min_new_tokens masks EOS, so every question costs exactly `new_tokens` steps, as on our side.
      assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens, out.shape

  return best_rate(run, len(qs), repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--questions", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--batch", type=int, default=8, help="the batched row's batch size")
  parser.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny: hf_tiny's defaults (48 wide, "
                      "2 layers); small: LLaMA 4 x 256")
  parser.add_argument("--threads", type=int, default=1, help="CPU threads for each side (torch and XLA)")
  parser.add_argument("--repeats", type=int, default=2, help="timed passes per row; the fastest is reported")
  args = parser.parse_args(argv)

  if "jax" in sys.modules:
    print("jax was imported before main(): --threads does not reach XLA")
  elif args.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
  import jax
  import torch

  from llava_jax import load_checkpoint
  from llava_jax.processor import Processor

  torch.set_num_threads(args.threads)
  with tempfile.TemporaryDirectory() as root:
    hf, ckpt = build(root, args.size)
    model = load_checkpoint(ckpt)
    proc = Processor.from_model(model)
    qs = questions(args.questions)
    eos = proc.tokenizer.eos_token_id
    devices = jax.devices()[:1]
    print(f"jax {jax.__version__} ({jax.default_backend()}, 1 device), torch {torch.__version__}, "
          f"{args.threads} thread(s) each; {args.size} model; {args.questions} questions, {args.new_tokens} new "
          f"tokens each (EOS {eos} disabled); best of {args.repeats}; load average before: {_load()}")
    print("| batch | llava-jax eval (q/s) | transformers generate (q/s) | ratio |")
    print("|---|---|---|---|")
    for batch in (1, args.batch):
      ours = time_llava_jax(model, proc, qs, batch, args.new_tokens, devices, args.repeats)
      theirs = time_transformers(hf, proc, qs, batch, args.new_tokens, args.repeats)
      print(f"| {batch} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x |", flush=True)
    print(f"load average after: {_load()}")


def _load() -> str:
  return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
  main()
