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
         allow_local_images: str | None = None, model_name: str | None = None, max_body_bytes: int | None = None,
         **memory):
  """Loads a checkpoint and starts its engine; returns `api.Served` (engine + processor + limits).

  `max_len` (positions per row) defaults to room for a prompt as long as the model's context allows, up to
  2048, plus `max_tokens`, rounded up to the prompt bucket. `memory`: the engine's KV and cache settings
  (`MEMORY_SETTINGS`: page_size, max_kv_tokens, prefix_cache_tokens, image_cache, prefill_chunk,
  decode_prefill_chunk)."""
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.processor import Processor

  check_limits(max_batch=max_batch, max_len=max_len, max_tokens=max_tokens, prompt_bucket=prompt_bucket,
               max_queue=max_queue, max_body_bytes=max_body_bytes, allow_local_images=allow_local_images,
               **memory)  # first
  model = load_checkpoint(ckpt, dtype=dtype)
  processor = Processor.from_model(model, template=template)
  return serve_model(model, processor, max_batch=max_batch, max_len=max_len, max_tokens=max_tokens,
                     prompt_bucket=prompt_bucket, max_queue=max_queue, allow_local_images=allow_local_images,
                     model_name=model_name or os.path.basename(os.path.normpath(ckpt)), max_body_bytes=max_body_bytes,
                     **memory)


def serve_model(model, processor, *, max_batch: int = 8, max_len: int | None = None, max_tokens: int = 512,
                prompt_bucket: int = 32, max_queue: int = 64, allow_local_images: str | None = None,
                model_name: str = "llava", max_body_bytes: int | None = None, **memory):
  """An engine for a loaded model and processor, wrapped as `api.Served`. Replies stop at the model's context
  (`text.max_position_embeddings`) as well as at max_tokens and the row's max_len; `max_body_bytes` (default
  `api.DEFAULT_MAX_BODY_BYTES`) bounds a request's body; `memory`: as `load`."""
  from llava_jax.serve.api import DEFAULT_MAX_BODY_BYTES, Served

  check_limits(max_batch=max_batch, max_len=max_len, max_tokens=max_tokens, prompt_bucket=prompt_bucket,
               max_queue=max_queue, max_body_bytes=max_body_bytes, allow_local_images=allow_local_images,
               **memory)
  context = model.config.text.max_position_embeddings
  if max_len is None:
    max_len = min(context or 2048, 2048) + max_tokens
  max_len = round_up(max_len, prompt_bucket)
  tokenizer = processor.tokenizer
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  engine = Engine(model, max_batch=max_batch, max_len=max_len, prompt_bucket=prompt_bucket, max_queue=max_queue,
                  eos_id=tokenizer.eos_token_id, pad_id=pad, decode=processor.decode,
                  stop_strings=[processor.template.stop_str or ""], byte_token_ids=byte_token_ids(tokenizer),
                  context=context, **{k: v for k, v in memory.items() if v is not None})
  return Served(engine, processor, model_name, max_tokens=max_tokens, allow_local_images=allow_local_images,
                max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)


# The engine's KV memory settings (`Engine`'s keywords; None: its default) and whether 0 is allowed.
MEMORY_SETTINGS = {"page_size": False, "max_kv_tokens": False, "prefix_cache_tokens": True, "image_cache": True,
                   "prefill_chunk": False, "decode_prefill_chunk": False}


def check_limits(*, max_batch: int = 8, max_len: int | None = None, max_tokens: int = 512, prompt_bucket: int = 32,
                 max_queue: int = 64, max_body_bytes: int | None = None, allow_local_images: str | None = None,
                 **memory):
  """ValueError naming the first setting no server can run with (before the model is loaded): a zero batch hangs
  every request, a zero bucket divides by zero, a zero max_tokens refuses every request, a zero queue is
  unbounded, a KV pool smaller than one row's max_len cannot serve a long prompt."""
  for name, value in memory.items():
    if name not in MEMORY_SETTINGS:
      raise ValueError(f"unknown engine memory setting {name!r}; known: {', '.join(MEMORY_SETTINGS)}")
    low = 0 if MEMORY_SETTINGS[name] else 1
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  kv, length = memory.get("max_kv_tokens"), max_len if max_len is None else round_up(max_len, prompt_bucket)
  if kv is not None and length is not None and kv < length:
    raise ValueError(f"max_kv_tokens {kv} cannot hold one row of max_len {length}; give at least that")
  for name, value in (("max_batch", max_batch), ("max_tokens", max_tokens), ("prompt_bucket", prompt_bucket),
                      ("max_queue", max_queue), ("max_len", max_len), ("max_body_bytes", max_body_bytes)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if max_len is not None and round_up(max_len, prompt_bucket) <= prompt_bucket:
    raise ValueError(f"max_len {max_len} leaves no room for a prompt bucket of {prompt_bucket} and a reply; give "
                     f"more than {prompt_bucket}")
  if allow_local_images is not None and not os.path.isdir(allow_local_images):
    raise ValueError(f"allow_local_images {allow_local_images!r} is not a directory")


__all__ = ["MEMORY_SETTINGS", "BadRequest", "Delta", "Engine", "Failed", "Finished", "QueueEvents", "QueueFull",
           "Request", "check_limits", "load", "serve_model"]
