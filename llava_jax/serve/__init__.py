"""Serving: a batching engine (`engine.py`), an OpenAI-compatible API (`api.py`) and a Gradio chat page (`web.py`).

FastAPI, uvicorn and gradio come with the `serve` extra (`pip install -e '.[serve]'`); this module imports them
only when a server is built.
"""

from __future__ import annotations

import os

from llava_jax.decoding import byte_token_ids
from llava_jax.padding import round_up
from llava_jax.serve.engine import BadRequest, Delta, Engine, Failed, Finished, QueueEvents, QueueFull, Request


def load(ckpt: str, *, max_batch: int = 8, max_len: int | None = None, max_tokens: int = 512,
         prompt_bucket: int = 32, max_queue: int = 64, template: str | None = None, dtype: str | None = None,
         allow_local_images: str | None = None, model_name: str | None = None):
  """Loads a checkpoint and starts its engine; returns `api.Served` (engine + processor + limits).

  `max_len` (KV cache slots per row) defaults to room for a prompt as long as the model's context allows, up to
  2048, plus `max_tokens`, rounded up to the prompt bucket."""
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.processor import Processor

  model = load_checkpoint(ckpt, dtype=dtype)
  processor = Processor.from_model(model, template=template)
  return serve_model(model, processor, max_batch=max_batch, max_len=max_len, max_tokens=max_tokens,
                     prompt_bucket=prompt_bucket, max_queue=max_queue, allow_local_images=allow_local_images,
                     model_name=model_name or os.path.basename(os.path.normpath(ckpt)))


def serve_model(model, processor, *, max_batch: int = 8, max_len: int | None = None, max_tokens: int = 512,
                prompt_bucket: int = 32, max_queue: int = 64, allow_local_images: str | None = None,
                model_name: str = "llava"):
  """An engine for a loaded model and processor, wrapped as `api.Served`."""
  from llava_jax.serve.api import Served

  if max_len is None:
    context = min(model.config.text.max_position_embeddings or 2048, 2048)
    max_len = context + max_tokens
  max_len = round_up(max_len, prompt_bucket)
  tokenizer = processor.tokenizer
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  engine = Engine(model, max_batch=max_batch, max_len=max_len, prompt_bucket=prompt_bucket, max_queue=max_queue,
                  eos_id=tokenizer.eos_token_id, pad_id=pad, decode=processor.decode,
                  stop_strings=[processor.template.stop_str or ""], byte_token_ids=byte_token_ids(tokenizer))
  return Served(engine, processor, model_name, max_tokens=max_tokens, allow_local_images=allow_local_images)


__all__ = ["BadRequest", "Delta", "Engine", "Failed", "Finished", "QueueEvents", "QueueFull", "Request", "load",
           "serve_model"]
