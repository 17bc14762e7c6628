"""Batches for training: the LLaVA grain pipeline (`llava_jax.data`), or synthetic batches for tests and
benchmarks. Both give this host's rows of the global batch and have `get_state()` / `set_state()` (a JSON dict).
"""

from __future__ import annotations

import os

import numpy as np

from llava_jax.config import IGNORE_INDEX, LlavaConfig
from llava_jax.data.layout import ImageLayout, layout_for

KINDS = ("synthetic", "llava")


class SyntheticIterator:
  """Random token rows with one image each (every fourth row text-only), deterministic in (seed, step).

  Each host draws the whole global batch and keeps its rows (`process_index` of `process_count`), so the global
  batch, and the training run, does not depend on the number of hosts.

  A row is: BOS, a prompt, the image's tokens, more prompt, then an answer that alone is supervised; right
  padding. `num_distinct` > 0 cycles through that many batches (a small fixed set to overfit).
  """

  def __init__(self, batch_size: int, seq_len: int, model_cfg: LlavaConfig, seed: int = 0,
               num_distinct: int = 0, process_index: int = 0, process_count: int = 1):
    self.batch_size, self.seq_len, self.model_cfg = batch_size, seq_len, model_cfg
    self.seed, self.num_distinct, self.process_index = seed, num_distinct, process_index
    self.process_count = process_count
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
    rng = np.random.default_rng([self.seed, which, 0])
    b, t, n_img = self.batch_size * self.process_count, self.seq_len, cfg.num_image_tokens
    vocab = cfg.text.vocab_size
    size = cfg.vision.image_size
    ids = np.zeros((b, t), np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, t), np.int32)
    image_mask = np.array([r % 4 != 3 for r in range(b)])
    layout = layout_for(cfg)
    rows = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
    if layout.places_features:  # LLaVA-NeXT: an image size per row, its own token count, tiles and feature rows
      tiles = layout.max_tiles
      pixels = np.zeros((b, tiles, size, size, cfg.vision.num_channels), np.float32)
      taps = () if layout.taps == 1 else (layout.taps,)  # OneVision: rows mixed by weights
      feature_rows = np.zeros((self.batch_size, t) + taps, np.int32)  # this host's rows, numbered from its first
      feature_weights = np.zeros((self.batch_size, t) + taps, np.float32)
      image_sizes = np.zeros((b, 2), np.int32)
    for r in range(b):
      if layout.places_features and image_mask[r]:
        image_sizes[r] = self._image_size(rng, layout, t - 8)
        n_img = layout.num_image_tokens(image_sizes[r])
        pixels[r, :layout.num_tiles(image_sizes[r])] = rng.standard_normal(
            (layout.num_tiles(image_sizes[r]), size, size, cfg.vision.num_channels))
      length = int(rng.integers(max(n_img + 8, (t * 3) // 4), t + 1))
      row = rng.integers(3, vocab, length).astype(np.int32)
      row[row == cfg.image_token_index] = 3
      row[0] = 1
      text_start = 1
      if image_mask[r]:
        start = int(rng.integers(1, 4))
        row[start:start + n_img] = cfg.image_token_index
        text_start = start + n_img
        if layout.places_features and rows.start <= r < rows.stop:  # this host's image slot r - rows.start
          feature_rows[r - rows.start, start:start + n_img] = layout.slot_rows(
              layout.feature_index(image_sizes[r]), r - rows.start, self.batch_size)
          if taps:
            feature_weights[r - rows.start, start:start + n_img] = layout.feature_weights(image_sizes[r])
      answer = int(rng.integers(2, max(3, (length - text_start) // 2 + 1)))
      ids[r, :length], mask[r, :length] = row, 1
      labels[r, length - answer:length] = row[length - answer:]
    if layout.places_features:
      out = {"input_ids": ids[rows], "labels": labels[rows], "attention_mask": mask[rows],
             "pixel_values": pixels[rows], "image_mask": image_mask[rows], "image_feature_rows": feature_rows,
             "image_sizes": image_sizes[rows]}
      return dict(out, image_feature_weights=feature_weights) if taps else out
    pixels = rng.standard_normal((b, size, size, cfg.vision.num_channels)).astype(np.float32)
    pixels[~image_mask] = 0
    return {"input_ids": ids[rows], "labels": labels[rows], "attention_mask": mask[rows],
            "pixel_values": pixels[rows], "image_mask": image_mask[rows]}

  @staticmethod
  def _image_size(rng, layout: ImageLayout, max_tokens: int) -> tuple[int, int]:
    """A random (height, width) from half a tile to the largest pinpoint, whose tokens fit `max_tokens`."""
    top = max(max(p) for p in layout.pinpoints)
    for _ in range(100):
      hw = tuple(int(x) for x in rng.integers(layout.tile // 2, top + 1, 2))
      if layout.num_image_tokens(hw) <= max_tokens:
        return hw
    raise ValueError(f"data.seq_len leaves {max_tokens} tokens for an image: too few for this model's anyres tiles "
                     f"(up to {layout.max_num_image_tokens}); raise --config.data.seq_len")

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
                             num_distinct=data_cfg.num_distinct_batches, process_index=jax.process_index(),
                             process_count=jax.process_count())
  if data_cfg.kind != "llava":
    raise ValueError(f"data.kind {data_cfg.kind!r} is not one of {KINDS}")
  import llava_jax.data as data_pkg  # pylint: disable=import-outside-toplevel
  from llava_jax.hub import load_tokenizer  # pylint: disable=import-outside-toplevel

  tokenizer_dir = data_cfg.tokenizer or assets_dir
  if not tokenizer_dir:
    raise ValueError("data.kind='llava' needs a tokenizer: set --config.data.tokenizer=DIR, or start from a "
                     "checkpoint that carries one (--config.init_checkpoint)")
  tokenizer = load_tokenizer(tokenizer_dir)  # a local folder only: a typo must not become a Hub request
  image_processor = _image_processor(data_cfg, model_cfg, assets_dir)
  layout = layout_for(model_cfg)  # NeXT's tiles or OneVision's (its taps), else one tile
  json_path = data_cfg.json_path.split(",") if "," in data_cfg.json_path else data_cfg.json_path
  config = data_pkg.DataConfig(
      json_path=json_path, image_dir=data_cfg.image_dir, tfds_name=data_cfg.tfds_name,
      tfds_data_dir=data_cfg.tfds_data_dir or None, template=data_cfg.template, max_length=data_cfg.seq_len,
      batch_size=host_batch_size, num_image_tokens=model_cfg.num_image_tokens,
      image_token_index=model_cfg.image_token_index, aspect_ratio=data_cfg.aspect_ratio, seed=seed,
      shuffle=data_cfg.shuffle, group_by_modality_length=data_cfg.group_by_modality_length,
      packing=data_cfg.packing, num_workers=data_cfg.num_workers, anyres=layout if layout.places_features else None,
      max_consecutive_skips=data_cfg.max_consecutive_skips, max_skip_fraction=data_cfg.max_skip_fraction,
      min_samples_for_fraction=data_cfg.min_samples_for_fraction, max_image_pixels=data_cfg.max_image_pixels,
      allow_images_outside_dir=data_cfg.allow_images_outside_dir,
      max_images_per_sample=data_cfg.get("max_images_per_sample", 1),
      # OneVision's video records (a static F frame slots a row); other families read none.
      max_frames=(data_cfg.get("max_frames", 0) if model_cfg.is_onevision and model_cfg.video_token_index is not None
                  else 0),
      video_token_index=model_cfg.video_token_index)
  return data_pkg.make_iterator(config, tokenizer, image_processor)


def _image_processor(data_cfg, model_cfg: LlavaConfig, assets_dir: str | None):
  """`data.image_processor`'s files, else the checkpoint's (never CLIP's defaults in their place). CLIP's defaults
  at the tower's resolution only for a model without files: no checkpoint, or one saved with no assets."""
  from llava_jax.data.image import ImageProcessorConfig, has_processor_files  # pylint: disable=import-outside-toplevel

  if data_cfg.image_processor:
    return ImageProcessorConfig.from_pretrained(data_cfg.image_processor)
  if has_processor_files(assets_dir):
    return ImageProcessorConfig.from_pretrained(assets_dir)
  if assets_dir and os.listdir(assets_dir):
    raise FileNotFoundError(f"the checkpoint's assets {assets_dir} have no image processor (processor_config.json "
                            "or preprocessor_config.json); set --config.data.image_processor=DIR")
  size = model_cfg.vision.image_size
  return ImageProcessorConfig(shortest_edge=size, crop_height=size, crop_width=size)
