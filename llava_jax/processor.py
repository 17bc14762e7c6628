"""(text, image) -> model inputs, the way transformers' LlavaProcessor does it, on LLaVA's own preprocessing.

One path for the CLI, notebooks and evaluation: the conversation template renders the prompt, each "<image>"
becomes `num_image_tokens` image-token ids, images go through CLIP preprocessing (LLaVA-1.5's pad-to-square by
default), and a batch is left-padded for generation.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.conversation import get_template
from llava_jax.data.image import ImageProcessorConfig, preprocess_image
from llava_jax.data.text import encode_prompt

SETTINGS_FILE = "llava_jax_processor.json"  # in a checkpoint's assets: {"template", "image_aspect_ratio"}


class Processor:

  def __init__(self, tokenizer, image_config: ImageProcessorConfig, *, num_image_tokens: int,
               image_token_index: int, template: str = "vicuna_v1", aspect_ratio: str = "pad"):
    self.tokenizer, self.image_config = tokenizer, image_config
    self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index
    self.template, self.aspect_ratio = get_template(template), aspect_ratio

  @classmethod
  def from_model(cls, model, template: str | None = None, aspect_ratio: str | None = None) -> "Processor":
    """Reads the tokenizer and image-processor files a loaded checkpoint carries (`model.assets_dir`)."""
    from transformers import AutoTokenizer

    assets = getattr(model, "assets_dir", None)
    if not assets or not os.path.exists(os.path.join(assets, "preprocessor_config.json")):
      raise FileNotFoundError("this model carries no tokenizer / preprocessor_config.json (assets/); convert it "
                              "from a directory that has them")
    settings = {}
    if os.path.exists(os.path.join(assets, SETTINGS_FILE)):
      with open(os.path.join(assets, SETTINGS_FILE)) as f:
        settings = json.load(f)
    cfg = model.config
    return cls(AutoTokenizer.from_pretrained(assets), ImageProcessorConfig.from_pretrained(assets),
               num_image_tokens=cfg.num_image_tokens, image_token_index=cfg.image_token_index,
               template=template or settings.get("template", "vicuna_v1"),
               aspect_ratio=aspect_ratio or settings.get("image_aspect_ratio", "pad"))

  def prompt(self, turns: Sequence[str], image: bool) -> str:
    """The template's generation prompt for alternating user/assistant turns ending with the user's."""
    return self.template.generation_prompt(list(turns), image=image)

  def __call__(self, prompts: str | Sequence[str], images=None) -> dict:
    """Rendered prompts (with "<image>" tags) and images (PIL / arrays / paths, in tag order) -> left-padded
    {input_ids [B, T] int32, attention_mask [B, T] int32, pixel_values [N, H, W, 3] float32 or None}."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = [encode_prompt(p, self.tokenizer, self.num_image_tokens, self.image_token_index) for p in prompts]
    t = max(len(r) for r in rows)
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(rows), t), pad, np.int32)
    attention_mask = np.zeros((len(rows), t), np.int32)
    for i, row in enumerate(rows):
      input_ids[i, t - len(row):], attention_mask[i, t - len(row):] = row, 1
    images = [] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images)
    n_tags = int((input_ids == self.image_token_index).sum()) // self.num_image_tokens
    if n_tags != len(images):
      raise ValueError(f"the prompts hold {n_tags} <image> tags but {len(images)} images were given")
    pixel_values = None
    if images:
      pixel_values = np.stack([preprocess_image(self._open(im), self.image_config, self.aspect_ratio)
                               for im in images])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  @staticmethod
  def _open(image):
    if isinstance(image, (str, os.PathLike)):
      if not os.path.exists(image):
        raise FileNotFoundError(f"image {image} does not exist")
      with Image.open(image) as im:
        im.load()
        return im.copy()
    return image
