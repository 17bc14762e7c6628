"""The KV cache grows in buckets (`decoding.cache_schedule`): each decode step attends over the current cache size
(under twice the filled prefix), the compiled loop holds one step per size, and greedy tokens across several sizes,
with EOS inside a later size and left-padded rows, equal transformers' generate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_tiny
from hf_tiny import IMAGE_TOKEN
from llava_jax import decoding, generate, load_hf_checkpoint
from llava_jax.generation import stream
from llava_jax.padding import left_pad

N_IMG = 16
PAD = 0
NEW = 100  # after a 32-token prompt bucket: cache sizes 64, 96, 132
ROWS = [[1, 5, 7, 8, 9] + [IMAGE_TOKEN] * N_IMG + [9, 10, 11],
        [1] + [IMAGE_TOKEN] * N_IMG + [3],
        [1, 2, 3, 4] + [IMAGE_TOKEN] * N_IMG + [40, 41, 42, 43, 44, 45, 46]]


@pytest.mark.parametrize("prompt_len", [1, 20, 32, 100, 704, 1024, 4000])
@pytest.mark.parametrize("max_new", [1, 6, 31, 32, 33, 100, 512, 1024])
def test_schedule_reads_under_twice_the_filled_prefix(prompt_len, max_new):
  sizes = decoding.cache_schedule(prompt_len, max_new)
  assert sizes[-1] == prompt_len + max_new and list(sizes) == sorted(set(sizes)) and sizes[0] > prompt_len
  first_room = sizes[0] - prompt_len
  assert first_room >= min(max_new, max(decoding.FIRST_ROOM, prompt_len / 8))
  assert len(sizes) <= 1 + max(0, math.ceil(math.log2(max_new / decoding.FIRST_ROOM)))
  for i in range(1, max_new):  # the step that makes new token i writes slot prompt_len + i - 1 and reads its size
    size = next(s for s in sizes if s > prompt_len + i - 1)
    filled = prompt_len + i
    assert size - prompt_len <= max(first_room, 2 * i) and (size < 2 * filled or size == sizes[0])


def _while_cache_lengths(jaxpr) -> list[int]:
  """For every `while` in the program, in order: the cache lengths (the S of each [B, S, K, D] it carries)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      found.append(sorted({v.aval.shape[1] for v in eqn.outvars if len(v.aval.shape) == 4}))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _while_cache_lengths(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _while_cache_lengths(sub)
  return found


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2, max_position_embeddings=512,
                                                    vocab_size=128), seed=3)
  d = tmp_path_factory.mktemp("buckets")
  hf.save_pretrained(d)
  return hf, load_hf_checkpoint(str(d))


def test_the_compiled_loop_attends_over_each_cache_size(models):
  """One while loop per size of the schedule, each carrying (so attending over) caches of exactly that size."""
  _, ours = models
  ids, mask = left_pad(ROWS, PAD, 32)  # as generate pads them
  images = decoding.image_inputs(ours, ids, jnp.asarray(hf_tiny.pixels(3, seed=4)))
  graphdef, state = nnx.split(ours)
  traced = decoding.decode_loop.trace(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), images,
                                      decoding.seed_array(0), max_new_tokens=NEW, sampling=decoding.Sampling(),
                                      eos_ids=(), pad_id=PAD)
  assert decoding.cache_schedule(32, NEW) == (64, 96, 132)
  assert _while_cache_lengths(traced.jaxpr.jaxpr) == [[64], [96], [132]]


def test_greedy_across_cache_sizes_equals_transformers(models):
  hf, ours = models
  ids, mask = hf_tiny.left_padded(ROWS)
  px = hf_tiny.pixels(3, seed=4)
  ref = hf_tiny.greedy_generate(hf, ids, mask, px, NEW)
  got = generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=NEW, eos_token_id=(), pad_token_id=PAD)
  np.testing.assert_array_equal(got, ref)
  streamed = np.stack(list(stream(ours, ids, jnp.asarray(px), mask, max_new_tokens=NEW, eos_token_id=())), axis=1)
  np.testing.assert_array_equal(streamed, ref)


@pytest.mark.parametrize("rows, lo, hi", [(ROWS, 64, 98), (ROWS[:1], 32, 64)], ids=["batch", "one_row"])
def test_eos_inside_a_cache_size(models, rows, lo, hi):
  """Row 0's EOS is a token it first makes as new token lo + 1..hi: the batch's in the third size (tokens 1..32
  come from the first size, 33..64 the second, 65..99 the third); the row alone stops in the second, so the loop
  ends there and the cache never grows to the third."""
  hf, ours = models
  ids, mask = hf_tiny.left_padded(rows)
  px = hf_tiny.pixels(len(rows), seed=4)
  free = generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=NEW, eos_token_id=(), pad_token_id=PAD)[0]
  firsts = {int(tok): k for k, tok in reversed(list(enumerate(free)))}  # each token's first index in row 0
  eos, first = max(((tok, k) for tok, k in firsts.items() if lo < k <= hi), key=lambda item: item[1])
  ref = hf_tiny.greedy_generate(hf, ids, mask, px, NEW, eos=eos)
  got = generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
  np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
  assert (got[:, ref.shape[1]:] == PAD).all()
  assert got[0, first] == eos and (got[0, first + 1:] == PAD).all()
  streamed = np.stack(list(stream(ours, ids, jnp.asarray(px), mask, max_new_tokens=NEW, eos_token_id=eos)), axis=1)
  after_eos = np.cumsum(streamed == eos, axis=1) - (streamed == eos) > 0  # stream leaves done rows as they are
  np.testing.assert_array_equal(np.where(after_eos, PAD, streamed), got[:, :streamed.shape[1]])
