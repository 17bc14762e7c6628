"""`llava-jax serve`: the official openai client against the server on a tiny checkpoint. Greedy replies must be
`llava_jax.generate`'s greedy replies for the same prompt and image, also when 16 clients are batched together;
bad input is a 400 that harms no other request; a full queue is a 429; a client that leaves frees its row."""

import concurrent.futures
import json
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import serve_tiny
from llava_jax import load_checkpoint
from llava_jax.cli import build_parser
from llava_jax import generate
from llava_jax.decoding import stop_at
from llava_jax.processor import Processor
from llava_jax.serve import serve_model
from llava_jax.serve.api import create_app

MAX_TOKENS = 24
QUESTIONS = ["What is in the image?", "Describe the picture.", "What colour is it?", "Is there a circle?",
             "What shape do you see?", "Tell me about the background.", "Name the object.", "How many are there?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  ckpt = serve_tiny.make_checkpoint(root)
  model = load_checkpoint(ckpt)
  proc = Processor.from_model(model)
  served = serve_model(model, proc, max_batch=8, max_len=256, max_tokens=64, max_queue=64, model_name="tiny",
                       allow_local_images=str(root))
  with serve_tiny.Server(create_app(served)) as url:
    yield {"url": url, "model": model, "proc": proc, "served": served, "root": root}
  served.engine.close()


SYSTEM = "You answer in one word."
# vicuna_v1 by the reference's get_prompt: system + " " + "USER: Hi ASSISTANT: Hello.</s>USER: What now? ASSISTANT:"
SYSTEM_PROMPT = SYSTEM + " USER: Hi ASSISTANT: Hello.</s>USER: What now? ASSISTANT:"


def cases():
  """(rendered prompt or None for the template's, question, image) of every greedy comparison in this file."""
  single = [(None, "What is in the image?", serve_tiny.image(0)), (None, "Hello, who are you?", None),
            (SYSTEM_PROMPT, None, None)]
  many = [(None, QUESTIONS[i % len(QUESTIONS)] + (" Please." if i >= 8 else ""),
           serve_tiny.image(i) if i % 2 == 0 else None) for i in range(16)]
  return single, many


@pytest.fixture(scope="module")
def expected(setup) -> list[str]:
  """`llava_jax.generate`'s greedy replies to every case, in one left-padded batch (each row as if alone: one
  compile for all)."""
  single, many = cases()
  proc = setup["proc"]
  prompts = [p or proc.prompt([q], image=im is not None) for p, q, im in single + many]
  replies = greedy(setup, prompts, [im for _, _, im in single + many if im is not None])
  return replies[:len(single)], replies[len(single):]


def greedy(setup, prompts, images) -> list[str]:
  """Cut at the EOS token, decoded, cut at the template's stop string."""
  proc, model = setup["proc"], setup["model"]
  inputs = proc(prompts, images or None)
  pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
  eos = proc.tokenizer.eos_token_id
  tokens = generate(model, inputs["input_ids"], pixels, inputs["attention_mask"], max_new_tokens=MAX_TOKENS,
                    eos_token_id=eos)
  replies = []
  for row in tokens:
    cut = np.flatnonzero(row == eos)
    row = row[:cut[0]] if len(cut) else row
    replies.append(stop_at(proc.decode(row), [proc.template.stop_str])[0])
  return replies


def user_message(question, image=None) -> dict:
  if image is None:
    return {"role": "user", "content": question}
  return {"role": "user", "content": [{"type": "text", "text": question},
                                      {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(image)}}]}


def client(setup) -> openai.OpenAI:
  return openai.OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_plain_and_streaming_match_generate(setup, expected):
  single = cases()[0][:2]
  assert all(expected[0][:2]), "the tiny model should say something for the test to mean anything"
  c = client(setup)
  assert [m.id for m in c.models.list().data] == ["tiny"]
  for (_, question, image), want in zip(single, expected[0]):
    reply = c.chat.completions.create(model="tiny", messages=[user_message(question, image)], temperature=0,
                                      max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == MAX_TOKENS else "stop")
    ids = setup["proc"](setup["proc"].prompt([question], image=image is not None),
                        [image] if image is not None else None)["input_ids"]
    assert reply.usage.prompt_tokens == ids.shape[1]
    chunks = list(c.chat.completions.create(model="tiny", messages=[user_message(question, image)], temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
  health = httpx.get(setup["url"] + "/health", trust_env=False)
  assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_system_prompt_replaces_the_templates(setup, expected):
  """A system message replaces the template's system text (the reference's conversation keeps it separately)."""
  reply = client(setup).chat.completions.create(model="tiny", temperature=0, max_tokens=MAX_TOKENS, messages=[
      {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What now?"}])
  assert reply.choices[0].message.content == expected[0][2]
  assert reply.usage.prompt_tokens == setup["proc"](SYSTEM_PROMPT)["input_ids"].shape[1]


def test_sixteen_concurrent_clients_are_batched_and_a_bad_request_harms_none(setup, expected):
  questions, images = [q for _, q, _ in cases()[1]], [im for _, _, im in cases()[1]]
  before = setup["served"].engine.metrics()
  c = client(setup)

  def ask(i):
    if i == 8:  # a bad request in the middle: not JSON at all
      r = httpx.post(setup["url"] + "/v1/chat/completions", content=b"{not json", trust_env=False,
                     headers={"content-type": "application/json"})
      return r.status_code
    i = i if i < 8 else i - 1
    reply = c.chat.completions.create(model="tiny", messages=[user_message(questions[i], images[i])],
                                      temperature=0, max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content

  with concurrent.futures.ThreadPoolExecutor(17) as pool:
    results = list(pool.map(ask, range(17)))
  assert results[8] == 400
  answers = results[:8] + results[9:]
  assert answers == expected[1]
  after = setup["served"].engine.metrics()
  assert after["completed"] - before["completed"] == 16
  steps = {int(k): v - before["rows_per_step"].get(k, 0) for k, v in after["rows_per_step"].items()}
  assert max(k for k, v in steps.items() if v > 0) > 1, f"no decode step held more than one row: {steps}"
  assert max(steps) <= 8


def post(setup, body) -> httpx.Response:
  content = body if isinstance(body, bytes) else json.dumps(body).encode()
  return httpx.post(setup["url"] + "/v1/chat/completions", content=content, trust_env=False, timeout=60,
                    headers={"content-type": "application/json"})


def test_bad_input_is_a_400_with_a_message(setup, tmp_path):
  ok = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
  cases = {
      "not valid JSON": b'{"model": "tiny", "messages": [',
      "invalid base64": {**ok, "messages": [{"role": "user", "content": [
          {"type": "text", "text": "What?"},
          {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
      "not an image": {**ok, "messages": [user_message("What?")]},
      "<image> slot": {**ok, "messages": [{"role": "user", "content": [
          {"type": "text", "text": "Compare them."},
          {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(1))}},
          {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(2))}}]}]},
      "context": {**ok, "messages": [{"role": "user", "content": "word " * 400}]},
      "unknown or unsupported parameter: frobnicate": {**ok, "frobnicate": 1},
      "max_tokens must be": {**ok, "max_tokens": 10_000},
      "temperature must be": {**ok, "temperature": -1},
      "start and end with a user message": {**ok, "messages": [{"role": "assistant", "content": "Hi"}]},
      "local image paths are disabled": None,  # below, on a server without --allow-local-images
      "outside the allowed directory": {**ok, "messages": [{"role": "user", "content": [
          {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]},
  }
  import base64

  text_uri = "data:image/png;base64," + base64.b64encode(b"just some text, not a PNG").decode()
  cases["not an image"]["messages"] = [{"role": "user", "content": [
      {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": text_uri}}]}]
  for message, body in cases.items():
    if body is None:
      continue
    r = post(setup, body)
    assert r.status_code == 400, (message, r.text)
    assert message in r.json()["error"]["message"], (message, r.json())
    assert r.json()["error"]["type"] == "invalid_request_error"
  assert post(setup, {**ok, "model": "gpt-4"}).status_code == 404
  # A local image inside the allowed directory works; the server is still answering.
  path = setup["root"] / "local.png"
  serve_tiny.image(3).save(path)
  r = post(setup, {**ok, "messages": [{"role": "user", "content": [
      {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": str(path)}}]}]})
  assert r.status_code == 200, r.text
  assert post(setup, ok).status_code == 200


def test_local_images_are_refused_without_the_flag(setup):
  from llava_jax.serve.chat import load_image
  from llava_jax.serve.engine import BadRequest

  with pytest.raises(BadRequest, match="local image paths are disabled"):
    load_image("/etc/hostname", None)
  with pytest.raises(BadRequest, match="outside the allowed directory"):
    load_image(str(setup["root"] / ".." / "x.png"), str(setup["root"]))


def test_full_queue_is_a_429(setup):
  engine = setup["served"].engine
  engine.pause()
  bound = engine.waiting.maxsize
  engine.waiting.maxsize = 2
  try:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futures = [pool.submit(post, setup, body) for _ in range(4)]
      deadline = time.time() + 30
      while sum(f.done() for f in futures) < 2 and time.time() < deadline:
        time.sleep(0.05)
      rejected = [f.result() for f in futures if f.done()]
      assert len(rejected) == 2 and all(r.status_code == 429 for r in rejected)
      assert rejected[0].json()["error"]["code"] == "queue_full"
      engine.resume()
      assert sorted(f.result().status_code for f in futures) == [200, 200, 429, 429]
  finally:
    engine.waiting.maxsize = bound
    engine.resume()


def test_a_client_that_disconnects_frees_its_row(setup):
  engine = setup["served"].engine
  before = engine.metrics()
  body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 64,
          "temperature": 0, "stream": True, "ignore_eos": True}
  with httpx.Client(trust_env=False, timeout=60) as http:
    with http.stream("POST", setup["url"] + "/v1/chat/completions", json=body) as r:
      assert r.status_code == 200
      next(r.iter_lines())  # the first event; then the client goes away
  deadline = time.time() + 30
  while engine.metrics()["cancelled"] == before["cancelled"] and time.time() < deadline:
    time.sleep(0.05)
  after = engine.metrics()
  assert after["cancelled"] == before["cancelled"] + 1
  assert after["active_rows"] == 0
  # The row was freed long before the 64 tokens it would otherwise have produced.
  assert after["generated_tokens"] - before["generated_tokens"] < 64


def test_cli_has_serve_and_web():
  args = build_parser().parse_args(["serve", "--ckpt", "c", "--max-batch", "4", "--allow-local-images", "/data"])
  assert (args.host, args.port, args.max_batch, args.allow_local_images) == ("127.0.0.1", 8000, 4, "/data")
  assert build_parser().parse_args(["web", "--ckpt", "c"]).port == 7860


def test_top_k_is_accepted_and_checked(setup):
  """vLLM's `top_k` extension: sampling from the k most likely tokens; anything but an integer >= -1 is a 400."""
  url = setup["url"] + "/v1/chat/completions"
  body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.7,
          "top_k": 3, "seed": 1}
  assert httpx.post(url, json=body, trust_env=False, timeout=120).status_code == 200
  for bad in (-2, 1.5, True, "3"):
    assert httpx.post(url, json={**body, "top_k": bad}, trust_env=False, timeout=120).status_code == 400
