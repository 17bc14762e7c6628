"""Generation: greedy tokens equal transformers' generate; sampling is reproducible and draws from the right
distribution; the decode step compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation import logits_process as hf_lp

import hf_tiny
from hf_tiny import IMAGE_TOKEN
from llava_jax import decoding, generate, load_hf_checkpoint
from llava_jax.generation import stream
N_IMG = 16
PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2), seed=1)
  d = tmp_path_factory.mktemp("gen")
  hf.save_pretrained(d)
  return hf, load_hf_checkpoint(str(d))


PROMPTS = {
    "one_image": [[1, 5, 7] + [IMAGE_TOKEN] * N_IMG + [9, 10, 11]],
    "batch_of_different_lengths": [[1, 5, 7, 8, 9] + [IMAGE_TOKEN] * N_IMG + [9, 10, 11],
                                   [1] + [IMAGE_TOKEN] * N_IMG + [3],
                                   [1, 2, 3, 4] + [IMAGE_TOKEN] * N_IMG + [40, 41, 42, 43, 44, 45, 46]],
    "text_only_batch": [[1, 22, 23, 24, 25, 26], [1, 30]],
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_equals_transformers(models, name):
  hf, ours = models
  ids, mask = hf_tiny.left_padded(PROMPTS[name])
  n_images = int((ids == IMAGE_TOKEN).sum()) // N_IMG
  px = hf_tiny.pixels(n_images, seed=4) if n_images else None
  ref = hf_tiny.greedy_generate(hf, ids, mask, px, 32)
  got = generate(ours, ids, None if px is None else jnp.asarray(px), mask, max_new_tokens=32,
                 eos_token_id=(), pad_token_id=PAD)
  np.testing.assert_array_equal(got, ref)


def test_stops_at_eos_and_pads_like_transformers(models):
  hf, ours = models
  ids, mask = hf_tiny.left_padded(PROMPTS["batch_of_different_lengths"])
  px = hf_tiny.pixels(3, seed=4)
  free = generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=32, eos_token_id=())
  eos = int(free[0, 5])  # a token row 0 really produces, so generation stops there
  ref = hf_tiny.greedy_generate(hf, ids, mask, px, 32, eos=eos)
  got = generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=PAD)
  np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
  assert (got[:, ref.shape[1]:] == PAD).all()
  first = int(np.argmax(free[0] == eos))
  assert got[0, first] == eos and (got[0, first + 1:] == PAD).all()


def test_stream_equals_generate_and_decode_compiles_once_per_cache_size(models):
  _, ours = models
  ids, mask = hf_tiny.left_padded(PROMPTS["batch_of_different_lengths"])
  px = jnp.asarray(hf_tiny.pixels(3, seed=4))
  before = decoding.step_sample._cache_size()
  streamed = np.stack(list(stream(ours, ids, px, mask, max_new_tokens=40, eos_token_id=())), axis=1)
  assert streamed.shape == (3, 40)
  assert decoding.cache_schedule(32, 40) == (64, 72)  # the prompts' 32-token bucket: two cache sizes
  assert decoding.step_sample._cache_size() - before == 2  # 39 decode steps, one compile per cache size
  np.testing.assert_array_equal(streamed, generate(ours, ids, px, mask, max_new_tokens=40, eos_token_id=()))
  # Another prompt of the same padded shape reuses both compiled programs.
  compiled = decoding.decode_loop._cache_size()
  other = ids.copy()
  other[:, -1] = 33
  list(stream(ours, other, px, mask, max_new_tokens=40, eos_token_id=()))
  generate(ours, other, px, mask, max_new_tokens=40, eos_token_id=())
  assert decoding.step_sample._cache_size() - before == 2 and decoding.decode_loop._cache_size() == compiled


def test_sampling_is_reproducible(models):
  _, ours = models
  ids, mask = hf_tiny.left_padded(PROMPTS["text_only_batch"])
  kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, eos_token_id=())
  a = generate(ours, ids, None, mask, seed=3, **kw)
  np.testing.assert_array_equal(a, generate(ours, ids, None, mask, seed=3, **kw))
  assert not np.array_equal(a, generate(ours, ids, None, mask, seed=4, **kw))


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 0.6, 5), (0.9, 1.0, 4)])
def test_sampling_draws_from_transformers_distribution(temperature, top_p, top_k):
  """Empirical frequencies of 40k draws fit the distribution transformers' warpers define (chi-square), and
  nothing outside the kept set is ever drawn."""
  logits = np.random.default_rng(0).standard_normal((1, 12)).astype(np.float32) * 2
  scores = torch.from_numpy(logits)
  for warper in ([hf_lp.TemperatureLogitsWarper(temperature)] + ([hf_lp.TopKLogitsWarper(top_k)] if top_k else [])
                 + ([hf_lp.TopPLogitsWarper(top_p)] if top_p < 1 else [])):
    scores = warper(None, scores)
  expected = torch.softmax(scores, -1).numpy()[0].astype(np.float64)

  n = 40_000
  sampling = decoding.Sampling(temperature, top_p, top_k)
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(jax.vmap(lambda k: decoding.sample(jnp.asarray(logits), *sampling.rows(1), k[None])[0])(keys))
  counts = np.bincount(draws, minlength=12)
  kept = expected > 0
  assert counts[~kept].sum() == 0
  chi2 = stats.chisquare(counts[kept], expected[kept] / expected[kept].sum() * n)
  assert chi2.pvalue > 1e-3, (counts, expected * n)


def test_right_padding_is_refused(models):
  _, ours = models
  with pytest.raises(ValueError, match="left-padded"):
    generate(ours, np.array([[1, 2, 0]]), None, np.array([[1, 1, 0]]))


def test_stop_strings():
  assert decoding.stop_at("a cat.</s> more", ["</s>", "###"]) == ("a cat.", True)
  assert decoding.stop_at("a cat", ["###"]) == ("a cat", False)


def test_tensor_parallel_generation_equals_single_device(tmp_path):
  """Inference sharded over a mesh with the training shardings (here 8-way tensor parallel) gives the same tokens."""
  from flax import nnx

  from llava_jax.sharding import param_shardings

  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_attention_heads=8, num_key_value_heads=8, hidden_size=64,
                                                    intermediate_size=128), seed=2)
  hf.save_pretrained(tmp_path)
  model = load_hf_checkpoint(str(tmp_path))
  ids, mask = hf_tiny.left_padded(PROMPTS["batch_of_different_lengths"])
  px = jnp.asarray(hf_tiny.pixels(3, seed=4))
  expected = generate(model, ids, px, mask, max_new_tokens=12, eos_token_id=())

  mesh = jax.make_mesh((1, 1, 8), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  state = nnx.state(model, nnx.Param)
  sharded = jax.device_put(state, param_shardings(state, mesh))
  nnx.update(model, sharded)
  q = model.language_model.layers[0].self_attn.q_proj.kernel[...]
  assert q.addressable_shards[0].data.shape == (64, 64 // 8)  # really split over the tensor axis
  np.testing.assert_array_equal(generate(model, ids, px, mask, max_new_tokens=12, eos_token_id=()), expected)
