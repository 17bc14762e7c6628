"""Running a stack of identical layers: a Python loop, or `lax.scan` over the stacked layer weights, each
optionally rematerialised, as the model's `ModelOptions` say.

The defaults keep the plain loop, which generation and the parity tests use. Scanning compiles one layer instead
of N (compile time at 7B/13B). Weights stay one tree per layer (checkpoints and conversion are unchanged); the scan
stacks them on the fly, a transient copy of the layer weights (the per-layer casts to the compute dtype make such
copies anyway under bf16).
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


def run_layers(layers: Sequence[nnx.Module], x, call: Callable, options: ModelOptions, *, remat: str = "none",
               per_layer: Sequence | None = None):
  """x -> call(layer, x, per_layer[i]) for each layer in order; `call` returns (new x, this layer's output).

  `per_layer` holds one input per layer (a KV cache), or None. Returns (x, [each layer's output]). `remat` is the
  policy for this stack (the vision tower, which gets no gradient, passes "none").
  """
  per_layer = [None] * len(layers) if per_layer is None else list(per_layer)
  if not layers:
    return x, []
  sharding = options.activation_sharding
  if sharding is not None:
    pin = lambda y: jax.lax.with_sharding_constraint(y, sharding)
    call = lambda layer, y, extra, unpinned=call: (lambda out: (pin(out[0]), out[1]))(unpinned(layer, y, extra))
    x = pin(x)
  if not options.scan_layers and remat == "none":
    outputs = []
    for layer, extra in zip(layers, per_layer):
      x, y = call(layer, x, extra)
      outputs.append(y)
    return x, outputs

  graphdef = nnx.graphdef(layers[0])
  states = [nnx.state(layer) for layer in layers]

  def apply(x, state, extra):
    return call(nnx.merge(graphdef, state), x, extra)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  if options.scan_layers:
    stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    extras = None if per_layer[0] is None else stack(per_layer)

    def body(x, xs):
      state, extra = xs
      return apply(x, state, extra)

    x, ys = jax.lax.scan(body, x, (stack(states), extras))
    return x, [jax.tree.map(lambda y, i=i: y[i], ys) for i in range(len(layers))]
  outputs = []
  for state, extra in zip(states, per_layer):
    x, y = apply(x, state, extra)
    outputs.append(y)
  return x, outputs
