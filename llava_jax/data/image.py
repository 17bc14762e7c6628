"""CLIP and SigLIP image preprocessing, equal to transformers' `CLIPImageProcessor` and
`SiglipImageProcessor` (PIL backend).

The steps and their numerics follow `CLIPImageProcessorPil` exactly, so that a
checkpoint sees the pixels it was trained on (SigLIP's are the same steps with
other defaults: resize to `size` {height, width} directly, no centre crop, mean
and std 0.5):

  1. RGB, as LLaVA's `Image.open(path).convert("RGB")` (alpha dropped, not composited);
  2. "pad" only: LLaVA-1.5's `expand2square`, pasting the image centred on a square
     of the mean colour `tuple(int(x * 255) for x in image_mean)`;
  3. resize so the shortest edge is `size` (long edge `int(size * long / short)`),
     PIL bicubic on uint8;
  4. centre crop to `crop_size` (top = (h - ch) // 2, zero-padded if too small);
  5. rescale: float64 * rescale_factor, then float32;
  6. normalise: (x - mean) / std in float32.

Output is float32 [H, W, 3] (NHWC once batched), the layout our vision tower takes.

Like the reference, EXIF orientation is not applied. One deliberate difference from
`convert("RGB")`: 16-bit and 32-bit greyscale images (modes I;16*, I, F) are scaled
to 8 bits; Pillow would clip them, which turns most 16-bit photographs white.
LLaVA-NeXT's "anyres" tiling is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from llava_jax.hub import require_local_folder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)  # SigLIP's
# transformers' class defaults where a SigLIP config omits a key (CLIP's are the dataclass's own).
_SIGLIP_DEFAULTS = dict(image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, do_center_crop=False)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The fields of a HF `preprocessor_config.json` that CLIP (or SigLIP) preprocessing uses.

  `shortest_edge` resizes keeping the aspect ratio; if it is None, `height` and
  `width` give the exact resize size (a `{"height", "width"}` size in HF terms).
  """
  shortest_edge: int | None = 224
  height: int | None = None
  width: int | None = None
  crop_height: int = 224
  crop_width: int = 224
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255
  resample: int = Image.Resampling.BICUBIC
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  do_normalize: bool = True

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
    """Reads a `preprocessor_config.json` dict (old and new `size` spellings); a `Siglip*` image processor type
    takes SigLIP's defaults for the keys it omits."""
    siglip = str(d.get("image_processor_type", "")).startswith("Siglip")
    kw: dict[str, Any] = dict(_SIGLIP_DEFAULTS) if siglip else {}
    size = d.get("size", {"height": 224, "width": 224} if siglip else 224)
    if isinstance(size, int):
      kw["shortest_edge"] = size
    elif "shortest_edge" in size:
      kw["shortest_edge"] = int(size["shortest_edge"])
    else:
      kw.update(shortest_edge=None, height=int(size["height"]), width=int(size["width"]))
    crop = d.get("crop_size")  # None too for OneVision's processor, which has no crop
    crop = kw.get("shortest_edge") or 224 if crop is None else crop
    if isinstance(crop, int):
      kw.update(crop_height=crop, crop_width=crop)
    else:
      kw.update(crop_height=int(crop["height"]), crop_width=int(crop["width"]))
    for key in ("image_mean", "image_std"):
      if key in d:
        kw[key] = tuple(float(x) for x in d[key])
    for key in ("rescale_factor",):
      if key in d:
        kw[key] = float(d[key])
    if "resample" in d:
      kw["resample"] = int(d["resample"])
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
      if key in d:
        kw[key] = bool(d[key])
    return cls(**kw)

  @classmethod
  def from_pretrained(cls, folder: str) -> ImageProcessorConfig:
    """The image processor of a local folder in any layout transformers writes (`read_processor_files`)."""
    return read_processor_files(folder).image_config

  @property
  def output_size(self) -> tuple[int, int]:
    """(height, width) of the processed image."""
    if self.do_center_crop:
      return self.crop_height, self.crop_width
    if self.shortest_edge is None:
      return self.height, self.width
    raise ValueError("the output size depends on the image without a centre crop")


# Where transformers keeps an image processor: 5.x nests it in processor_config.json (and transformers reads that
# first), older versions and lone image processors write preprocessor_config.json.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class ProcessorFiles:
  """What a folder's processor files say: the image processor's dict (NeXT's `image_grid_pinpoints` included),
  its `ImageProcessorConfig`, the processor's own keys, the chat template, and the file the dict came from."""
  image_processor: Mapping[str, Any]
  image_config: ImageProcessorConfig
  processor: Mapping[str, Any]
  chat_template: str | None
  source: str


def has_processor_files(folder: str | None) -> bool:
  """Whether `folder` holds an image processor in a layout `read_processor_files` reads."""
  return bool(folder) and _image_processor_file(folder) is not None


def read_processor_files(folder: str) -> ProcessorFiles:
  """The one reader of a checkpoint's processor files, for inference and training alike: never CLIP's defaults
  in place of a file. A local folder only (never the Hub); without an image processor a FileNotFoundError
  names the files looked for."""
  require_local_folder(folder, "image processor folder")
  found = _image_processor_file(folder)
  if found is None:
    raise FileNotFoundError(f"{folder!r} has no image processor: looked for processor_config.json with an "
                            "'image_processor' entry (transformers 5) and preprocessor_config.json")
  path, image_processor, processor = found
  return ProcessorFiles(image_processor=image_processor, image_config=ImageProcessorConfig.from_dict(image_processor),
                        processor=processor, chat_template=_chat_template(folder, processor), source=path)


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return data


def _image_processor_file(folder: str) -> tuple[str, dict, dict] | None:
  """(path, image processor dict, processor dict) in transformers' order of preference, or None."""
  path = os.path.join(folder, PROCESSOR_FILES[0])
  processor = _read_json(path) or {}
  if isinstance(processor.get("image_processor"), dict):
    return path, processor["image_processor"], {k: v for k, v in processor.items() if k != "image_processor"}
  path = os.path.join(folder, PROCESSOR_FILES[1])
  image_processor = _read_json(path)
  return None if image_processor is None else (path, image_processor, processor)


def _chat_template(folder: str, processor: Mapping[str, Any]) -> str | None:
  path = os.path.join(folder, CHAT_TEMPLATE_FILES[0])
  if os.path.isfile(path):
    with open(path) as f:
      return f.read()
  data = _read_json(os.path.join(folder, CHAT_TEMPLATE_FILES[1])) or {}
  return data.get("chat_template") or processor.get("chat_template")


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) or uint8 array to an RGB image."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"arrays must be uint8 HWC or HW, got {image.dtype}")
    image = Image.fromarray(image if image.ndim == 2 or image.shape[-1] != 1 else image[..., 0])
  if image.mode.startswith("I;16") or image.mode in ("I", "F"):
    a = np.asarray(image).astype(np.float64)
    if image.mode == "F" and a.size and a.max() <= 1.0:
      a = a * 255.0
    elif image.mode != "F":
      a = a / 257.0  # 0..65535 -> 0..255
    image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
  return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: Sequence[int]) -> Image.Image:
  """LLaVA-1.5's `expand2square`: centre the image on a square of colour `fill`."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  result = Image.new(image.mode, (side, side), tuple(fill))
  result.paste(image, ((side - width) // 2, (side - height) // 2))
  return result


def pad_colour(config: ImageProcessorConfig) -> tuple[int, ...]:
  """The reference's background for "pad": the mean, truncated (not rounded) to uint8."""
  return tuple(int(x * 255) for x in config.image_mean)


def resize_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
  if config.shortest_edge is None:
    return config.height, config.width
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(config.shortest_edge * long / short)
  return (new_long, config.shortest_edge) if width <= height else (config.shortest_edge, new_long)


def _center_crop(a: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
  h, w = a.shape[:2]
  top, left = (h - crop_h) // 2, (w - crop_w) // 2
  if top >= 0 and left >= 0:
    return a[top:top + crop_h, left:left + crop_w]
  # Too small: HF pads with zeros around the image, then crops.
  new_h, new_w = max(crop_h, h), max(crop_w, w)
  padded = np.zeros((new_h, new_w) + a.shape[2:], a.dtype)
  top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
  padded[top_pad:top_pad + h, left_pad:left_pad + w] = a
  top, left = top + top_pad, left + left_pad
  return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def preprocess_image(image: Image.Image | np.ndarray,
                     processor_config: ImageProcessorConfig | Mapping[str, Any],
                     aspect_ratio: str = "pad") -> np.ndarray:
  """One image to float32 [H, W, 3], as LLaVA + `CLIPImageProcessor` produce it.

  Args:
    image: a PIL image in any mode, or a uint8 HWC / HW array.
    processor_config: an `ImageProcessorConfig` or a `preprocessor_config.json` dict.
    aspect_ratio: "pad" (LLaVA-1.5: pad to square with the mean colour, then the
      processor) or "crop" (the processor alone: resize and centre crop; "square"
      is the reference's name for it).
  """
  config = (processor_config if isinstance(processor_config, ImageProcessorConfig) else
            ImageProcessorConfig.from_dict(processor_config))
  image = to_rgb(image)
  if aspect_ratio == "pad":
    image = expand_to_square(image, pad_colour(config))
  elif aspect_ratio not in ("crop", "square"):
    raise ValueError(f"aspect_ratio must be 'pad' or 'crop', got {aspect_ratio!r}")
  if config.do_resize:
    height, width = resize_size(image.height, image.width, config)
    image = image.resize((width, height), resample=Image.Resampling(config.resample))
  a = np.asarray(image)
  if config.do_center_crop:
    a = _center_crop(a, config.crop_height, config.crop_width)
  # Rescale and normalise map each uint8 value of each channel to one float32, so a
  # 256-entry table per channel gives the same bits as the arithmetic, faster.
  return _value_table(config)[np.arange(3), a]


@functools.lru_cache(maxsize=16)
def _value_table(config: ImageProcessorConfig) -> np.ndarray:
  """[3, 256] float32: what rescale + normalise make of each uint8 value, per channel."""
  v = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :], (3, 256))
  if config.do_rescale:
    v = (v.astype(np.float64) * config.rescale_factor).astype(np.float32)
  v = v.astype(np.float32)
  if config.do_normalize:
    mean = np.asarray(config.image_mean, np.float32)[:, None]
    std = np.asarray(config.image_std, np.float32)[:, None]
    v = (v - mean) / std
  table = np.ascontiguousarray(v, dtype=np.float32)
  table.flags.writeable = False
  return table
