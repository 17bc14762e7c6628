"""Batches for training: the LLaVA grain pipeline (`llava_jax.data`), or synthetic batches for tests and
benchmarks. Both give this host's rows of the global batch and have `get_state()` / `set_state()` (a JSON dict).
"""

from __future__ import annotations

import json
import os

import numpy as np

from llava_jax.config import IGNORE_INDEX, LlavaConfig

KINDS = ("synthetic", "llava")


class SyntheticIterator:
  """Random token rows with one image each (every fourth row text-only), deterministic in (seed, step, host).

  A row is: BOS, a prompt, the image's tokens, more prompt, then an answer that alone is supervised; right
  padding. `num_distinct` > 0 cycles through that many batches (a small fixed set to overfit).
  """

  def __init__(self, batch_size: int, seq_len: int, model_cfg: LlavaConfig, seed: int = 0,
               num_distinct: int = 0, process_index: int = 0):
    self.batch_size, self.seq_len, self.model_cfg = batch_size, seq_len, model_cfg
    self.seed, self.num_distinct, self.process_index = seed, num_distinct, process_index
    self.index = 0
    n_img = model_cfg.num_image_tokens
    if seq_len < n_img + 8:
      raise ValueError(f"data.seq_len {seq_len} leaves no room for text beside the {n_img} image tokens; "
                       f"set --config.data.seq_len to at least {n_img + 8}")

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    which = self.index % self.num_distinct if self.num_distinct else self.index
    self.index += 1
    return self.batch(which)

  def batch(self, which: int) -> dict:
    cfg = self.model_cfg
    rng = np.random.default_rng([self.seed, which, self.process_index])
    b, t, n_img = self.batch_size, self.seq_len, cfg.num_image_tokens
    vocab = cfg.text.vocab_size
    size = cfg.vision.image_size
    ids = np.zeros((b, t), np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, t), np.int32)
    image_mask = np.array([r % 4 != 3 for r in range(b)])
    for r in range(b):
      length = int(rng.integers(max(n_img + 8, (t * 3) // 4), t + 1))
      row = rng.integers(3, vocab, length).astype(np.int32)
      row[row == cfg.image_token_index] = 3
      row[0] = 1
      text_start = 1
      if image_mask[r]:
        start = int(rng.integers(1, 4))
        row[start:start + n_img] = cfg.image_token_index
        text_start = start + n_img
      answer = int(rng.integers(2, max(3, (length - text_start) // 2 + 1)))
      ids[r, :length], mask[r, :length] = row, 1
      labels[r, length - answer:length] = row[length - answer:]
    pixels = rng.standard_normal((b, size, size, cfg.vision.num_channels)).astype(np.float32)
    pixels[~image_mask] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels,
            "image_mask": image_mask}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def make_iterator(data_cfg, model_cfg: LlavaConfig, host_batch_size: int, *, seed: int,
                  assets_dir: str | None = None):
  """The iterator `config.data` names, for this host (`host_batch_size` rows per step)."""
  import jax  # pylint: disable=import-outside-toplevel

  if data_cfg.kind == "synthetic":
    return SyntheticIterator(host_batch_size, data_cfg.seq_len, model_cfg, seed=seed,
                             num_distinct=data_cfg.num_distinct_batches, process_index=jax.process_index())
  if data_cfg.kind != "llava":
    raise ValueError(f"data.kind {data_cfg.kind!r} is not one of {KINDS}")
  import transformers  # pylint: disable=import-outside-toplevel

  import llava_jax.data as data_pkg  # pylint: disable=import-outside-toplevel

  tokenizer_dir = data_cfg.tokenizer or assets_dir
  if not tokenizer_dir:
    raise ValueError("data.kind='llava' needs a tokenizer: set --config.data.tokenizer=DIR, or start from a "
                     "checkpoint that carries one (--config.init_checkpoint)")
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  image_processor = _image_processor(data_cfg, model_cfg, assets_dir)
  json_path = data_cfg.json_path.split(",") if "," in data_cfg.json_path else data_cfg.json_path
  config = data_pkg.DataConfig(
      json_path=json_path, image_dir=data_cfg.image_dir, tfds_name=data_cfg.tfds_name,
      tfds_data_dir=data_cfg.tfds_data_dir or None, template=data_cfg.template, max_length=data_cfg.seq_len,
      batch_size=host_batch_size, num_image_tokens=model_cfg.num_image_tokens,
      image_token_index=model_cfg.image_token_index, aspect_ratio=data_cfg.aspect_ratio, seed=seed,
      shuffle=data_cfg.shuffle, group_by_modality_length=data_cfg.group_by_modality_length,
      packing=data_cfg.packing, num_workers=data_cfg.num_workers)
  return data_pkg.make_iterator(config, tokenizer, image_processor)


def _image_processor(data_cfg, model_cfg: LlavaConfig, assets_dir: str | None):
  """The checkpoint's preprocessor_config.json, else CLIP's defaults at the tower's resolution."""
  from llava_jax.data.image import ImageProcessorConfig  # pylint: disable=import-outside-toplevel

  for folder in (data_cfg.image_processor, assets_dir):
    path = os.path.join(folder, "preprocessor_config.json") if folder else ""
    if path and os.path.exists(path):
      with open(path) as f:
        return ImageProcessorConfig.from_dict(json.load(f))
  size = model_cfg.vision.image_size
  return ImageProcessorConfig(shortest_edge=size, crop_height=size, crop_width=size)
