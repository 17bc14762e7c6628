"""OpenAI's `logprobs` / `top_logprobs` on POST /v1/chat/completions, and the `stop` and `seed` parameters: the
log-probabilities are those of transformers' model on the same prompt and reply prefix (log_softmax of the raw
logits, also when sampling at another temperature), the top ones sorted and named as the tokenizer decodes their
ids; streamed entries add up to the plain reply's; bad values are 400s."""

import json

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

import hf_tiny
import serve_tiny
from llava_jax import load_checkpoint
from llava_jax.processor import Processor
from llava_jax.serve import QueueEvents, Request, serve_model
from llava_jax.serve.api import create_app
from llava_jax.serve.engine import Finished

TOL = 1e-4
MAX_TOKENS = 8
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_logprobs")
  ckpt = serve_tiny.make_checkpoint(root)
  model = load_checkpoint(ckpt)
  proc = Processor.from_model(model)
  served = serve_model(model, proc, max_batch=4, max_len=256, max_tokens=64, model_name="tiny")
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(root / "hf", torch_dtype=torch.float32).eval()
  with serve_tiny.Server(create_app(served)) as url:
    yield {"url": url, "proc": proc, "served": served, "hf": hf}
  served.engine.close()


def reference_logprobs(setup, image, reply_ids) -> np.ndarray:
  """transformers' log_softmax over the vocabulary [len(reply_ids), V] before each reply token: the prompt's last
  logits for the first, the prompt + the reply so far for the rest."""
  proc = setup["proc"]
  inputs = proc(proc.prompt([QUESTION], image=image is not None), None if image is None else [image])
  ids = np.concatenate([inputs["input_ids"][0], np.asarray(reply_ids[:-1], np.int64)])[None]
  logits = hf_tiny.reference_logits(setup["hf"], ids, inputs["pixel_values"])[0]
  prompt_len = inputs["input_ids"].shape[1]
  return np.asarray(torch.log_softmax(torch.from_numpy(logits[prompt_len - 1:]), -1))


def message(image):
  content = QUESTION if image is None else [{"type": "text", "text": QUESTION},
                                           {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(image)}}]
  return [{"role": "user", "content": content}]


def client(setup) -> openai.OpenAI:
  return openai.OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(setup, body) -> httpx.Response:
  return httpx.post(setup["url"] + "/v1/chat/completions", json=body, trust_env=False, timeout=120)


@pytest.mark.parametrize("image", [None, serve_tiny.image(3)], ids=["text", "image"])
def test_engine_logprobs_are_transformers_raw_distribution_also_when_sampling(setup, image):
  """At temperature 0.7 with top_k 5 the tokens are drawn from the filtered distribution, but the logprobs (and
  top ones) are the model's own: log_softmax of transformers' logits for the prompt + the reply so far."""
  proc = setup["proc"]
  inputs = proc(proc.prompt([QUESTION], image=image is not None), None if image is None else [image])
  request = Request(input_ids=inputs["input_ids"][0], pixel_values=inputs["pixel_values"], max_tokens=MAX_TOKENS,
                    temperature=0.7, top_k=5, seed=3, ignore_eos=True, logprobs=6)
  events = QueueEvents()
  setup["served"].engine.submit(request, events)
  finished = [e for e in events if isinstance(e, Finished)][0]
  entries = finished.logprobs
  assert len(entries) == finished.completion_tokens == MAX_TOKENS
  reply = [e.token for e in entries]
  ref = reference_logprobs(setup, image, reply)
  for k, e in enumerate(entries):
    assert abs(e.logprob - ref[k, e.token]) <= TOL, (k, e.logprob, ref[k, e.token])
    top_ids = [i for i, _ in e.top]
    want = np.sort(ref[k])[::-1][:6]
    assert np.allclose([lp for _, lp in e.top], want, atol=TOL)  # the six largest, descending
    assert np.allclose(ref[k, top_ids], want, atol=TOL)  # and the ids they belong to
    assert e.token in top_ids[:5]  # top_k 5 sampled it


def test_api_logprobs_plain_and_streaming(setup):
  image = serve_tiny.image(5)
  c = client(setup)
  reply = c.chat.completions.create(model="tiny", messages=message(image), temperature=0, max_tokens=MAX_TOKENS,
                                    logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
  content = reply.choices[0].logprobs.content
  assert len(content) == reply.usage.completion_tokens == MAX_TOKENS
  tokenizer = setup["proc"].tokenizer
  ref = np.asarray(torch.log_softmax(torch.from_numpy(np.stack(_greedy_rows(setup, image))), -1))
  for k, entry in enumerate(content):
    order = np.argsort(-ref[k])[:4]
    tops = entry.top_logprobs
    assert [t.token for t in tops] == [tokenizer.decode([int(i)]) for i in order]
    assert np.allclose([t.logprob for t in tops], ref[k, order], atol=TOL)  # sorted, descending
    assert entry.token == tokenizer.decode([int(order[0])])  # greedy: the most likely
    assert entry.logprob == pytest.approx(tops[0].logprob, abs=1e-6)
    for t, i in zip([entry, *tops], [order[0], *order]):
      piece = tokenizer.convert_ids_to_tokens(int(i))
      assert t.bytes == ([int(piece[3:5], 16)] if piece.startswith("<0x") else list(t.token.encode()))
  assert reply.choices[0].message.content  # the reply is there too

  chunks = list(c.chat.completions.create(model="tiny", messages=message(image), temperature=0,
                                          max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=4, stream=True,
                                          extra_body={"ignore_eos": True}))
  streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
  assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == \
      [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content]
  assert np.allclose([e.logprob for e in streamed], [e.logprob for e in content], atol=1e-5)
  for ch in chunks[1:]:  # every chunk with text carries the entries of its tokens
    if ch.choices and ch.choices[0].delta.content:
      assert ch.choices[0].logprobs.content
  assert chunks[0].choices[0].logprobs is None  # the role chunk


def _greedy_rows(setup, image):
  """transformers' greedy reply: MAX_TOKENS steps of argmax on the prompt + the reply so far (logits rows)."""
  proc, hf = setup["proc"], setup["hf"]
  inputs = proc(proc.prompt([QUESTION], image=True), [image])
  ids = inputs["input_ids"][0].tolist()
  rows = []
  for _ in range(MAX_TOKENS):
    row = hf_tiny.reference_logits(hf, np.asarray([ids]), inputs["pixel_values"])[0, -1]
    rows.append(row)
    ids.append(int(np.argmax(row)))
  return rows


def test_stop_cuts_the_reply_and_streamed_logprobs_still_add_up(setup):
  """A stop string cuts the text; every token's entry still comes (the held-back ones with the final chunk)."""
  image = serve_tiny.image(5)
  body = {"model": "tiny", "messages": message(image), "temperature": 0, "max_tokens": 16, "ignore_eos": True,
          "logprobs": True}
  full = post(setup, body).json()["choices"][0]["message"]["content"]
  words = [w for w in full.split() if len(w) >= 2]
  assert len(words) >= 2, f"the tiny model's reply is too short to test stop: {full!r}"
  stop = words[1][:2]
  cut = full[:full.find(stop)]
  plain = post(setup, {**body, "stop": [stop, "never appears"]}).json()
  assert plain["choices"][0]["message"]["content"] == cut
  assert plain["choices"][0]["finish_reason"] == "stop"
  entries = plain["choices"][0]["logprobs"]["content"]
  assert len(entries) == plain["usage"]["completion_tokens"]
  assert all(e["top_logprobs"] == [] for e in entries)  # logprobs without top_logprobs: none of the top ones
  with httpx.stream("POST", setup["url"] + "/v1/chat/completions", json={**body, "stop": stop, "stream": True},
                    trust_env=False, timeout=120) as r:
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
  assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == cut
  streamed = [e for ch in chunks if ch["choices"][0]["logprobs"] for e in ch["choices"][0]["logprobs"]["content"]]
  assert [e["token"] for e in streamed] == [e["token"] for e in entries]
  assert post(setup, {**body, "logprobs": False}).json()["choices"][0]["logprobs"] is None


def test_seed_makes_sampling_repeatable(setup):
  body = {"model": "tiny", "messages": message(None), "temperature": 1.0, "max_tokens": 12, "ignore_eos": True}
  replies = [post(setup, {**body, "seed": s}).json()["choices"][0]["message"]["content"] for s in (7, 7, 8, 9, 10)]
  assert replies[0] == replies[1]
  assert len(set(replies[1:])) > 1, "different seeds should sample different replies"


@pytest.mark.parametrize("bad, message_part", [
    ({"top_logprobs": 2}, "top_logprobs requires logprobs"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs requires logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer from 0 to 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs must be an integer"),
    ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs must be an integer"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs must be an integer"),
    ({"logprobs": 1}, "logprobs must be a bool"),
    ({"logprobs": "true"}, "logprobs must be a bool"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop must be"),
    ({"stop": 3}, "stop must be"),
])
def test_bad_values_are_400s(setup, bad, message_part):
  r = post(setup, {"model": "tiny", "messages": message(None), "max_tokens": 2, **bad})
  assert r.status_code == 400, r.text
  assert message_part in r.json()["error"]["message"]
