"""(text, image) -> model inputs, the way transformers' LlavaProcessor does it, on LLaVA's own preprocessing.

One path for the CLI, notebooks and evaluation: the conversation template renders the prompt, each "<image>"
becomes `num_image_tokens` image-token ids, images go through CLIP preprocessing (LLaVA-1.5's pad-to-square by
default), and a batch is left-padded for generation.

LLaVA-NeXT (a model whose config has `image_grid_pinpoints`) instead follows `LlavaNextProcessor`: each image is
cut into anyres tiles (`llava_jax.data.layout.AnyresLayout`), its "<image>" becomes that image's own number of
tokens, and the batch carries `image_sizes` so that the model can place the tile features.

LLaVA-OneVision (a config with `vision_aspect_ratio`) follows `LlavaOnevisionProcessor` (`processor_onevision.py`):
an image alone in its prompt is tiled in full, each of several images in a prompt takes its base tile only, and
"<video>" tags take videos (frames) as `pixel_values_videos`.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.config import TOKENIZATIONS
from llava_jax.data.conversation import DEFAULT_IMAGE_TOKEN, SeparatorStyle, get_template
from llava_jax.data.image import ImageProcessorConfig, preprocess_image, read_processor_files, to_rgb
from llava_jax.data.layout import AnyresLayout, OneVisionLayout, layout_for
from llava_jax.data.text import encode_prompt
from llava_jax.padding import left_pad
from llava_jax.processor_onevision import as_list, call_onevision, media_tags, onevision_checks

SETTINGS_FILE = "llava_jax_processor.json"  # in a checkpoint's assets: {"template", "image_aspect_ratio"}


class PromptTooLongError(ValueError):
  """A prompt longer than the model's context; `length` and `limit` in tokens."""

  def __init__(self, message: str, length: int, limit: int):
    super().__init__(message)
    self.length, self.limit = length, limit


class Processor:

  def __init__(self, tokenizer, image_config: ImageProcessorConfig, *, num_image_tokens: int,
               image_token_index: int, template: str = "vicuna_v1", aspect_ratio: str = "pad",
               anyres: AnyresLayout | None = None, max_tiles: int | None = None, max_length: int | None = None,
               tokenization: str = "reference", chat_template: str | None = None,
               video_token_index: int | None = None, max_frames: int | None = None):
    """`anyres` switches to LLaVA-NeXT's tiling; `max_tiles` then fixes the tile slots per image (e.g.
    `anyres.max_tiles` for static shapes) instead of the batch's maximum. `max_length` (the model's context,
    `text.max_position_embeddings`): a longer prompt is a PromptTooLongError, not silent garbage.

    `tokenization` gives the ids the checkpoint saw: "hf" the whole prompt at once with "<image>" the tokenizer's
    special token (transformers' LlavaProcessor), "reference" chunk by chunk around it (the original LLaVA's
    `tokenizer_image_token`). They differ, e.g. by a "▁" after each image with a non-legacy LLaMA tokenizer.
    `chat_template`: the checkpoint's own (jinja), kept for callers; prompts use `template`.
    OneVision (`anyres` a `OneVisionLayout`): `video_token_index` is "<video>"'s id, `max_frames` fixes the frame
    slots per video (else the batch's longest)."""
    if tokenization not in TOKENIZATIONS:
      raise ValueError(f"tokenization {tokenization!r} is not one of {TOKENIZATIONS}")
    if tokenization == "hf":
      _check_image_token(tokenizer, image_token_index)
    self.tokenization, self.chat_template = tokenization, chat_template
    self.tokenizer, self.image_config, self.max_length = tokenizer, image_config, max_length
    self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index
    self.template, self.aspect_ratio = get_template(template), aspect_ratio
    self.anyres, self.max_tiles = anyres, max_tiles
    self.video_token_index, self.max_frames = video_token_index, max_frames
    if isinstance(anyres, OneVisionLayout):
      onevision_checks(self)
    elif anyres is not None and image_config.crop_height != anyres.tile:
      raise ValueError(f"the image processor's tiles ({image_config.crop_height} px crop) differ from the vision "
                       f"tower's image size {anyres.tile}")

  @classmethod
  def from_model(cls, model, template: str | None = None, aspect_ratio: str | None = None,
                 tokenization: str | None = None) -> "Processor":
    """Reads the tokenizer and image-processor files a loaded checkpoint carries (`model.assets_dir`), in any
    layout transformers writes. `tokenization` defaults to the checkpoint's (`config.tokenization`)."""
    from llava_jax.hub import load_tokenizer

    assets = model.assets_dir
    if not assets:
      raise FileNotFoundError("this model carries no tokenizer / processor files (assets/); convert it from a "
                              "directory that has them")
    files = read_processor_files(assets)
    settings = {}
    if os.path.exists(os.path.join(assets, SETTINGS_FILE)):
      with open(os.path.join(assets, SETTINGS_FILE)) as f:
        settings = json.load(f)
    cfg = model.config
    return cls(load_tokenizer(assets), files.image_config,
               num_image_tokens=cfg.num_image_tokens, image_token_index=cfg.image_token_index,
               max_length=cfg.text.max_position_embeddings,
               template=template or settings.get("template") or default_template(cfg),
               aspect_ratio=aspect_ratio or settings.get("image_aspect_ratio", "pad"),
               anyres=anyres_geometry(cfg, files.image_processor),
               tokenization=tokenization or cfg.tokenization, chat_template=files.chat_template,
               video_token_index=cfg.video_token_index)

  def prompt(self, turns: Sequence[str], image: bool | int = False, videos: int = 0) -> str:
    """The template's generation prompt for alternating user/assistant turns ending with the user's. `image`: True
    or a count of images; one image alone goes where the template puts it, several (OneVision) and `videos` as
    one "<image>" / "<video>" line each in front of the first user turn, in the order the inputs come."""
    images = int(image)
    if images <= 1 and not videos:
      return self.template.generation_prompt(list(turns), image=bool(images))
    turns = list(turns)
    if self.template.style == SeparatorStyle.PLAIN:  # its prompt is the tags alone
      return media_tags(images, videos).replace("\n", "")
    turns[0] = media_tags(images, videos) + turns[0]
    return self.template.generation_prompt(turns, image=False)

  def __call__(self, prompts: str | Sequence[str], images=None, max_tiles: int | None = None, videos=None,
               max_frames: int | None = None) -> dict:
    """Rendered prompts (with "<image>" tags) and images (PIL / arrays / paths, in tag order) -> left-padded
    {input_ids [B, T] int32, attention_mask [B, T] int32, pixel_values [N, H, W, 3] float32 or None}.

    With anyres (LLaVA-NeXT): pixel_values is [N, P, H, W, 3], each image's tiles (base first) then zero
    tiles up to P (`max_tiles`, else the processor's, else the batch's maximum), and `image_sizes` [N, 2]
    int32 (height, width) is added; each "<image>" becomes its image's `num_image_tokens`.

    OneVision: as anyres, an image in a prompt of several as its base tile only (one real tile), and `videos`
    (each a list of frames, PIL / arrays, an array [F, h, w, 3] or a folder of image files, in "<video>"-tag order)
    as `pixel_values_videos` [V, F, H, W, 3] float32 (zero frames after each video's own up to F, `max_frames` or
    the longest), each "<video>" as frames * 196 + 1 video tokens; `image_base_only` [N] bool says which."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(self.anyres, OneVisionLayout):
      return call_onevision(self, prompts, images, videos, max_tiles, max_frames)
    if videos is not None:
      raise ValueError("videos need a LLaVA-OneVision model (a config with vision_aspect_ratio)")
    if self.anyres is not None:
      return self._call_anyres(prompts, images, max_tiles)
    rows = [self._encode(p, self.num_image_tokens) for p in prompts]
    input_ids, attention_mask = self._left_pad(rows)
    images = as_list(images)
    n_tags = int((input_ids == self.image_token_index).sum()) // self.num_image_tokens
    if n_tags != len(images):
      raise ValueError(f"the prompts hold {n_tags} <image> tags but {len(images)} images were given")
    pixel_values = None
    if images:
      pixel_values = np.stack([preprocess_image(self._open(im), self.image_config, self.aspect_ratio)
                               for im in images])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

  def _encode(self, prompt: str, num_image_tokens: int) -> np.ndarray:
    """One prompt's ids (int32), each "<image>" as `num_image_tokens` image ids, in `self.tokenization`'s way."""
    if self.tokenization == "reference":
      return encode_prompt(prompt, self.tokenizer, num_image_tokens, self.image_token_index)
    ids = np.asarray(self.tokenizer(prompt)["input_ids"], np.int32)
    return np.repeat(ids, np.where(ids == self.image_token_index, num_image_tokens, 1)).astype(np.int32)

  def _left_pad(self, rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    t = max(len(r) for r in rows)
    if self.max_length is not None and t > self.max_length:
      raise PromptTooLongError(f"the prompt is {t} tokens (image tokens included), {t - self.max_length} more than "
                               f"the model's context of {self.max_length} (text.max_position_embeddings); shorten "
                               "it", length=t, limit=self.max_length)
    return left_pad(rows, self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

  def _call_anyres(self, prompts: Sequence[str], images, max_tiles: int | None) -> dict:
    images = [to_rgb(self._open(im)) for im in as_list(images)]
    # One image id per tag first, then each tag widened to its own image's token count, in tag order.
    rows = [self._encode(p, 1) for p in prompts]
    n_tags = sum(int((r == self.image_token_index).sum()) for r in rows)
    if n_tags != len(images):
      raise ValueError(f"the prompts hold {n_tags} <image> tags but {len(images)} images were given")
    sizes = np.asarray([(im.height, im.width) for im in images], np.int32).reshape(-1, 2)
    counts = iter([self.anyres.num_image_tokens(hw) for hw in sizes])
    rows = [np.repeat(r, [next(counts) if t == self.image_token_index else 1 for t in r]).astype(np.int32)
            for r in rows]
    input_ids, attention_mask = self._left_pad(rows)
    if not images:
      return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": None, "image_sizes": None}
    tiles = [self.anyres.tiles(im, self.image_config) for im in images]
    slots = max_tiles or self.max_tiles or max(len(t) for t in tiles)
    if slots < max(len(t) for t in tiles):
      raise ValueError(f"max_tiles={slots} is fewer than the {max(len(t) for t in tiles)} tiles an image needs")
    pixel_values = np.zeros((len(tiles), slots) + tiles[0].shape[1:], np.float32)
    for i, t in enumerate(tiles):
      pixel_values[i, :len(t)] = t
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": sizes}

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


def _check_image_token(tokenizer, image_token_index: int) -> None:
  """"hf" tokenization needs "<image>" to be one token, the model's image id (as LlavaProcessor reads it)."""
  ids = tokenizer.encode(DEFAULT_IMAGE_TOKEN, add_special_tokens=False)
  if ids != [image_token_index]:
    raise ValueError(f"tokenization 'hf' needs the tokenizer's {DEFAULT_IMAGE_TOKEN} token to be the image token "
                     f"{image_token_index}, but it encodes as {ids} (an original-layout checkpoint, whose image token "
                     "is outside the vocabulary?): use tokenization='reference'")


def default_template(cfg) -> str:
  """The prompt format a checkpoint answers in when its settings name none: a OneVision one converted from
  llava-hf (tokenization "hf") as its own chat template renders, an original lmms-lab one as it was trained
  (`qwen_1_5`); LLaVA-1.5's vicuna_v1 otherwise. Decided from the config, so checkpoints converted before this
  need no new settings."""
  if cfg.is_onevision:
    return "llava_onevision_hf" if cfg.tokenization == "hf" else "qwen_1_5"
  return "vicuna_v1"


def anyres_geometry(cfg, preprocessor: dict | None = None) -> AnyresLayout | None:
  """The model's anyres layout: its config's pinpoints, else the preprocessor config's; None when its image layout
  places no tile features (LLaVA-1.5)."""
  layout = layout_for(cfg, None if cfg.is_next else (preprocessor or {}).get("image_grid_pinpoints"))
  return layout if layout.places_features else None
