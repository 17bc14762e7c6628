"""Logical axis names -> mesh axes. Models name their parameter axes ("embed", "mlp", "heads", ...); rules, kept in
the config, say which mesh axes ("data", "fsdp", "tensor") each name is split over. No mesh axis name appears in
model code.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Megatron-style tensor parallelism over the head / MLP / vocabulary dimensions, FSDP over the model dimension.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec for an array whose dimensions carry logical names `axes`.

  A dimension that the mapped mesh axes do not divide stays whole (e.g. a 32064-row vocabulary on 128 devices);
  a mesh axis is used at most once per array; names without a rule are replicated.
  """
  table = dict(rules)
  used, spec = set(), []
  for name, size in zip(axes, shape):
    mesh_axes = table.get(name) if name is not None else None
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every Variable in `state` that carries logical axis names (`out_sharding` metadata)."""

  def one(var):
    value = var.get_value()
    axes = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
