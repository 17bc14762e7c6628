"""Layer stacks: a list of layer modules run by a Python loop, or one module holding every layer's weights stacked
([layers, ...]) run by `lax.scan`, each optionally rematerialised, as the model's `ModelOptions` say.

Which form a model holds follows `ModelOptions.scan_layers`; `run_layers` runs the form it is given. Scanned models
keep their weights stacked, so a train step never re-stacks them (a transient copy of the whole LLM per step
otherwise). Checkpoint files, HF conversion and the unscanned model (generation, parity tests) use one subtree per
layer; `llava_jax.tree.relayout` converts between the two, and only at load, save and export.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.options import ModelOptions

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}
LAYER_AXIS = "layers"  # the logical name of the stacked axis: no sharding rule names it, so it is never split


def make_layers(make: Callable[[], nnx.Module], count: int, stacked: bool):
  """`count` layers from `make()`, in order (so their initial weights do not depend on the form): an `nnx.List`, or
  one module whose Variables hold the layers' values stacked on a leading axis named `LAYER_AXIS`."""
  layers = [make() for _ in range(count)]
  if not stacked:
    return nnx.List(layers)
  graphdef, _ = nnx.split(layers[0])

  def stack(*variables):
    axes = variables[0].get_metadata().get("out_sharding")
    metadata = {} if axes is None else {"out_sharding": (LAYER_AXIS, *axes)}
    return variables[0].replace(jnp.stack([v.get_value() for v in variables]), **metadata)

  states = [nnx.state(layer) for layer in layers]
  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def is_stacked_module(layers) -> bool:
  return isinstance(layers, nnx.Module) and not isinstance(layers, nnx.List)


def run_layers(layers, x, call: Callable, options: ModelOptions, *, per_layer: Sequence | None = None,
               count: int | None = None):
  """x -> call(layer, x, per_layer[i]) for the first `count` (default: all) layers in order; `call` returns
  (new x, this layer's output). Returns (x, [each layer's output]).

  `layers` is a list of modules or a stacked module (`make_layers`); both run the same step, a Python loop over
  the list, `lax.scan` over the stacked weights. `per_layer` holds one input per layer (a KV cache), or None.
  From `options`: the remat policy of every layer and the sharding pinned at each layer boundary.
  """
  stacked = is_stacked_module(layers)
  if stacked:
    graphdef, state = nnx.split(layers)
    total = jax.tree.leaves(state)[0].shape[0]
    count = total if count is None else min(count, total)
    state = state if count == total else jax.tree.map(lambda a: a[:count], state)
  else:
    layers = list(layers)[:count]
    count = len(layers)
  if not count:
    return x, []
  per_layer = [None] * count if per_layer is None else list(per_layer)[:count]
  step = _layer_step(call, options)
  x = _pin(x, options)
  if stacked:
    extras = None if per_layer[0] is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    x, ys = jax.lax.scan(lambda x, xs: step(graphdef, x, *xs), x, (state, extras))
    return x, [jax.tree.map(lambda y, i=i: y[i], ys) for i in range(count)]
  outputs = []
  for layer, extra in zip(layers, per_layer):
    graphdef, state = nnx.split(layer)
    x, y = step(graphdef, x, state, extra)
    outputs.append(y)
  return x, outputs


def _pin(x, options: ModelOptions):
  sharding = options.activation_sharding
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _layer_step(call: Callable, options: ModelOptions):
  """(graphdef, weights, x, extra) -> (x, output): one layer rebuilt from its weights and called, its new x pinned,
  the whole under `jax.checkpoint` with the options' remat policy (the weights are an argument, so the backward
  pass recomputes from them whichever form they came in)."""

  def step(graphdef, x, state, extra):
    x, y = call(nnx.merge(graphdef, state), x, extra)
    return _pin(x, options), y

  if options.remat == "none":
    return step
  return jax.checkpoint(step, policy=REMAT_POLICIES[options.remat], static_argnums=(0,))
