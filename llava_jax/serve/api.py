"""The OpenAI-compatible HTTP API (FastAPI) on one `Engine`: POST /v1/chat/completions (plain and server-sent
events), GET /v1/models, /health, /metrics.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for bad input (the request is
parsed by hand so that malformed JSON is a 400 too, not FastAPI's 422), 404 for an unknown model, 413 for a body
over `max_body_bytes` (read no further), 429 when the engine's queue is full; docs/FAILURES.md lists them. A
client that goes away frees its row: streams through cancellation of the response, plain requests by polling
for the disconnect. FastAPI comes with the `serve` extra.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from llava_jax.data.layout import OneVisionLayout
from llava_jax.decoding import TOP_LOGPROBS
from llava_jax.serve.chat import build_request, max_prompt_chars, parse_messages, stop_list
from llava_jax.serve.engine import BadRequest, Delta, Engine, Failed, Finished, QueueFull

log = logging.getLogger("llava_jax.serve")

DEFAULT_MAX_BODY_BYTES = 20 * 2**20  # --max-body-bytes: room for a large photo as a base64 data URI
BODY_TIMEOUT_S = 60  # a body that has not arrived in full by then is a 408
DISCONNECT_POLL_S = 0.25  # how often a plain request checks that its client is still there

KNOWN_PARAMETERS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
                    "stream", "stream_options", "seed", "n", "user", "logprobs", "top_logprobs",
                    "ignore_eos", "top_k"}  # vLLM's extensions


class Served:
  """What the API serves: the engine, the processor that renders prompts, and the limits the server was given."""

  def __init__(self, engine: Engine, processor, model_name: str, *, max_tokens: int = 512,
               allow_local_images: str | None = None, max_images: int | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    if max_tokens < 1 or max_body_bytes < 1:
      raise ValueError(f"max_tokens ({max_tokens}) and max_body_bytes ({max_body_bytes}) must be at least 1")
    self.engine, self.processor, self.model_name = engine, processor, model_name
    self.max_tokens, self.allow_local_images = max_tokens, allow_local_images
    self.max_body_bytes = max_body_bytes
    # The prompt must fit the engine's cache row and the model's context; a text that cannot is refused by its
    # character count before it is tokenized.
    limit = min(engine.max_len, engine.context or engine.max_len)
    self.max_prompt_chars = max_prompt_chars(processor.tokenizer, limit)
    self.max_tiles = processor.anyres.max_tiles if processor.anyres is not None else None  # one static tile count for NeXT
    self.max_images = default_max_images(processor, limit) if max_images is None else max_images
    self.token_text = TokenText(processor.tokenizer)

  def request_from_body(self, body: Any):
    """Validates an OpenAI chat-completions body; returns (Request, stream, include_usage)."""
    if not isinstance(body, dict):
      raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_PARAMETERS)
    if unknown:
      raise BadRequest(f"unknown or unsupported parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    if body.get("n", 1) != 1:
      raise BadRequest("only n=1 is supported")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
      raise BadRequest("stream_options may only hold include_usage")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = self.max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= self.max_tokens:
      raise BadRequest(f"max_tokens must be an integer from 1 to {self.max_tokens}")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
      raise BadRequest("top_p must be greater than 0")
    top_k = _typed(body, "top_k", int, 0)
    if isinstance(top_k, bool) or top_k < -1:
      raise BadRequest("top_k must be an integer: the number of most likely tokens to sample from (0 or -1: all)")
    seed = body.get("seed")
    if seed is None:
      seed = uuid.uuid4().int % 2**32
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise BadRequest("seed must be an integer")
    logprobs = _typed(body, "logprobs", bool, False)
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
      if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs > TOP_LOGPROBS \
          or top_logprobs < 0:
        raise BadRequest(f"top_logprobs must be an integer from 0 to {TOP_LOGPROBS}")
      if not logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true")
    conversation = parse_messages(body.get("messages"), self.allow_local_images, self.processor,
                                  self.max_prompt_chars)
    request = build_request(self.processor, conversation, max_images=self.max_images, max_tiles=self.max_tiles,
                            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                            seed=seed % 2**32, stop=stop_list(body.get("stop")),
                            ignore_eos=_typed(body, "ignore_eos", bool, False),
                            logprobs=(top_logprobs or 0) if logprobs else None)
    self.engine.check(request)
    return request, stream, bool(options.get("include_usage"))


class TokenText:
  """Token ids -> OpenAI's logprobs entries. A token's text is the tokenizer's decoding of that one id (as vLLM
  gives it; SentencePiece drops a word's leading space there), its bytes that text's UTF-8, except for a
  byte-fallback token (<0x0A>), whose bytes are the one byte it stands for."""

  def __init__(self, tokenizer):
    self.tokenizer, self.pieces = tokenizer, {}

  def piece(self, token: int) -> dict:
    if token not in self.pieces:
      text = self.tokenizer.decode([token])
      byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", self.tokenizer.convert_ids_to_tokens(token) or "")
      self.pieces[token] = {"token": text, "bytes": [int(byte.group(1), 16)] if byte else list(text.encode())}
    return self.pieces[token]

  def entries(self, logprobs) -> list[dict]:
    """`engine.TokenLogprob`s -> [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]."""
    def entry(token, logprob):
      piece = self.piece(token)
      return {"token": piece["token"], "logprob": logprob, "bytes": piece["bytes"]}
    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in logprobs]


def default_max_images(processor, limit: int) -> int:
  """Images a conversation may hold: one, except for OneVision, which takes as many as the prompt's positions
  hold base-only images (each its base tile's features and a newline)."""
  if not isinstance(processor.anyres, OneVisionLayout):
    return 1
  return max(1, limit // processor.anyres.num_image_tokens(None, base_only=True))


def _typed(body, key, kind, default):
  value = body.get(key, default)
  if value is None:
    return default
  if not isinstance(value, kind):
    raise BadRequest(f"{key} must be a {kind.__name__}")
  return value


def _number(body, key, default, low, high) -> float:
  value = body.get(key)
  if value is None:
    return default
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
    raise BadRequest(f"{key} must be a number from {low} to {high}")
  return float(value)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def create_app(served: Served):
  """The FastAPI application; `served.engine` must be running."""
  app = FastAPI(title="llava-jax", description="OpenAI-compatible chat completions on a LLaVA checkpoint")
  engine = served.engine

  def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(error_body(message, kind, code), status_code=status)

  @app.get("/health")
  def health():
    alive = engine.thread.is_alive()
    return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

  @app.get("/metrics")
  def metrics():
    return engine.metrics()

  @app.get("/v1/models")
  def models():
    return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": 0,
                                        "owned_by": "llava-jax"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    try:
      raw = await asyncio.wait_for(read_body(http, served.max_body_bytes), BODY_TIMEOUT_S)
    except BodyTooLarge as e:
      return error(413, str(e), code="body_too_large")
    except ClientDisconnect:  # the client sent part of the body and left: nobody to answer
      log.info("a client left before sending its whole request body")
      return error(400, "the client disconnected before sending the whole body")
    except asyncio.TimeoutError:
      return error(408, f"the request body did not arrive in full within {BODY_TIMEOUT_S} s")
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return error(400, f"the body is not valid JSON: {e}")
    except RecursionError:
      return error(400, "the body is not valid JSON: nested too deeply")
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != served.model_name:
      return error(404, f"the model {model!r} does not exist; this server serves {served.model_name!r}",
                   code="model_not_found")
    try:
      # Decoding images and tokenizing take a while: off the event loop, so other clients are not held up.
      request, stream, include_usage = await asyncio.to_thread(served.request_from_body, body)
    except BadRequest as e:
      return error(400, str(e))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    try:
      handle = engine.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    except BadRequest as e:
      return error(400, str(e))
    except QueueFull as e:
      return error(429, str(e), kind="rate_limit_error", code="queue_full")
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if stream:
      return StreamingResponse(_sse(served, handle, events, completion_id, created, include_usage),
                               media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _complete(served, http, handle, events, completion_id, created, error)

  return app


class BodyTooLarge(Exception):
  """The request body is over `--max-body-bytes`: the API answers 413."""


async def read_body(http: HttpRequest, limit: int) -> bytes:
  """The body, chunk by chunk, refused as soon as it is known to exceed `limit` bytes (the declared
  Content-Length, else the bytes so far): an oversized body is never held in memory. The rest of it is left
  unread (uvicorn discards it once the answer is sent)."""
  declared = http.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    raise BodyTooLarge(f"the request body is {int(declared)} bytes, more than this server's limit of {limit} "
                       "(--max-body-bytes)")
  chunks, size = [], 0
  async for chunk in http.stream():
    size += len(chunk)
    if size > limit:
      raise BodyTooLarge(f"the request body is more than this server's limit of {limit} bytes (--max-body-bytes)")
    chunks.append(chunk)
  return b"".join(chunks)


async def _complete(served, http, handle, events, completion_id, created, error):
  next_check = time.monotonic() + DISCONNECT_POLL_S
  try:
    while True:
      try:
        event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
      except asyncio.TimeoutError:
        event = None
      # On a clock, not only when no event came: a reply in progress sends events far more often than that.
      if time.monotonic() >= next_check:
        next_check = time.monotonic() + DISCONNECT_POLL_S
        if await http.is_disconnected():
          handle.cancel()
          log.info("request %d: client disconnected, row freed", handle.id)
          return error(499, "client disconnected")
      if isinstance(event, Failed):
        return error(500, event.message, kind="server_error")
      if isinstance(event, Finished):
        logprobs = None if event.logprobs is None else {"content": served.token_text.entries(event.logprobs)}
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": served.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                             "finish_reason": event.reason, "logprobs": logprobs}],
                "usage": _usage(event)}
  finally:
    handle.cancel()  # a no-op once finished; frees the row if this coroutine was cancelled mid-way


def _usage(event: Finished) -> dict:
  return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
          "total_tokens": event.prompt_tokens + event.completion_tokens}


async def _sse(served, handle, events, completion_id, created, include_usage):
  """Each chunk carries the logprobs entries of the tokens whose text it carries; the final one those of tokens
  whose text never showed (held back and cut at a stop string)."""
  sent = 0  # logprobs entries sent so far

  def chunk(delta: dict, finish_reason=None, usage=None, logprobs=None):
    content = None if logprobs is None else {"content": served.token_text.entries(logprobs)}
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": content}]}
    if usage is not None:
      body["choices"], body["usage"] = [], usage
    return f"data: {json.dumps(body)}\n\n"

  try:
    yield chunk({"role": "assistant", "content": ""})
    while True:
      event = await events.get()
      if isinstance(event, Delta):
        sent += len(event.logprobs or ())
        yield chunk({"content": event.text}, logprobs=event.logprobs)
      elif isinstance(event, Failed):
        yield f"data: {json.dumps(error_body(event.message, 'server_error'))}\n\n"
        break
      elif isinstance(event, Finished):
        yield chunk({}, finish_reason=event.reason, logprobs=None if event.logprobs is None else event.logprobs[sent:])
        if include_usage:
          yield chunk({}, usage=_usage(event))
        break
    yield "data: [DONE]\n\n"
  finally:
    handle.cancel()  # the client went away (the response was cancelled) or the reply is complete
