"""OpenAI-style chat messages -> the checkpoint's prompt and images -> an engine `Request`.

The checkpoint's conversation template renders the turns (`Processor.prompt`), as the reference's demo does:
the system message, if any, replaces the template's system prompt, and the image goes in front of the first user
turn (LLaVA-1.5 was trained with one image per conversation there). Every problem with the input is a
`BadRequest` whose message the API returns with a 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_jax.serve.engine import BadRequest, Request

MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs early


def load_image(url: str, allow_local_images: str | None = None) -> Image.Image:
  """A `data:image/...;base64,` URI, or (only with `allow_local_images`) a file path / file:// URL inside that
  directory. Remote http(s) URLs are not fetched: a server should not reach out on a client's say-so."""
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
    return _open(io.BytesIO(data), "the image data URI")
  if url.startswith(("http://", "https://")):
    raise BadRequest("remote image URLs are not fetched: send the image as a base64 data URI")
  if allow_local_images is None:
    raise BadRequest("local image paths are disabled on this server (start it with --allow-local-images DIR); "
                     "send the image as a base64 data URI")
  path = os.path.realpath(url[len("file://"):] if url.startswith("file://") else url)
  root = os.path.realpath(allow_local_images)
  if os.path.commonpath([path, root]) != root:
    raise BadRequest(f"image path {url!r} is outside the allowed directory")
  if not os.path.isfile(path):
    raise BadRequest(f"image file {url!r} does not exist")
  with open(path, "rb") as f:
    return _open(io.BytesIO(f.read()), f"image file {url!r}")


def _open(stream, what: str) -> Image.Image:
  try:
    with Image.open(stream) as im:
      if im.width * im.height > MAX_IMAGE_PIXELS:
        raise BadRequest(f"{what} is {im.width}x{im.height}, more than {MAX_IMAGE_PIXELS} pixels")
      im.load()
      return im.convert("RGB")
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
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
  for the template's own) and the images in order."""
  turns: list[str]
  system: str | None
  images: list[Image.Image]


def parse_messages(messages: Any, allow_local_images: str | None = None) -> Conversation:
  if not isinstance(messages, list) or not messages:
    raise BadRequest("messages must be a non-empty list")
  system, turns, images, roles = None, [], [], []
  for m in messages:
    if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
      raise BadRequest("each message needs a role of system, user or assistant")
    role = "system" if m["role"] == "developer" else m["role"]
    if "content" not in m or m["content"] is None:
      raise BadRequest(f"a {role} message needs content")
    parts = _parts(m["content"], role)
    text = "\n".join(p["text"] for p in parts if p["type"] == "text")
    for p in parts:
      if p["type"] == "image_url":
        url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
        images.append(load_image(url, allow_local_images))
    if role == "system":
      if turns:
        raise BadRequest("a system message must come before the conversation")
      system = text if system is None else system + "\n" + text
      continue
    if roles and roles[-1] == role:  # consecutive messages of one role are one turn
      turns[-1] += "\n" + text
      continue
    roles.append(role)
    turns.append(text)
  if not roles or roles[0] != "user" or roles[-1] != "user":
    raise BadRequest("the conversation must start and end with a user message")
  return Conversation(turns, system, images)


def build_request(processor, conversation: Conversation, *, max_images: int = 1, max_tiles: int | None = None,
                  **sampling) -> Request:
  """Renders the conversation with the checkpoint's template and runs the processor; `sampling` goes to Request
  (max_tokens, temperature, top_p, top_k, seed, stop)."""
  images = conversation.images
  tags = sum(t.count("<image>") for t in conversation.turns)
  if len(images) > max_images:
    raise BadRequest(f"{len(images)} images given, but this model's prompt has {max_images} <image> slot"
                     f"{'s' if max_images != 1 else ''} per conversation")
  if tags and tags != len(images):
    raise BadRequest(f"the messages hold {tags} <image> tags but {len(images)} images were given")
  template = processor.template
  if conversation.system is not None:
    template = dataclasses.replace(template, system=conversation.system)
  turns = list(conversation.turns)
  if images and tags == 0:
    prompt = template.generation_prompt(turns, image=True)
  else:  # the client placed the tags itself
    prompt = template.generation_prompt(turns, image=False)
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
