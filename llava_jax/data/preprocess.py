"""One record -> one example (token ids, labels, CLIP pixels), or a skipped-sample marker.

Text first (cheap, and most bad samples fail there), then the image: decoded from a
file under `image_dir` or from the bytes a TFDS record carries, and preprocessed as
`CLIPImageProcessor` does (`image.preprocess_image`). Every way a sample can fail
becomes a `text.DataError`; `Preprocess` turns it into a marker unless `strict`.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data import text as text_lib
from llava_jax.data.records import SKIP_KEY, skip_record
from llava_jax.data.text import DataError, SkipReason


def load_image(record: dict, image_dir: str, sample_id: Any) -> Image.Image:
  """The record's decoded image, from "image_bytes" (TFDS) or the file `image_dir`/"image"."""
  if "image_bytes" in record:  # TFDS records carry the encoded file
    data, where = record["image_bytes"], record.get("image", "<bytes>")
    if data is None:
      raise DataError(SkipReason.MISSING_IMAGE, f"{where}: not found when the dataset was built", sample_id)
    if not data:
      raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: zero bytes", sample_id)
    handle = io.BytesIO(data)
  else:
    where = os.path.join(image_dir, record["image"])
    if not os.path.isfile(where):
      raise DataError(SkipReason.MISSING_IMAGE, f"{where}: no such file", sample_id)
    if os.path.getsize(where) == 0:
      raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: zero bytes", sample_id)
    handle = where
  try:
    with Image.open(handle) as img:
      img.load()  # decodes now, so truncated files fail here
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(SkipReason.UNREADABLE_IMAGE, f"{where}: {e}", sample_id) from None
  if img.width == 0 or img.height == 0:
    raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: {img.width}x{img.height}", sample_id)
  return img


class Preprocess:
  """Record -> example {"input_ids", "labels", "pixel_values" (None: no image), "id"}, or a skip marker.

  Picklable (worker processes get a copy); the fields are `DataConfig`'s of the same name.
  """

  def __init__(self, tokenizer, image_config: image_lib.ImageProcessorConfig, *, template: str,
               max_length: int, num_image_tokens: int, image_token_index: int, aspect_ratio: str = "pad",
               image_dir: str = "", strict: bool = False):
    self._tokenizer = tokenizer
    self._image_config = image_config
    self.template, self.max_length, self.aspect_ratio = template, max_length, aspect_ratio
    self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index
    self.image_dir, self.strict = image_dir, strict
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
    image_name = record.get("image")
    has_image = "image" in record
    if has_image and not (isinstance(image_name, str) and image_name):
      raise DataError(SkipReason.MALFORMED_RECORD, f"'image' must be a file name, got {image_name!r}",
                      sample_id)
    with self._lock:  # HF fast tokenizers are not safe to share between threads
      input_ids, labels = text_lib.preprocess_conversation(
          record.get("conversations"), self._tokenizer, self.template, self.num_image_tokens,
          self.max_length, self.image_token_index, has_image=has_image, sample_id=sample_id)
    if not has_image and np.any(input_ids == self.image_token_index):
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "text-only sample tokenizes to the image token",
                      sample_id)
    if np.all(labels == text_lib.IGNORE_INDEX):
      raise DataError(SkipReason.NO_TARGETS, "every label is masked (reply truncated away?)", sample_id)
    pixels = None
    if has_image:
      img = load_image(record, self.image_dir, sample_id)
      try:
        pixels = image_lib.preprocess_image(img, self._image_config, self.aspect_ratio)
      except (OSError, ValueError) as e:  # e.g. a colour mode Pillow cannot convert to RGB
        raise DataError(SkipReason.UNREADABLE_IMAGE, f"{record['image']}: {e}", sample_id) from None
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "id": str(sample_id)}
