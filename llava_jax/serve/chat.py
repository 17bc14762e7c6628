"""OpenAI-style chat messages -> the checkpoint's prompt and images -> an engine `Request`.

The checkpoint's conversation template renders the turns (`Processor.prompt`), as the reference's demo does:
the system message, if any, replaces the template's system prompt, and the image goes in front of the first user
turn (LLaVA-1.5 was trained with one image per conversation there). LLaVA-OneVision takes several images, as
OpenAI's API carries them (`image_url` parts in one or several user messages): each user turn gets one "<image>"
per image it holds, in order. Every problem with the input is a
`BadRequest` whose message the API returns with a 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.parse
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_jax.data.image import resize_size
from llava_jax.data.layout import OneVisionLayout
from llava_jax.data.preprocess import check_pixel_budget
from llava_jax.data.text import DataError
from llava_jax.processor_onevision import media_tags
from llava_jax.serve.engine import BadRequest, Request

MAX_IMAGE_PIXELS = 40_000_000  # per canvas: the decoded image, its padded square, "crop"'s resized image


def load_image(url: str, allow_local_images: str | None = None, processor=None) -> Image.Image:
  """A `data:image/...;base64,` URI, or (only with `allow_local_images`) a file path / file:// URL inside that
  directory (a relative path is taken from it). Remote http(s) URLs are not fetched: a server should not reach
  out on a client's say-so. `processor` says how the image will be preprocessed, so that the pixel budget counts
  the largest canvas that preprocessing makes of it (without one: the padded square)."""
  if not isinstance(url, str) or not url:
    raise BadRequest("image_url.url must be a non-empty string")
  if url.startswith("data:"):
    header, _, payload = url.partition(",")
    if ";base64" not in header:
      raise BadRequest("an image data URI must be base64-encoded (data:image/png;base64,...)")
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
      raise BadRequest("the image data URI holds invalid base64") from None
    return _open(io.BytesIO(data), "the image data URI", processor)
  if url.startswith(("http://", "https://")):
    raise BadRequest("remote image URLs are not fetched: send the image as a base64 data URI")
  if allow_local_images is None:
    raise BadRequest("local image paths are disabled on this server (start it with --allow-local-images DIR); "
                     "send the image as a base64 data URI")
  root = os.path.realpath(allow_local_images)
  path = os.path.realpath(os.path.join(root, _local_path(url)))  # an absolute path stays itself
  if os.path.commonpath([path, root]) != root:
    raise BadRequest(f"image path {url!r} is outside the allowed directory")
  if not os.path.isfile(path):
    raise BadRequest(f"image file {url!r} does not exist")
  return _open(path, f"image file {url!r}", processor)  # PIL reads the header first: the budget before the pixels


def _local_path(url: str) -> str:
  """A path, or a file:// URL (file:///p or file://localhost/p, percent-escapes decoded) -> the path."""
  if not url.startswith("file:"):
    if "\0" in url:
      raise BadRequest("an image path must not hold a NUL byte")
    return url
  parts = urllib.parse.urlsplit(url)
  if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
    raise BadRequest(f"{url!r} is not a local file URL (file:///path or file://localhost/path)")
  path = urllib.parse.unquote(parts.path)
  if "\0" in path:
    raise BadRequest("an image path must not hold a NUL byte")
  return path


def check_image_size(size: tuple[int, int], what: str, processor=None) -> None:
  """BadRequest (naming the size and the limit) when preprocessing an image of `size` (width, height) would
  hold a canvas over MAX_IMAGE_PIXELS, judged from the header before any pixel is decoded: LLaVA-1.5's "pad"
  makes a square of the long side, "crop" resizes the short side to the tile (the long one grows with it);
  NeXT's canvases are bounded by its pinpoints, so only the decoded image counts there."""
  anyres = processor is not None and processor.anyres is not None
  pad = not anyres and (processor is None or processor.aspect_ratio == "pad")
  canvases = [size]
  if processor is not None and not anyres and not pad and processor.image_config.do_resize and min(size) > 0:
    height, width = resize_size(size[1], size[0], processor.image_config)
    canvases.append((width, height))
  try:
    for i, canvas in enumerate(canvases):
      check_pixel_budget(canvas, what if i == 0 else f"{what} resized for the model", None,
                         max_pixels=MAX_IMAGE_PIXELS, padded_to_square=pad)
  except DataError as e:
    raise BadRequest(f"{e.message} (this server's limit per image)") from None


def _open(stream, what: str, processor=None) -> Image.Image:
  try:
    with Image.open(stream) as im:
      check_image_size(im.size, what, processor)  # from the header, before decoding
      im.load()
      return im.convert("RGB")
  except BadRequest:
    raise
  except Image.DecompressionBombError as e:
    raise BadRequest(f"{what} is too large to decode: {e}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise BadRequest(f"{what} is not an image that can be decoded ({type(e).__name__})") from None


def _parts(content: Any, role: str) -> list[dict]:
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  if not isinstance(content, list):
    raise BadRequest(f"a {role} message's content must be a string or a list of parts")
  for part in content:
    if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
      raise BadRequest("content parts must be {\"type\": \"text\", ...} or {\"type\": \"image_url\", ...}")
    if part["type"] == "text" and not isinstance(part.get("text"), str):
      raise BadRequest("a text part needs a string \"text\"")
    if part["type"] == "image_url":
      if role != "user":
        raise BadRequest("only user messages may hold images")
      image_url = part.get("image_url")
      url = image_url.get("url") if isinstance(image_url, dict) else image_url
      if not isinstance(url, str):
        raise BadRequest("an image_url part needs {\"image_url\": {\"url\": \"data:image/...;base64,...\"}}")
  return content


@dataclasses.dataclass
class Conversation:
  """What the template needs: alternating user/assistant texts ending with the user's, the system prompt (or None
  for the template's own), the images in order and how many of them each turn holds (a model that takes several
  gets their tags in the turns that hold them)."""
  turns: list[str]
  system: str | None
  images: list[Image.Image]
  image_counts: list[int] = dataclasses.field(default_factory=list)


def parse_messages(messages: Any, allow_local_images: str | None = None, processor=None,
                   max_chars: int | None = None) -> Conversation:
  """Checks the messages; the images are decoded last, once the text is known to fit `max_chars` (at most what
  the context can hold: see `max_prompt_chars`), so an oversized request costs no tokenizing or decoding."""
  if not isinstance(messages, list) or not messages:
    raise BadRequest("messages must be a non-empty list")
  system, turns, urls, roles, counts = None, [], [], [], []
  for m in messages:
    if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
      raise BadRequest("each message needs a role of system, user or assistant")
    role = "system" if m["role"] == "developer" else m["role"]
    if "content" not in m or m["content"] is None:
      raise BadRequest(f"a {role} message needs content")
    parts = _parts(m["content"], role)
    text = "\n".join(p["text"] for p in parts if p["type"] == "text")
    found = [p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
             for p in parts if p["type"] == "image_url"]
    urls += found
    if role == "system":
      if turns:
        raise BadRequest("a system message must come before the conversation")
      system = text if system is None else system + "\n" + text
      continue
    if roles and roles[-1] == role:  # consecutive messages of one role are one turn
      turns[-1] += "\n" + text
      counts[-1] += len(found)
      continue
    roles.append(role)
    turns.append(text)
    counts.append(len(found))
  if not roles or roles[0] != "user" or roles[-1] != "user":
    raise BadRequest("the conversation must start and end with a user message")
  check_text_length(turns + [system or ""], max_chars)
  return Conversation(turns, system, [load_image(u, allow_local_images, processor) for u in urls], counts)


def check_text_length(texts: Sequence[str], max_chars: int | None) -> None:
  """BadRequest when the texts together hold more than `max_chars` characters (None: no bound)."""
  chars = sum(map(len, texts))
  if max_chars is not None and chars > max_chars:
    raise BadRequest(f"the messages hold {chars} characters, more than the {max_chars} that this server's context "
                     "can hold; shorten them")


def max_chars_per_token(tokenizer) -> int:
  """The most characters one token stands for: its longest vocabulary string. SentencePiece's "▁" is one space,
  byte-level BPE spells each byte as one character and byte-fallback tokens ("<0x0A>") are longer than their one
  byte, so no token covers more characters of the text than its string has."""
  return max(1, max(map(len, tokenizer.get_vocab())))


def max_prompt_chars(tokenizer, max_tokens: int) -> int:
  """A text longer than this cannot be `max_tokens` tokens or fewer: each token covers at most
  `max_chars_per_token` characters. Cheap to check before tokenizing, which costs time and memory per character."""
  return max_tokens * max_chars_per_token(tokenizer)


def build_request(processor, conversation: Conversation, *, max_images: int = 1, max_tiles: int | None = None,
                  **sampling) -> Request:
  """Renders the conversation with the checkpoint's template and runs the processor; `sampling` goes to Request
  (max_tokens, temperature, top_p, top_k, seed, stop).

  A model that takes one image (`max_images` 1: LLaVA-1.5, NeXT) gets it in front of the first user turn; one that
  takes several (OneVision) gets one "<image>" line per image in front of the turn that holds it, in order, and
  the processor tiles an image alone in full, each of several as its base tile only (one tile slot then)."""
  images = conversation.images
  tags = sum(t.count("<image>") for t in conversation.turns)
  if len(images) > max_images:
    raise BadRequest(f"{len(images)} images given, but this model's prompt has {max_images} <image> slot"
                     f"{'s' if max_images != 1 else ''} per conversation")
  if tags and tags != len(images):
    raise BadRequest(f"the messages hold {tags} <image> tags but {len(images)} images were given")
  template = processor.template
  if conversation.system is not None:
    template = template.with_system(conversation.system)
  turns = list(conversation.turns)
  if images and tags == 0 and max_images > 1:
    counts = conversation.image_counts or [len(images)] + [0] * (len(turns) - 1)  # none given: the first turn's
    turns = [media_tags(k) + t if k else t for t, k in zip(turns, counts)]
    prompt = template.generation_prompt(turns, image=False)
  elif images and tags == 0:
    prompt = template.generation_prompt(turns, image=True)
  else:  # the client placed the tags itself
    prompt = template.generation_prompt(turns, image=False)
  if len(images) > 1 and isinstance(processor.anyres, OneVisionLayout):
    max_tiles = 1  # several images in one prompt each take their base tile only
  try:
    inputs = processor(prompt, images or None, **({"max_tiles": max_tiles} if max_tiles else {}))
  except (ValueError, FileNotFoundError) as e:
    raise BadRequest(str(e)) from None
  ids = np.asarray(inputs["input_ids"][0], np.int32)
  return Request(ids, pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"), **sampling)


def stop_list(stop: Any) -> Sequence[str]:
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
    raise BadRequest("stop must be a non-empty string or a list of at most 4 of them")
  return tuple(stop)
