"""The processor's LLaVA-OneVision path: prompts with "<image>" / "<video>" tags, images and videos -> model inputs,
as transformers' `LlavaOnevisionProcessor` counts and preprocesses them, on our flat inputs.

transformers is told which images share a prompt by nesting them per prompt; here images come flat, in tag order,
and a prompt's tags say it: one "<image>" in a prompt is tiled in full, each of several takes its base tile only.
The model reads the same decision back from the token counts (`OneVisionBatch.assign_images`); the batch is
checked against that reading here, so a batch the model would misread is refused before it gets there.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from llava_jax.data import onevision
from llava_jax.data.anyres import base_size
from llava_jax.data.image import to_rgb

IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def onevision_checks(proc) -> None:
  """The tiles the image config makes are the tower's; "<video>" is one token, the model's video id."""
  tile = base_size(proc.image_config)[0]
  if tile != proc.anyres.tile:
    raise ValueError(f"the image processor's tiles ({tile} px) differ from the vision tower's image size "
                     f"{proc.anyres.tile}")
  if proc.tokenization == "hf" and proc.video_token_index is not None:
    ids = proc.tokenizer.encode("<video>", add_special_tokens=False)
    if ids != [proc.video_token_index]:
      raise ValueError(f"the tokenizer's <video> encodes as {ids}, not as the video token {proc.video_token_index}")


def media_tags(images: int, videos: int = 0) -> str:
  """The tags of several inputs, one a line, images first (as llava-hf's chat template orders a message's)."""
  return "<image>\n" * images + "<video>\n" * videos


def as_list(items) -> list:
  return [] if items is None else [items] if not isinstance(items, (list, tuple)) else list(items)


def _as_videos(videos) -> list:
  """A list of videos; one video alone (a folder, or an array [F, h, w, 3]) is wrapped."""
  if videos is None:
    return []
  if isinstance(videos, (str, os.PathLike)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
    return [videos]
  return list(videos)


def read_frames(video) -> list:
  """A video's frames: a folder of image files (sorted by name), an array [F, h, w, 3], or a list of frames."""
  if isinstance(video, (str, os.PathLike)):
    if not os.path.isdir(video):
      raise FileNotFoundError(f"video folder {video} does not exist")
    names = sorted(n for n in os.listdir(video) if n.lower().endswith(IMAGE_FILES))
    frames = []
    for name in names:
      with Image.open(os.path.join(video, name)) as im:
        frames.append(to_rgb(im.copy()))
  else:
    frames = [f if isinstance(f, Image.Image) else to_rgb(np.asarray(f, np.uint8)) for f in video]
  if not frames:
    raise ValueError(f"a video has no frames: {video!r}"[:200])
  return frames


def _expand(row: np.ndarray, counts: dict) -> np.ndarray:
  """Each tag id in `counts` (id -> iterator of token counts, in tag order) repeated to its count."""
  return np.repeat(row, [next(counts[t]) if t in counts else 1 for t in row]).astype(np.int32)


def call_onevision(proc, prompts, images, videos, max_tiles, max_frames) -> dict:
  """`Processor.__call__` for a OneVision model (see its docstring)."""
  layout, image_id, video_id = proc.anyres, proc.image_token_index, proc.video_token_index
  if proc.tokenization != "hf":
    raise ValueError("LLaVA-OneVision prompts are tokenized whole, with <image> / <video> special tokens: "
                     "use tokenization='hf'")
  images = [to_rgb(proc._open(im)) for im in as_list(images)]  # pylint: disable=protected-access
  videos = [read_frames(v) for v in _as_videos(videos)]
  rows = [proc._encode(p, 1) for p in prompts]  # pylint: disable=protected-access
  per_row = [int((r == image_id).sum()) for r in rows]
  n_videos = sum(int((r == video_id).sum()) for r in rows) if video_id is not None else 0
  if sum(per_row) != len(images) or n_videos != len(videos):
    raise ValueError(f"the prompts hold {sum(per_row)} <image> and {n_videos} <video> tags but {len(images)} "
                     f"images and {len(videos)} videos were given")
  base_only = [k >= 2 for k in per_row for _ in range(k)]
  sizes = np.asarray([(im.height, im.width) for im in images], np.int32).reshape(-1, 2)
  counts = {image_id: iter([layout.num_image_tokens(hw, only) for hw, only in zip(sizes, base_only)])}
  if video_id is not None:
    counts[video_id] = iter([layout.num_video_tokens(len(v)) for v in videos])
  input_ids, attention_mask = proc._left_pad([_expand(r, counts) for r in rows])  # pylint: disable=protected-access
  out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": None, "image_sizes": None,
         "pixel_values_videos": None, "image_base_only": np.asarray(base_only, bool)}
  if images:
    inferred = layout.assign_images(input_ids, image_id, sizes)
    if list(inferred) != base_only:
      raise ValueError("the model would read these prompts' images differently from their tags (a single image's "
                       "token count equal to several base-only images'); split the batch")
    tiles = [layout.tiles(im, proc.image_config, base_only=only) for im, only in zip(images, base_only)]
    out["pixel_values"], out["image_sizes"] = _padded(tiles, max_tiles or proc.max_tiles, "max_tiles"), sizes
  if videos:
    frames = [onevision.video_frames(v, proc.image_config) for v in videos]
    out["pixel_values_videos"] = _padded(frames, max_frames or proc.max_frames, "max_frames")
  return out


def _padded(stacks, slots, name) -> np.ndarray:
  """float32 [len(stacks), slots, ...]: each stack [n, ...] then zeros; `slots` None: the longest."""
  longest = max(len(s) for s in stacks)
  slots = slots or longest
  if slots < longest:
    raise ValueError(f"{name}={slots} is fewer than the {longest} an input needs")
  out = np.zeros((len(stacks), slots) + stacks[0].shape[1:], np.float32)
  for i, s in enumerate(stacks):
    out[i, :len(s)] = s
  return out
