"""The one decoding core: a seeded sampled reply is the same through `generate`, `stream` and the serving engine;
the incremental detokenizer streams text that ends equal to the full decode (byte-fallback tokens, stop strings)
while decoding only a window of recent ids; the CLI shows exactly that text."""

import io
import types

import numpy as np
import pytest
import transformers

import hf_tiny
from llava_jax import generate, load_hf_checkpoint
from llava_jax.cli import _reply
from llava_jax.data.synthetic import build_tokenizer
from llava_jax.decoding import Detokenizer, byte_token_ids
from llava_jax.generation import stream
from llava_jax.serve.engine import Engine, Finished, QueueEvents, Request

NEW = 32  # new tokens; the engine's rows hold one 32-token prompt bucket plus these


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  d = tmp_path_factory.mktemp("decoding")
  hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2), seed=1).save_pretrained(d)
  return load_hf_checkpoint(str(d))


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.8, 0.9, 5), (1.2, 0.7, 0), (1.0, 1.0, 3)])
def test_seeded_sampling_is_one_definition(model, temperature, top_p, top_k):
  """generate, stream and the engine (sharing its batch with another request) draw the same tokens for a seed."""
  prompt, other = [1, 22, 23, 24, 25, 26], [1, 30, 31]
  kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=7, eos_token_id=())
  generated = generate(model, np.array([prompt]), max_new_tokens=NEW, **kw)[0]
  streamed = np.concatenate(list(stream(model, np.array([prompt]), max_new_tokens=NEW, **kw)))
  np.testing.assert_array_equal(streamed, generated)
  assert len(set(generated.tolist())) > 3  # really sampled, not one token over and over

  engine = Engine(model, max_batch=4, max_len=32 + NEW, prompt_bucket=32, eos_id=None,
                  decode=lambda ids: "".join(f"{i} " for i in ids))
  try:
    engine.pause()  # both requests join the same first step
    events = [QueueEvents(), QueueEvents()]
    for ids, seed, sink in ((other, 3, events[0]), (prompt, 7, events[1])):  # the prompt in row 1, not row 0
      engine.submit(Request(np.array(ids), max_tokens=NEW, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed), sink)
    engine.resume()
    finished = [[e for e in sink if isinstance(e, Finished)][0] for sink in events]
  finally:
    engine.close()
  assert [int(t) for t in finished[1].text.split()] == generated.tolist()
  assert engine.metrics()["rows_per_step"].get("2")


def test_greedy_is_argmax_everywhere(model):
  prompt = np.array([[1, 22, 23, 24]])
  greedy = generate(model, prompt, max_new_tokens=8, eos_token_id=())
  np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=8, eos_token_id=(), seed=5, top_k=2), greedy)


# -- the detokenizer --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = build_tokenizer(str(tmp_path_factory.mktemp("tok")))
  return transformers.AutoTokenizer.from_pretrained(folder)


def _byte_reply(tok) -> list[int]:
  """'Orange u', then the byte 'n' (shown at once by a whole-text decoder) that a following stray byte turns into
  two U+FFFD, a word, and a euro sign completed by its third byte token."""
  vocab = tok.get_vocab()
  byte = lambda b: vocab[f"<0x{b:02X}>"]  # noqa: E731
  words = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
  return words("Orange u") + [byte(0x6E), byte(0xA9)] + words(" rest") + [byte(0xE2), byte(0x82), byte(0xAC)] + \
      words(" end")


def test_byte_tokens_never_rewrite_shown_text(tokenizer):
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
  ids = _byte_reply(tokenizer)
  text = Detokenizer(decode, byte_tokens=byte_token_ids(tokenizer))
  deltas = [text.add(i) for i in ids] + [text.finish()]
  assert "".join(deltas) == text.text == decode(ids)
  assert "\u20ac" in text.text and "\ufffd" in text.text
  assert "Orange un" not in "".join(deltas)


def test_stop_strings_across_token_boundaries():
  pieces = {1: "Hel", 2: "lo #", 3: "# x", 4: "##", 5: " bye", 6: "#"}
  decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
  text = Detokenizer(decode, ["###", "</s>"])
  assert [text.add(i) for i in (1, 2)] == ["Hel", "lo "]  # "#" may start "###": held back
  assert text.add(3) == "## x" and not text.stopped  # "## x" is no stop: released
  assert text.add(6) == "" and text.add(4) == "" and text.stopped  # "#" + "##" completes one
  assert text.finish() == "" and text.text == "Hello ## x"
  assert text.add(5) == ""  # nothing after a stop

  short = Detokenizer(decode, ["###"])
  short.add(1), short.add(6)
  assert short.finish() == "#" and short.text == "Hel#"  # a held start of a stop string that never completed


def test_only_a_window_of_recent_ids_is_decoded(tokenizer):
  lengths = []

  def decode(ids):
    lengths.append(len(ids))
    return tokenizer.decode(ids, skip_special_tokens=True)

  ids = tokenizer.encode(" ".join(["the orange cat sat on a red mat"] * 20), add_special_tokens=False)
  ids += _byte_reply(tokenizer)
  text = Detokenizer(decode, ["###"], byte_token_ids(tokenizer))
  shown = "".join(text.add(i) for i in ids)
  assert len(ids) > 100 and max(lengths) <= 8  # two windows per token, never the whole reply
  assert shown + text.finish() == decode(ids) and lengths[-1] == len(ids)  # one full decode, at the end


def test_cli_shows_the_full_decode(tokenizer, monkeypatch):
  """`llava-jax generate` / `chat`: the printed reply ends equal to the reply's decode, byte tokens included."""
  ids = _byte_reply(tokenizer)
  monkeypatch.setattr("llava_jax.generation.stream", lambda *a, **k: iter(np.array([[i] for i in ids])))
  processor = _Processor(tokenizer)
  model = types.SimpleNamespace(config=types.SimpleNamespace(text=types.SimpleNamespace(max_position_embeddings=512)))
  args = types.SimpleNamespace(max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=0)
  out = io.StringIO()
  reply = _reply(model, processor, ["Hi"], None, args, out=out)
  expected = tokenizer.decode(ids, skip_special_tokens=True)
  assert out.getvalue() == expected + "\n" and reply == expected.strip()


class _Processor:
  """The processor's surface `_reply` uses, on a bare tokenizer."""
  template = types.SimpleNamespace(stop_str="</s>")

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def prompt(self, turns, image):
    return turns[-1]

  def decode(self, ids):
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def __call__(self, prompt, images=None):
    ids = np.array([self.tokenizer.encode(prompt)], np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": None}
