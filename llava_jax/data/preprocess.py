"""One record -> one example (token ids, labels, CLIP pixels), or a skipped-sample marker.

Text first (cheap, and most bad samples fail there), then the image: decoded from a
file under `image_dir` (the path must resolve inside it) or from the bytes a TFDS record
carries, once its header shows it fits the pixel budget, and preprocessed as
`CLIPImageProcessor` does (`image.preprocess_image`). Every way a sample can fail
becomes a `text.DataError`; `Preprocess` turns it into a marker unless `strict`.

LLaVA-NeXT (`anyres` set): the image becomes its anyres tiles (base tile first, only
the tiles it needs: the batch pads them to `max_tiles`), its "<image>" expands to that
image's own `num_image_tokens(size)`, and the example carries the image's size and
`feature_index` (`data.layout`: per image token, the row of this image's tile features,
or the newline), which the batch turns into `image_feature_rows`. The text is
checked and tokenized first; the token count needs the image, so expansion and
truncation wait for it.

LLaVA-OneVision (`anyres` a `OneVisionLayout`): the same, each image token taking up to
four feature rows mixed by weights (the bilinear shrink), so the example also carries
"feature_weights"; a record may list several images (`"image": [..]`, at most
`max_images`), each then taking its base tile only, as OneVision does. Its image fields
are lists, one entry per image in tag order.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data import onevision
from llava_jax.data import text as text_lib
from llava_jax.data.layout import AnyresLayout, OneVisionLayout
from llava_jax.data.records import SKIP_KEY, skip_record
from llava_jax.data.text import DataError, SkipReason


DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # decoded or padded pixels; the largest LLaVA training images are far below


def resolve_image_path(image_dir: str, name: str, sample_id: Any, *, allow_outside: bool = False) -> str:
  """`image_dir`/`name`, refused (as `image_outside_dir`) when it resolves outside `image_dir`.

  A corpus is data, not code: "../", absolute paths and symlinks leading out of the folder
  would let it read any file the trainer can. `realpath` follows every symlink on both sides,
  so a folder that is itself a symlink still works.
  """
  where = os.path.join(image_dir, name)
  if "\0" in name:
    raise DataError(SkipReason.MALFORMED_RECORD, f"image name {name!r} holds a NUL byte", sample_id)
  if allow_outside:
    return where
  root = os.path.realpath(image_dir or os.curdir)
  real = os.path.realpath(where)
  if os.path.isabs(name) or os.path.commonpath([root, real]) != root:
    raise DataError(SkipReason.IMAGE_OUTSIDE_DIR,
                    f"{name!r} resolves to {real}, outside image_dir {root}; set allow_images_outside_dir=True "
                    "if the corpus is meant to reach outside it", sample_id)
  return where


def check_pixel_budget(size: tuple[int, int], where: str, sample_id: Any, *, max_pixels: int | None,
                       padded_to_square: bool) -> None:
  """Refuses (as `image_too_large`) an image whose decoded or padded canvas exceeds `max_pixels`.

  Called with the size from the header, before any pixel is decoded: a small file can
  declare a huge canvas, and pad-to-square makes a long thin image cost max(w, h) ** 2.
  """
  if not max_pixels:
    return
  width, height = size
  if width * height > max_pixels:
    raise DataError(SkipReason.IMAGE_TOO_LARGE, f"{where}: {width}x{height} = {width * height} pixels, over "
                    f"max_image_pixels={max_pixels}", sample_id)
  side = max(width, height)
  if padded_to_square and side * side > max_pixels:
    raise DataError(SkipReason.IMAGE_TOO_LARGE, f"{where}: {width}x{height} padded to square is {side}x{side} = "
                    f"{side * side} pixels, over max_image_pixels={max_pixels}", sample_id)


def load_image(record: dict, image_dir: str, sample_id: Any, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               padded_to_square: bool = False, allow_outside_dir: bool = False) -> Image.Image:
  """The record's decoded image, from "image_bytes" (TFDS) or the file `image_dir`/"image".

  The path must stay inside `image_dir` (unless `allow_outside_dir`), and the size read from
  the header must fit `max_pixels` (as padded to square when `padded_to_square`) before decoding.
  """
  if "image_bytes" in record:  # TFDS records carry the encoded file
    data, where = record["image_bytes"], record.get("image", "<bytes>")
    if data is None:
      raise DataError(SkipReason.MISSING_IMAGE, f"{where}: not found when the dataset was built", sample_id)
    if not data:
      raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: zero bytes", sample_id)
    handle = io.BytesIO(data)
  else:
    where = resolve_image_path(image_dir, record["image"], sample_id, allow_outside=allow_outside_dir)
    if not os.path.isfile(where):
      raise DataError(SkipReason.MISSING_IMAGE, f"{where}: no such file", sample_id)
    if os.path.getsize(where) == 0:
      raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: zero bytes", sample_id)
    handle = where
  try:
    with Image.open(handle) as img:  # reads the header only
      check_pixel_budget(img.size, where, sample_id, max_pixels=max_pixels, padded_to_square=padded_to_square)
      img.load()  # decodes now, so truncated files fail here
  except DataError:  # the budget check (a ValueError too)
    raise
  except Image.DecompressionBombError as e:  # PIL's own limit (2 * Image.MAX_IMAGE_PIXELS), checked at open
    raise DataError(SkipReason.IMAGE_TOO_LARGE, f"{where}: refused by PIL's decompression-bomb check: {e}",
                    sample_id) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(SkipReason.UNREADABLE_IMAGE, f"{where}: {e}", sample_id) from None
  if img.width == 0 or img.height == 0:
    raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: {img.width}x{img.height}", sample_id)
  return img


class Preprocess:
  """Record -> example {"input_ids", "labels", "pixel_values" (None: no image), "id"}, or a skip marker.
  With `anyres` (LLaVA-NeXT) pixel_values is [n_tiles, H, W, 3] and an image example also has "image_size"
  (height, width) and "feature_index" (int32, one entry per image token).

  Picklable (worker processes get a copy); the fields are `DataConfig`'s of the same name.
  """

  def __init__(self, tokenizer, image_config: image_lib.ImageProcessorConfig, *, template: str,
               max_length: int, num_image_tokens: int, image_token_index: int, aspect_ratio: str = "pad",
               image_dir: str = "", strict: bool = False, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               allow_images_outside_dir: bool = False, anyres: AnyresLayout | OneVisionLayout | None = None,
               max_images: int = 1, max_frames: int = 0, video_token_index: int | None = None):
    self._tokenizer = tokenizer
    self._image_config = image_config
    self.template, self.max_length, self.aspect_ratio = template, max_length, aspect_ratio
    self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index
    self.image_dir, self.strict = image_dir, strict
    self.max_image_pixels, self.allow_images_outside_dir = max_image_pixels, allow_images_outside_dir
    self.anyres, self.max_images = anyres, max_images
    self.max_frames, self.video_token_index = max_frames, video_token_index
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_lock"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __call__(self, record: dict) -> dict:
    try:
      return self._process(record)
    except DataError as e:
      if self.strict:
        raise
      return skip_record(e.reason, e.sample_id, str(e))

  def _process(self, record: dict) -> dict:
    if SKIP_KEY in record:  # the source could not read it; raised here so `strict` sees it
      raise DataError(SkipReason(record[SKIP_KEY]), record["message"], record["id"])
    sample_id = record.get("id")
    if isinstance(self.anyres, OneVisionLayout):
      if "video" in record:
        return self._process_video(record, sample_id)
      return self._process_onevision(record, sample_id)
    image_name = record.get("image")
    has_image = "image" in record
    if has_image and not (isinstance(image_name, str) and image_name):
      raise DataError(SkipReason.MALFORMED_RECORD, f"'image' must be a file name, got {image_name!r}",
                      sample_id)
    with self._lock:  # HF fast tokenizers are not safe to share between threads
      ids, labels, _ = text_lib.conversation_tokens(record.get("conversations"), self._tokenizer, self.template,
                                                    has_image=has_image, sample_id=sample_id)
    if self.anyres is None:
      input_ids, labels = text_lib.expand_image_tokens(ids, labels, self.num_image_tokens, self.max_length,
                                                       self.image_token_index, sample_id=sample_id)
      self._check_tokens(input_ids, labels, has_image, sample_id)
      pixels = self._pixels(record, sample_id) if has_image else None
      return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "id": str(sample_id)}
    img = self._image(record, sample_id) if has_image else None
    size = (img.height, img.width) if has_image else None
    counts = [self.anyres.num_image_tokens(size)] if has_image else []
    input_ids, labels = text_lib.expand_image_tokens(ids, labels, counts, self.max_length, self.image_token_index,
                                                     sample_id=sample_id)
    self._check_tokens(input_ids, labels, has_image, sample_id)
    if has_image and int(np.sum(input_ids == self.image_token_index)) != counts[0]:
      # The text itself tokenized to the image id: the rows of the image's features would be misplaced.
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "the text tokenizes to the image token as well", sample_id)
    example = {"input_ids": input_ids, "labels": labels, "pixel_values": None, "id": str(sample_id)}
    if has_image:
      try:
        example["pixel_values"] = self.anyres.tiles(img, self._image_config)
      except (OSError, ValueError) as e:
        raise DataError(SkipReason.UNREADABLE_IMAGE, f"{record['image']}: {e}", sample_id) from None
      example.update(image_size=np.asarray(size, np.int32), feature_index=self.anyres.feature_index(size))
    return example

  def _process_onevision(self, record: dict, sample_id) -> dict:
    """OneVision: one image whole (base + grid, shrunk taps), or several base-only; the image fields as lists."""
    names = record.get("image") if "image" in record else []
    names = [names] if isinstance(names, str) else names
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names) and
            ("image" not in record or names)):
      raise DataError(SkipReason.MALFORMED_RECORD, f"'image' must be a file name or a list of them, got "
                      f"{record.get('image')!r}", sample_id)
    if len(names) > self.max_images:
      raise DataError(SkipReason.MALFORMED_RECORD, f"{len(names)} images, more than the {self.max_images} image "
                      "slots a row has (max_images_per_sample, or max_images_per_row when packing)", sample_id)
    with self._lock:  # HF fast tokenizers are not safe to share between threads
      ids, labels, _ = text_lib.conversation_tokens(record.get("conversations"), self._tokenizer, self.template,
                                                    has_image=bool(names), sample_id=sample_id)
    images = [self._image({**record, "image": name}, sample_id) for name in names]
    sizes = [(img.height, img.width) for img in images]
    base_only = len(images) > 1
    counts = [self.anyres.num_image_tokens(hw, base_only) for hw in sizes]
    input_ids, labels = text_lib.expand_image_tokens(ids, labels, counts, self.max_length, self.image_token_index,
                                                     sample_id=sample_id)
    self._check_tokens(input_ids, labels, bool(names), sample_id)
    if names and int(np.sum(input_ids == self.image_token_index)) != sum(counts):
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "the text tokenizes to the image token as well", sample_id)
    example = {"input_ids": input_ids, "labels": labels, "pixel_values": None, "id": str(sample_id)}
    if names:
      try:
        tiles = [self.anyres.tiles(img, self._image_config, base_only) for img in images]
      except (OSError, ValueError) as e:
        raise DataError(SkipReason.UNREADABLE_IMAGE, f"{names}: {e}", sample_id) from None
      taps = [self.anyres.image_taps(hw, base_only) for hw in sizes]
      example.update(pixel_values=tiles, image_size=np.asarray(sizes, np.int32),
                     feature_index=[rows for rows, _ in taps], feature_weights=[weights for _, weights in taps])
    return example

  def _process_video(self, record: dict, sample_id) -> dict:
    """OneVision, a record of one video (a folder of frame files, or a list of them): its frames sampled uniformly
    down to `max_frames`, its "<video>" expanded to the video's tokens (labels ignored), their taps beside."""
    video = record["video"]
    if self.max_frames < 1 or self.video_token_index is None:
      raise DataError(SkipReason.MALFORMED_RECORD, "a video record, but videos are off (data.max_frames 0, or no "
                      "video token)", sample_id)
    if "image" in record:
      raise DataError(SkipReason.MALFORMED_RECORD, "a record holds images or one video, not both", sample_id)
    if not ((isinstance(video, str) and video) or
            (isinstance(video, list) and video and all(isinstance(n, str) and n for n in video))):
      raise DataError(SkipReason.MALFORMED_RECORD, f"'video' must be a folder of frames or a list of frame files "
                      f"(one video a sample), got {video!r}", sample_id)
    conversations = text_lib.video_tag_as_image(record.get("conversations"), sample_id)
    with self._lock:  # HF fast tokenizers are not safe to share between threads
      ids, labels, _ = text_lib.conversation_tokens(conversations, self._tokenizer, self.template, has_image=True,
                                                    sample_id=sample_id)
    frames = self._frames(video, sample_id)
    count = self.anyres.num_video_tokens(len(frames))
    input_ids, labels = text_lib.expand_image_tokens(ids, labels, [count], self.max_length, self.image_token_index,
                                                     sample_id=sample_id)
    self._check_tokens(input_ids, labels, True, sample_id)
    if int(np.sum(input_ids == self.image_token_index)) != count or np.any(input_ids == self.video_token_index):
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "the text tokenizes to the image or video token as well",
                      sample_id)
    input_ids = np.where(input_ids == self.image_token_index, self.video_token_index, input_ids).astype(np.int32)
    try:
      pixels = onevision.video_frames(frames, self._image_config)
    except (OSError, ValueError) as e:
      raise DataError(SkipReason.UNREADABLE_IMAGE, f"{video}: {e}", sample_id) from None
    rows, weights = self.anyres.video_taps(len(frames))
    return {"input_ids": input_ids, "labels": labels, "pixel_values": None, "id": str(sample_id),
            "video": pixels, "video_index": rows, "video_weights": weights}

  def _frames(self, video, sample_id) -> list:
    """The decoded frames, in name order, `max_frames` of them taken at np.linspace's rounded indices if more."""
    if isinstance(video, str):
      folder = resolve_image_path(self.image_dir, video, sample_id, allow_outside=self.allow_images_outside_dir)
      if not os.path.isdir(folder):
        raise DataError(SkipReason.MISSING_IMAGE, f"{folder}: no such folder of frames", sample_id)
      names = [os.path.join(video, n) for n in sorted(os.listdir(folder))
               if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    else:
      names = list(video)
    if not names:
      raise DataError(SkipReason.EMPTY_IMAGE, f"{video}: no frames", sample_id)
    if len(names) > self.max_frames:  # uniform sampling, as the reference's frame sampler
      names = [names[i] for i in np.round(np.linspace(0, len(names) - 1, self.max_frames)).astype(int)]
    return [self._image({"image": name}, sample_id) for name in names]

  def _check_tokens(self, input_ids, labels, has_image: bool, sample_id) -> None:
    if not has_image and np.any(input_ids == self.image_token_index):
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "text-only sample tokenizes to the image token",
                      sample_id)
    if np.all(labels == text_lib.IGNORE_INDEX):
      raise DataError(SkipReason.NO_TARGETS, "every label is masked (reply truncated away?)", sample_id)

  def _image(self, record: dict, sample_id):
    """The decoded image, RGB; anyres fits it into a canvas (no pad to square), so only its own pixels count."""
    img = load_image(record, self.image_dir, sample_id, max_pixels=self.max_image_pixels,
                     padded_to_square=self.anyres is None and self.aspect_ratio == "pad",
                     allow_outside_dir=self.allow_images_outside_dir)
    try:
      return image_lib.to_rgb(img)
    except (OSError, ValueError) as e:  # e.g. a colour mode Pillow cannot convert to RGB
      raise DataError(SkipReason.UNREADABLE_IMAGE, f"{record['image']}: {e}", sample_id) from None

  def _pixels(self, record: dict, sample_id) -> np.ndarray:
    img = load_image(record, self.image_dir, sample_id, max_pixels=self.max_image_pixels,
                     padded_to_square=self.aspect_ratio == "pad",
                     allow_outside_dir=self.allow_images_outside_dir)
    try:
      return image_lib.preprocess_image(img, self._image_config, self.aspect_ratio)
    except (OSError, ValueError) as e:  # e.g. a colour mode Pillow cannot convert to RGB
      raise DataError(SkipReason.UNREADABLE_IMAGE, f"{record['image']}: {e}", sample_id) from None
