"""Images per second of the data pipeline at 336 px with 0, 1 and 2 worker processes.

Writes a small LLaVA-style corpus (scikit-image's photographs as 640x480 JPEGs, like
COCO, with vicuna_v1 questions and answers), then times batches after the first one
(which pays for starting the workers). Usage:

  python benchmarks/data_pipeline.py [--workers 0 1 2] [--batches 20] [--batch-size 16]
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import skimage.data
import transformers
from PIL import Image

from llava_jax.data import pipeline, synthetic

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "camera", "coins")
PROCESSOR_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                 "resample": 3, "rescale_factor": 1 / 255}


def write_corpus(root: str, num_records: int) -> tuple[str, str]:
  image_dir = os.path.join(root, "images")
  os.makedirs(image_dir, exist_ok=True)
  for name in PHOTOS:
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((640, 480)).save(
        os.path.join(image_dir, f"{name}.jpg"), quality=90)
  rng = np.random.default_rng(0)
  records = []
  for i in range(num_records):
    turns = []
    for k in range(int(rng.integers(1, 4))):
      question = "What colour is the shape in the picture? Describe the background as well."
      turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                {"from": "gpt", "value": "The shape is a red circle on a white background. " * 3}]
    records.append({"id": str(i), "image": f"{PHOTOS[i % len(PHOTOS)]}.jpg", "conversations": turns})
  path = os.path.join(root, "data.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path, image_dir


def measure(config: pipeline.DataConfig, tokenizer, num_batches: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  it = pipeline.make_iterator(config, tokenizer, PROCESSOR_336, process_index=0, process_count=1)
  next(it)
  t1 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  t2 = time.perf_counter()
  it.close()
  return num_batches * config.batch_size / (t2 - t1), t1 - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--read-threads", type=int, nargs="+", default=[2])
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=16)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    json_path, image_dir = write_corpus(root, 400)
    tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic.build_tokenizer(os.path.join(root, "tok")))
    print(f"cpus: {os.cpu_count()}, batch: {args.batch_size}, 336 px, 640x480 JPEG inputs, vicuna_v1")
    print("| workers | read threads | images/s | first batch (s) |")
    print("|--------:|-------------:|---------:|----------------:|")
    for workers in args.workers:
      for threads in args.read_threads:
        config = pipeline.DataConfig(
            json_path=json_path, image_dir=image_dir, template="vicuna_v1", max_length=2048,
            batch_size=args.batch_size, num_image_tokens=576, image_token_index=len(tokenizer),
            num_workers=workers, read_threads=threads, aspect_ratio="pad")
        rate, first = measure(config, tokenizer, args.batches)
        print(f"| {workers:7d} | {threads:12d} | {rate:8.1f} | {first:15.1f} |", flush=True)


if __name__ == "__main__":
  main()
