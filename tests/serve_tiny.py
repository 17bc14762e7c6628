"""A tiny converted checkpoint (real SentencePiece tokenizer, CLIP preprocessor config) and an in-process uvicorn
server on a free 127.0.0.1 port, shared by the serving tests."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
from PIL import Image

import hf_tiny


def make_checkpoint(root) -> str:
  """llava-hf layout -> `llava-jax convert`; the context is 512 positions so that image prompts fit."""
  return hf_tiny.converted_checkpoint(root, max_position_embeddings=512)


def image(seed: int, size=(40, 30)) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, size + (3,), np.uint8))


def data_uri(im: Image.Image) -> str:
  buffer = io.BytesIO()
  im.save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """uvicorn in a thread; `with Server(app) as url:`."""

  def __init__(self, app):
    import uvicorn

    self.port = free_port()
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self) -> str:
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      if time.time() > deadline or not self.thread.is_alive():
        raise RuntimeError("the server did not start")
      time.sleep(0.05)
    return f"http://127.0.0.1:{self.port}"

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=10)


def png_bytes(size, mode: str = "RGB") -> bytes:
  """A blank PNG of `size` (width, height); mode "1" keeps a huge canvas cheap to make."""
  buffer = io.BytesIO()
  Image.new(mode, size).save(buffer, format="PNG")
  return buffer.getvalue()


def png_uri(size, mode: str = "RGB") -> str:
  return "data:image/png;base64," + base64.b64encode(png_bytes(size, mode)).decode()


def raw_post(url: str, body: bytes, *, length: int | None = None, send: int | None = None) -> socket.socket:
  """A POST to /v1/chat/completions on a bare socket (which the caller closes): Content-Length `length` (default
  the body's) and only the first `send` bytes of the body, to play clients that lie or leave."""
  host, port = url.rsplit("/", 1)[-1].split(":")
  s = socket.create_connection((host, int(port)), timeout=60)
  head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
  s.sendall(head.encode() + body[:send])
  return s


def read_response(s: socket.socket) -> tuple[int, bytes]:
  """(status, body) of the answer on a `raw_post` socket (read until the server closes it)."""
  data = b""
  while chunk := s.recv(65536):
    data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  return int(head.split()[1]), body
