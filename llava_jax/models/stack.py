"""Running a stack of identical layers: a Python loop, or `lax.scan` over the stacked layer weights, each
optionally rematerialised.

Training sets these knobs on the model (`configure_layers`); the defaults keep the plain loop, which generation
and the parity tests use. Scanning compiles one layer instead of N (compile time at 7B/13B). Weights stay one
tree per layer (checkpoints and conversion are unchanged); the scan stacks them on the fly, a transient copy of
the layer weights (the per-layer casts to the compute dtype make such copies anyway under bf16).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}


def configure_layers(module: nnx.Module, *, scan: bool = False, remat: str = "none",
                     activation_sharding=None) -> None:
  """Sets the layer-stack knobs on `module` (a LlamaModel or CLIPVisionTower); read by their `__call__`.

  `activation_sharding` (a jax Sharding of the [batch, length, features] hidden state) pins the hidden state at
  every layer boundary. Without it XLA's propagation may give up the batch split for the FSDP split of the
  weights (both use the fsdp axis) and keep whole-batch activations on every device.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  module.scan_layers, module.remat_policy = bool(scan), remat
  module.activation_sharding = activation_sharding


def run_layers(module: nnx.Module, layers: Sequence[nnx.Module], x, call: Callable, keep_outputs: bool = False):
  """x -> call(layer, x) for each layer in order, as `module`'s knobs say.

  Returns (x, the output of every layer if `keep_outputs`, else None). `call` must return the new x only.
  """
  scan, remat = getattr(module, "scan_layers", False), getattr(module, "remat_policy", "none")
  if not layers:
    return x, ([] if keep_outputs else None)
  sharding = getattr(module, "activation_sharding", None)
  if sharding is not None:
    pin = lambda y: jax.lax.with_sharding_constraint(y, sharding)
    call = lambda layer, y, unpinned=call: pin(unpinned(layer, y))
    x = pin(x)
  if not scan and remat == "none":
    outputs = []
    for layer in layers:
      x = call(layer, x)
      outputs.append(x)
    return x, (outputs if keep_outputs else None)

  graphdef = nnx.graphdef(layers[0])
  states = [nnx.state(layer) for layer in layers]

  def apply(x, state):
    return call(nnx.merge(graphdef, state), x)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  if scan:
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(x, state):
      x = apply(x, state)
      return x, (x if keep_outputs else None)

    x, ys = jax.lax.scan(body, x, stacked)
    return x, ([ys[i] for i in range(len(layers))] if keep_outputs else None)
  outputs = []
  for state in states:
    x = apply(x, state)
    outputs.append(x)
  return x, (outputs if keep_outputs else None)
