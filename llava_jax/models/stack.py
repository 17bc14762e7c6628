"""Layer stacks: a list of layer modules run by a Python loop, or one module holding every layer's weights stacked
([layers, ...]) run by `lax.scan`, each optionally rematerialised, as the model's `ModelOptions` say.

Which form a model holds follows `ModelOptions.scan_layers`: scanned models keep their weights stacked, so a train
step never re-stacks them (a transient copy of the whole LLM per step otherwise). Checkpoint files, HF conversion
and the unscanned model (generation, parity tests) use one subtree per layer; `llava_jax.tree.relayout` converts
between the two, and only at load, save and export.
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


def run_layers(layers, x, call: Callable, options: ModelOptions, *, remat: str = "none",
               per_layer: Sequence | None = None, count: int | None = None):
  """x -> call(layer, x, per_layer[i]) for the first `count` (default: all) layers in order; `call` returns
  (new x, this layer's output).

  `layers` is a sequence of modules or a stacked module (`make_layers`). `per_layer` holds one input per layer (a
  KV cache), or None. Returns (x, [each layer's output]). `remat` is the policy for this stack.
  """
  if is_stacked_module(layers):
    graphdef, state = nnx.split(layers)
    total = jax.tree.leaves(state)[0].shape[0]
    count = total if count is None else count
    if count < total:
      state = jax.tree.map(lambda a: a[:count], state)
    take = lambda i: jax.tree.map(lambda a: a[i], state)
  else:
    layers = list(layers)[:count]
    count = len(layers)
    graphdef = nnx.graphdef(layers[0]) if layers else None
    state = None
    take = lambda i: nnx.state(layers[i])
  per_layer = [None] * count if per_layer is None else list(per_layer)
  if not count:
    return x, []
  sharding = options.activation_sharding
  if sharding is not None:
    pin = lambda y: jax.lax.with_sharding_constraint(y, sharding)
    call = lambda layer, y, extra, unpinned=call: (lambda out: (pin(out[0]), out[1]))(unpinned(layer, y, extra))
    x = pin(x)
  if state is None and not options.scan_layers and remat == "none":
    outputs = []
    for layer, extra in zip(layers, per_layer):
      x, y = call(layer, x, extra)
      outputs.append(y)
    return x, outputs

  def apply(x, layer_state, extra):
    return call(nnx.merge(graphdef, layer_state), x, extra)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  if options.scan_layers:
    stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    states = state if state is not None else stack([take(i) for i in range(count)])
    extras = None if per_layer[0] is None else stack(per_layer)

    def body(x, xs):
      layer_state, extra = xs
      return apply(x, layer_state, extra)

    x, ys = jax.lax.scan(body, x, (states, extras))
    return x, [jax.tree.map(lambda y, i=i: y[i], ys) for i in range(count)]
  outputs = []
  for i, extra in enumerate(per_layer):
    x, y = apply(x, take(i), extra)
    outputs.append(y)
  return x, outputs
