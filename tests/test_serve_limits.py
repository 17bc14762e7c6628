"""`llava-jax serve` under hostile input: every request's memory is bounded by documented limits (body bytes, prompt
characters before tokenizing, padded pixels), every refusal is OpenAI's JSON error naming the reason, a reply stops
at the model's context, a client that leaves frees its row, and the serve flags are checked at startup."""

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import time
import types

import httpx
import pytest

import serve_tiny
from llava_jax import load_checkpoint
from llava_jax.cli import main as cli
from llava_jax.processor import Processor
from llava_jax.serve import serve_model
from llava_jax.serve.api import create_app
from llava_jax.serve.chat import MAX_IMAGE_PIXELS, check_image_size, max_chars_per_token
from llava_jax.serve.engine import BadRequest, Engine

CONTEXT = 512  # serve_tiny's max_position_embeddings
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_limits")
  ckpt = serve_tiny.make_checkpoint(root)
  model = load_checkpoint(ckpt)
  proc = Processor.from_model(model)
  images = root / "images"
  images.mkdir()
  serve_tiny.image(3).save(images / "local.png")
  (root / "secret.png").write_bytes(serve_tiny.png_bytes((8, 8)))
  os.symlink(root / "secret.png", images / "link.png")
  served = serve_model(model, proc, max_batch=2, max_tokens=512, model_name="tiny", allow_local_images=str(images),
                       max_body_bytes=BODY_LIMIT)
  with serve_tiny.Server(create_app(served)) as url:
    yield {"url": url, "proc": proc, "served": served, "root": root, "ckpt": ckpt, "images": images}
  served.engine.close()


def post(url, body, **kw) -> httpx.Response:
  content = body if isinstance(body, bytes) else json.dumps(body).encode()
  return httpx.post(url + "/v1/chat/completions", content=content, trust_env=False, timeout=120,
                    headers={"content-type": "application/json"}, **kw)


def ask(text, image_url=None, **params) -> dict:
  content = text if image_url is None else [{"type": "text", "text": text},
                                            {"type": "image_url", "image_url": {"url": image_url}}]
  return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0,
          **params}


def refused(r: httpx.Response, status: int, words: str) -> dict:
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert words in error["message"], error
  assert set(error) == {"message", "type", "param", "code"}
  return error


@pytest.fixture
def tracebacks():
  """The exceptions uvicorn logs (it logs an unhandled one with its traceback) while the test runs."""
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record) if record.exc_info else None
  logger = logging.getLogger("uvicorn.error")
  logger.addHandler(handler)
  yield records
  logger.removeHandler(handler)


def test_a_plain_request_whose_client_disconnects_is_cancelled(setup, monkeypatch):
  """Events come every step, far more often than the disconnect poll: the poll runs on a clock all the same."""
  engine = setup["served"].engine
  assert post(setup["url"], ask("Hi")).status_code == 200  # compiled: no pause in the events from here on
  step = engine._step
  monkeypatch.setattr(engine, "_step", lambda: (time.sleep(0.005), step())[1])  # ~2.5 s for the whole reply
  before = engine.metrics()
  body = json.dumps(ask("Tell me a long story.", max_tokens=512, temperature=1, ignore_eos=True)).encode()
  s = serve_tiny.raw_post(setup["url"], body)
  deadline = time.time() + 60
  while engine.metrics()["active_rows"] == 0 and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(0.3)
  s.close()
  while engine.metrics()["active_rows"] and time.time() < deadline:
    time.sleep(0.02)
  after = engine.metrics()
  assert after["cancelled"] == before["cancelled"] + 1
  assert after["generated_tokens"] - before["generated_tokens"] < 300


def test_a_body_over_the_limit_is_a_413_unread(setup):
  # Declared: answered from the header, the body never sent.
  s = serve_tiny.raw_post(setup["url"], b"", length=30_000_000)
  status, body = serve_tiny.read_response(s)
  s.close()
  assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
  # A client that sends it all still gets the answer; a chunked one is cut once past the limit.
  big = json.dumps(ask("x" * (BODY_LIMIT + 10))).encode()
  refused(post(setup["url"], big), 413, f"limit of {BODY_LIMIT}")
  chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
  refused(httpx.post(setup["url"] + "/v1/chat/completions", content=chunks, trust_env=False, timeout=120), 413,
          "--max-body-bytes")
  assert post(setup["url"], ask("Hi")).status_code == 200


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(setup, monkeypatch):
  served = setup["served"]
  limit = served.max_prompt_chars
  assert limit == CONTEXT * max_chars_per_token(setup["proc"].tokenizer)
  encoded = []
  encode = setup["proc"]._encode
  monkeypatch.setattr(setup["proc"], "_encode", lambda prompt, n: (encoded.append(len(prompt)), encode(prompt, n))[1])
  refused(post(setup["url"], ask("word " * (limit // 5 + 1))), 400, f"more than the {limit} that this server's "
          "context can hold")
  assert not encoded
  # Under the character bound the tokens decide, as before.
  refused(post(setup["url"], ask("word " * 600)), 400, "context")
  assert encoded


def test_the_character_bound_never_refuses_what_fits(setup):
  """Each token stands for at most `max_chars_per_token` characters of text, whatever the text."""
  tokenizer = setup["proc"].tokenizer
  most = max_chars_per_token(tokenizer)
  longest = max(tokenizer.get_vocab(), key=len)
  for text in ["word " * 50, " " * 300, "\n\n" * 100, "a" * 500, "éà漢字🙂" * 40,
               longest.replace("▁", " ") * 30, "<image>" * 20, "".join(chr(i) for i in range(32, 2000))]:
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) * most >= len(text), text[:20]


def test_the_pixel_budget_counts_the_padded_square(setup, tracebacks):
  for size in [(20000, 1), (50000, 1)]:
    side = max(size)
    refused(post(setup["url"], ask("What?", serve_tiny.png_uri(size))), 400,
            f"{size[0]}x{size[1]} padded to square is {side}x{side} = {side * side} pixels, over "
            f"max_image_pixels={MAX_IMAGE_PIXELS}")
  assert post(setup["url"], ask("What?", serve_tiny.png_uri((300, 20)))).status_code == 200
  assert not tracebacks


def test_the_budget_follows_the_preprocessing(setup):
  config = setup["proc"].image_config
  crop = types.SimpleNamespace(anyres=None, aspect_ratio="crop", image_config=config)
  with pytest.raises(BadRequest, match="resized for the model"):  # the short side grows to the tile
    check_image_size((200000, 2), "it", crop)
  check_image_size((20000, 100), "it", crop)  # 20000 x 100 -> 67200 x 336 pixels: under the limit
  next_ = types.SimpleNamespace(anyres=object(), aspect_ratio="pad", image_config=config)
  check_image_size((20000, 1), "it", next_)  # NeXT's canvases are the pinpoints': the decoded pixels count
  with pytest.raises(BadRequest, match="padded to square"):
    check_image_size((20000, 1), "it")


def test_an_image_over_the_pixel_limit_names_its_size(setup):
  refused(post(setup["url"], ask("What?", serve_tiny.png_uri((8000, 6000), "1"))), 400,
          f"8000x6000 = 48000000 pixels, over max_image_pixels={MAX_IMAGE_PIXELS}")


def test_deeply_nested_json_is_a_400(setup, tracebacks):
  for body in [b"[" * 100_000, b'{"a":' * 100_000, b'{"messages": ' + b"[" * 100_000]:
    refused(post(setup["url"], body), 400, "nested too deeply")
  assert not tracebacks


def test_a_reply_stops_at_the_models_context(setup):
  """As `llava-jax generate` lowers --max-new-tokens to what the prompt leaves of the context."""
  proc = setup["proc"]
  words = 104
  n = proc(proc.prompt(["word " * words], image=False))["input_ids"].shape[1]
  assert CONTEXT - 200 < n < CONTEXT, n
  r = post(setup["url"], ask("word " * words, max_tokens=200, ignore_eos=True))
  assert r.status_code == 200, r.text
  reply = r.json()
  assert reply["usage"]["prompt_tokens"] == n
  assert reply["usage"]["completion_tokens"] == CONTEXT - n
  assert reply["choices"][0]["finish_reason"] == "length"
  engine = setup["served"].engine
  assert engine.reply_limit(types.SimpleNamespace(input_ids=[0] * CONTEXT, max_tokens=9)) == 1


def test_local_paths_are_taken_from_the_allowed_folder(setup, tracebacks):
  images = setup["images"]
  assert os.getcwd() != str(images)
  for url in ["local.png", "./local.png", f"file://localhost{images}/local.png", f"file://{images}/local.png",
              f"file://localhost{images}/loc%61l.png"]:
    assert post(setup["url"], ask("What?", url)).status_code == 200, url
  for url in ["../secret.png", "link.png", f"{images}/../secret.png", "file://elsewhere/local.png"]:
    r = post(setup["url"], ask("What?", url))
    assert r.status_code == 400 and ("outside the allowed directory" in r.text or "not a local file" in r.text), url
  refused(post(setup["url"], ask("What?", "missing.png")), 400, "does not exist")
  assert not tracebacks


def test_a_half_sent_body_is_quiet(setup, tracebacks):
  body = json.dumps(ask("Hi")).encode()
  s = serve_tiny.raw_post(setup["url"], body, send=len(body) // 2)
  time.sleep(0.2)
  s.close()
  time.sleep(0.5)
  assert post(setup["url"], ask("Hi")).status_code == 200
  assert not tracebacks, [r.getMessage() for r in tracebacks]


@pytest.mark.parametrize("flags, words", [
    (["--max-batch", "0"], "--max-batch: 0 is not a positive integer"),
    (["--prompt-bucket", "0"], "--prompt-bucket: 0 is not a positive integer"),
    (["--max-tokens", "0"], "--max-tokens: 0 is not a positive integer"),
    (["--max-queue", "0"], "--max-queue: 0 is not a positive integer"),
    (["--max-len", "-1"], "--max-len: -1 is not a positive integer"),
    (["--max-body-bytes", "0"], "--max-body-bytes: 0 is not a positive integer"),
    (["--port", "70000"], "--port: 70000 is not a TCP port"),
    (["--max-len", "32"], "max_len 32 leaves no room"),
    # the paged KV memory's flags
    (["--page-size", "0"], "--page-size: 0 is not a positive integer"),
    (["--prefill-chunk", "0"], "--prefill-chunk: 0 is not a positive integer"),
    (["--decode-prefill-chunk", "0"], "--decode-prefill-chunk: 0 is not a positive integer"),
    (["--max-kv-tokens", "0"], "--max-kv-tokens: 0 is not a positive integer"),
    (["--prefix-cache-tokens", "-1"], "--prefix-cache-tokens: -1 is not 0 or more"),
    (["--image-cache", "-1"], "--image-cache: -1 is not 0 or more"),
    (["--max-len", "256", "--max-kv-tokens", "128"], "max_kv_tokens 128 cannot hold one row of max_len 256"),
    (["--allow-local-images", "/no/such/folder"], "is not a directory"),
    (["--host", ""], "--host must name an address"),
])
def test_serve_flags_are_checked_before_the_model_loads(flags, words, capsys, tmp_path):
  """A missing checkpoint: a flag that passed the checks would fail on it instead, never start a server."""
  try:
    code = cli(["serve", "--ckpt", str(tmp_path / "no-checkpoint"), *flags])
  except SystemExit as e:  # argparse's own errors
    code = e.code
  err = capsys.readouterr().err
  assert code == 2 and words in err and "Traceback" not in err, err


def test_the_engine_refuses_settings_it_cannot_run_with(setup):
  model = setup["served"].engine.model
  for kw in [{"max_batch": 0}, {"prompt_bucket": 0}, {"max_queue": 0}, {"max_len": 32}]:
    with pytest.raises(ValueError, match="max_|prompt_bucket"):
      Engine(model, **{"max_len": 64, "prompt_bucket": 32, **kw})


def vm_hwm(pid: int) -> int:
  """The process's peak resident memory in bytes."""
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.fixture
def server_process(setup, tmp_path):
  """`llava-jax serve` with its default limits in a process of its own, whose memory can be read."""
  port = serve_tiny.free_port()
  log = open(tmp_path / "server.log", "w")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "llava_jax.cli", "serve", "--ckpt", setup["ckpt"], "--port",
                           str(port), "--max-batch", "2", "--model-name", "tiny", "--allow-local-images",
                           str(setup["images"])], stdout=log, stderr=subprocess.STDOUT, env=env)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 180
    while True:
      assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()
      try:
        if httpx.get(url + "/health", trust_env=False, timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.2)
    yield proc, url, tmp_path / "server.log"
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=30)
    log.close()


RSS_GROWTH_BOUND = 256 * 2**20


def test_a_batch_of_hostile_requests(setup, server_process):
  """Each gets its documented answer, concurrently; the server's peak memory grows by less than
  RSS_GROWTH_BOUND (unbounded, the 20000x1 PNG alone took 1.5 GB and a 30 MB text 7 GB) and logs no traceback."""
  proc, url, log = server_process
  long_text = "word " * 104
  n = setup["proc"](setup["proc"].prompt([long_text], image=False))["input_ids"].shape[1]
  for warm in [ask("Hi"), ask("What?", serve_tiny.png_uri((40, 30))), ask(long_text, max_tokens=200)]:
    assert post(url, warm).status_code == 200  # compiled before the peak is read
  before = vm_hwm(proc.pid)

  def leave(send_all: bool):
    body = json.dumps(ask("Tell me a long story.", max_tokens=512, temperature=1, ignore_eos=True)).encode()
    s = serve_tiny.raw_post(url, body, send=None if send_all else len(body) // 2)
    time.sleep(0.3)
    s.close()
    return "left"

  cases = {
      "huge body": lambda: refused(post(url, json.dumps(ask("x" * 30_000_000)).encode()), 413, "--max-body-bytes"),
      "huge text": lambda: refused(post(url, ask("x" * 15_000_000)), 400, "that this server's context can hold"),
      "20000x1": lambda: refused(post(url, ask("?", serve_tiny.png_uri((20000, 1)))), 400, "padded to square"),
      "50000x1": lambda: refused(post(url, ask("?", serve_tiny.png_uri((50000, 1)))), 400, "padded to square"),
      "8000x6000": lambda: refused(post(url, ask("?", serve_tiny.png_uri((8000, 6000), "1"))), 400,
                                   "8000x6000 = 48000000 pixels"),
      "nested": lambda: refused(post(url, b"[" * 100_000), 400, "nested too deeply"),
      "outside": lambda: refused(post(url, ask("?", "../secret.png")), 400, "outside the allowed directory"),
      "context": lambda: post(url, ask(long_text, max_tokens=200, ignore_eos=True)).json(),
      "half body": lambda: leave(False),
      "disconnects": lambda: leave(True),
  }
  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    futures = {name: pool.submit(case) for name, case in cases.items()}
    results = {name: f.result(timeout=300) for name, f in futures.items()}
  reply = results["context"]
  assert (reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (CONTEXT - n, "length")
  assert post(url, ask("Hi")).status_code == 200
  deadline = time.time() + 60
  while httpx.get(url + "/metrics", trust_env=False).json()["active_rows"] and time.time() < deadline:
    time.sleep(0.1)
  growth = vm_hwm(proc.pid) - before
  assert growth < RSS_GROWTH_BOUND, f"peak memory grew by {growth / 2**20:.0f} MiB"
  assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
  print(f"peak memory grew by {growth / 2**20:.0f} MiB")


def test_the_web_page_keeps_the_same_limits(setup):
  from llava_jax.serve.web import reply_stream

  served = setup["served"]
  [text] = reply_stream(served, ["x" * (served.max_prompt_chars + 1)], None, 0.0, 1.0, 4)
  assert text.startswith("[error:") and "that this server's context can hold" in text
  wide = serve_tiny.Image.new("RGB", (20000, 1))
  [text] = reply_stream(served, ["What?"], wide, 0.0, 1.0, 4)
  assert text.startswith("[error:") and "padded to square" in text


def test_a_body_that_stalls_is_a_408(setup, monkeypatch):
  from llava_jax.serve import api

  monkeypatch.setattr(api, "BODY_TIMEOUT_S", 0.5)
  body = json.dumps(ask("Hi")).encode()
  s = serve_tiny.raw_post(setup["url"], body, send=len(body) // 2)  # and then nothing, the socket open
  status, answer = serve_tiny.read_response(s)
  s.close()
  assert status == 408 and "did not arrive in full" in json.loads(answer)["error"]["message"]
