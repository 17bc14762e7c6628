"""Logical axis names -> mesh axes. Models name their parameter axes ("embed", "mlp", "heads", ...); rules, kept in
the config, say which mesh axes ("data", "fsdp", "tensor") each name is split over. No mesh axis name appears in
model code.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax.tree import unflatten

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


def _logical_axes(var: nnx.Variable) -> tuple:
  """A Variable's logical axis names (`out_sharding` metadata), None for each dimension where it has none."""
  return tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape))


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every Variable in `state` that carries logical axis names (`out_sharding` metadata)."""

  def one(var):
    return var.replace(NamedSharding(mesh, logical_to_spec(_logical_axes(var), var.get_value().shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def logical_axes_tree(state: nnx.State) -> dict:
  """Logical axis names of every Variable, nested like `nnx.to_pure_dict(state)`: for trees that follow the
  params' layout without being Variables (LoRA adapters take their kernel's axes)."""
  return unflatten((path, _logical_axes(var)) for path, var in nnx.to_flat_state(state))


# -- meshes, rules and batches from the config ----------------------------------------------------------------


class MeshError(ValueError):
  """A mesh shape that does not fit the devices."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one -1 replaced by the devices left; checks the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise MeshError(f"mesh {shape}: give {len(MESH_AXES)} sizes for {MESH_AXES}, each positive or one of them -1 "
                    f"(takes the remaining devices), e.g. --config.mesh='(-1, 1, 1)'")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f"mesh {shape}: the fixed axes ({known} devices) do not divide the {num_devices} devices; "
                      f"change --config.mesh so that their product divides {num_devices}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise MeshError(f"mesh {shape} of {MESH_AXES} needs {math.prod(shape)} devices but there are {num_devices}; "
                    f"change --config.mesh so that the sizes multiply to {num_devices} (or set one to -1)")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes (see docs/DESIGN_NOTES.md)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
  """Normalises rules given as [(logical name, mesh axis | [mesh axes] | None), ...] and checks the names."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"sharding rule {rule!r}: expected (logical name, mesh axes)")
    name, axes = rule
    axes = None if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    unknown = [a for a in axes or () if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"sharding rule for {name!r} names mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    out.append((str(name), axes))
  return tuple(out)


def _axis_sizes(mesh) -> Mapping[str, int]:
  return mesh.shape if isinstance(mesh, jax.sharding.Mesh) else dict(zip(MESH_AXES, mesh))


def batch_axes(mesh: jax.sharding.Mesh | Sequence[int], rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (the logical name `batch`). `mesh` may be a mesh shape
  (data, fsdp, tensor), so that a config can be checked before any mesh is made."""
  axes, sizes = dict(rules).get("batch") or (), _axis_sizes(mesh)
  return tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in sizes)


def batch_shards(mesh: jax.sharding.Mesh | Sequence[int], rules=DEFAULT_RULES) -> int:
  """How many pieces the batch is cut into: every per-step batch must be a multiple of this."""
  sizes = _axis_sizes(mesh)
  return math.prod(sizes[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) dimension split by the `batch` rule, the rest replicated."""
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> dict:
  """Host-local numpy batch (this host's rows) -> global arrays; every host passes its own, equal-sized share."""
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim, rules), local,
                                                      global_shape)
  return out
