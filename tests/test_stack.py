"""`run_layers` (models/stack.py) is one fold whatever the weights' form: a loop over per-layer modules and a scan
over stacked ones, each with or without remat, give the same outputs and gradients, per-layer inputs included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models.layers import Dense
from llava_jax.models.options import ModelOptions
from llava_jax.models.stack import is_stacked_module, make_layers, run_layers

LAYERS, WIDTH = 3, 4
FORMS = [(stacked, remat) for stacked in (False, True) for remat in ("none", "full", "dots_saveable")]


class Layer(nnx.Module):

  def __init__(self, rngs):
    self.dense = Dense(WIDTH, WIDTH, ("embed", "mlp"), use_bias=True, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x))


def layers_in(stacked: bool):
  return make_layers(lambda: Layer(nnx.Rngs(0)), LAYERS, stacked)


def call(layer, x, cache):
  """A layer that reads and writes a per-layer input, as the decoder does its KV cache."""
  x = layer(x) + cache
  return x, (x.sum(), cache * 2 + x)


def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, WIDTH)), jnp.float32)
  caches = [jnp.asarray(rng.standard_normal((2, 5, WIDTH)), jnp.float32) for _ in range(LAYERS)]
  return x, caches


def run(stacked: bool, remat: str, count=None):
  """(final x, each layer's outputs, d loss / d (x, caches, per-layer weights stacked))."""
  layers = layers_in(stacked)
  assert is_stacked_module(layers) == stacked
  graphdef, state = nnx.split(layers)
  options = ModelOptions(remat=remat)

  def loss(state, x, caches):
    x, outputs = run_layers(nnx.merge(graphdef, state), x, call, options, per_layer=caches, count=count)
    return jnp.sum(x ** 2) + sum(jnp.sum(jnp.sin(c)) for _, c in outputs), (x, outputs)

  x, caches = inputs()
  (_, (out, outputs)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(state, x, caches)
  weights = nnx.to_pure_dict(grads[0])
  if not stacked:  # {0: {...}, 1: ...} -> one [layers, ...] leaf per weight, as the stacked form holds them
    weights = jax.tree.map(lambda *a: jnp.stack(a), *[weights[i] for i in sorted(weights)])
  return out, outputs, (grads[1], grads[2], weights)


def assert_same(got, want):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
               got, want)


@pytest.mark.parametrize("stacked, remat", FORMS[1:], ids=[f"{'stacked' if s else 'list'}-{r}" for s, r in FORMS[1:]])
def test_every_form_and_policy_matches_the_plain_loop(stacked, remat):
  want = run(False, "none")
  got = run(stacked, remat)
  assert len(got[1]) == LAYERS
  assert_same(got, want)


@pytest.mark.parametrize("stacked", [False, True])
def test_count_runs_the_first_layers(stacked):
  out, outputs, _ = run(stacked, "full", count=2)
  assert len(outputs) == 2
  layers = list(layers_in(False))[:2]
  x, caches = inputs()
  for layer, cache in zip(layers, caches):
    x = layer(x) + cache
  assert_same(out, x)


@pytest.mark.parametrize("stacked", [False, True])
def test_remat_comes_from_the_options(stacked):
  layers = layers_in(stacked)
  x, caches = inputs()
  jaxpr = lambda remat: str(jax.make_jaxpr(
      lambda x: run_layers(layers, x, call, ModelOptions(remat=remat), per_layer=caches)[0])(x))
  remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).jaxpr.eqns[0].primitive.name + "["  # this jax's name
  assert jaxpr("full").count(remat) == (1 if stacked else LAYERS) and remat not in jaxpr("none")
  assert ("scan[" in jaxpr("none")) == stacked  # the form decides the loop
