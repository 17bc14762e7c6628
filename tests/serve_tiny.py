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
