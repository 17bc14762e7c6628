"""Nested parameter dicts addressed by paths: the one home of the small tree helpers every module needs.

A params tree is a nested dict of arrays with int keys for layers (`nnx.to_pure_dict`'s form); a path is the tuple
of keys to a leaf, e.g. `("language_model", "layers", 0, "mlp", "up_proj", "kernel")`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator


def flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(path, leaf) for every leaf, depth first in key order."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def unflatten(items: Iterable[tuple[tuple, Any]]) -> dict:
  """The nested dict of (path, leaf) pairs: the inverse of `flatten`."""
  tree: dict = {}
  for path, value in items:
    set_path(tree, path, value)
  return tree


def get_path(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def set_path(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def keys_to_str(tree):
  """String keys throughout (what Orbax stores)."""
  return {str(k): keys_to_str(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def keys_to_int(tree):
  """Digit keys back to ints (layer indices), the inverse of `keys_to_str`."""
  if not isinstance(tree, dict):
    return tree
  return {(int(k) if isinstance(k, str) and k.isdigit() else k): keys_to_int(v) for k, v in tree.items()}


def dotted(path: tuple) -> str:
  """A path as transformers-style dotted text, for messages."""
  return ".".join(map(str, path))


def from_key_path(key_path) -> tuple:
  """A `jax.tree_util` key path (DictKey / SequenceKey entries) as a plain path tuple."""
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)


def check_tree(expected: dict, got: dict, where: str = "got") -> list[str]:
  """What keeps `got` ({path: shape}) from matching `expected` ({path: shape}): one line per missing, unexpected
  or wrongly shaped leaf, the shapes named `where` and "expected"; empty when they match."""
  problems = [f"missing {dotted(p)}" for p in expected if p not in got]
  problems += [f"unexpected {dotted(p)}" for p in got if p not in expected]
  problems += [f"wrong shape {dotted(p)}: {where} {tuple(got[p])}, expected {tuple(s)}"
               for p, s in expected.items() if p in got and tuple(got[p]) != tuple(s)]
  return problems


# -- layer stacks: one subtree per layer (checkpoint files, HF, generation) or one [L, ...] leaf per weight (scan) --

LAYERS = "layers"  # the key of a layer stack, wherever it sits (model params, LoRA adapters, optimizer moments)


def _is_index(key) -> bool:
  return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _stack_leaves(*leaves):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  first = leaves[0]
  if isinstance(first, jax.sharding.Sharding):
    return _with_spec(first, lambda spec: (None, *spec))
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = None if first.sharding is None else _stack_leaves(first.sharding)
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _take_leaf(leaf, i: int):
  import jax  # pylint: disable=import-outside-toplevel

  if isinstance(leaf, jax.sharding.Sharding):
    return _with_spec(leaf, lambda spec: spec[1:])
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = None if leaf.sharding is None else _take_leaf(leaf.sharding, i)
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[i]


def _with_spec(sharding, change):
  """A NamedSharding with its PartitionSpec changed (the layer axis is never split); other shardings as they are."""
  import jax  # pylint: disable=import-outside-toplevel

  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*change(tuple(sharding.spec))))


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields")


def relayout(tree, stacked: bool, counts: dict | None = None):
  """`tree` with every layer stack (a dict under the key "layers", at any depth, inside dicts, tuples and named
  tuples such as optax states) in the stacked form (one [L, ...] leaf per weight, what a scanned model holds) or the
  per-layer form ({0: {...}, 1: {...}}, what checkpoint files, HF and the unscanned model hold). Stacks already in
  that form are left alone. Leaves may be arrays, ShapeDtypeStructs or shardings (the layer axis is never split).

  `counts` ({key holding the stack: layers}, e.g. {"language_model": 32, "encoder": 24}) is only needed to unstack
  a stack without any array (an optimizer state whose frozen leaves are all masked)."""
  import jax  # pylint: disable=import-outside-toplevel

  def walk(node, parent):
    if isinstance(node, dict):
      out = {k: (walk(v, k) if k != LAYERS else v) for k, v in node.items()}
      if isinstance(out.get(LAYERS), dict):
        out[LAYERS] = convert(walk(out[LAYERS], LAYERS), parent)
      return out
    if _is_namedtuple(node):
      return type(node)(*(walk(v, parent) for v in node))
    if isinstance(node, (list, tuple)):
      return type(node)(walk(v, parent) for v in node)
    return node

  def convert(stack: dict, owner):
    per_layer = bool(stack) and all(_is_index(k) for k in stack)
    if stacked and per_layer:
      layers = [stack[k] for k in sorted(stack, key=int)]
      return jax.tree.map(_stack_leaves, *layers)
    if not stacked and not per_layer and stack:
      leaves = [x for x in jax.tree.leaves(stack) if hasattr(x, "shape")]
      if leaves:
        n = leaves[0].shape[0]
      elif counts is not None and owner in counts:
        n = counts[owner]
      else:
        raise ValueError(f"cannot unstack the layers under {owner!r}: no array gives their number; pass counts")
      return {i: jax.tree.map(lambda x, i=i: _take_leaf(x, i), stack) for i in range(n)}
    return stack

  return walk(tree, None)


def is_stacked(tree) -> bool | None:
  """Whether the first layer stack found in `tree` is stacked (True) or per layer (False); None without one."""
  if isinstance(tree, dict):
    stack = tree.get(LAYERS)
    if isinstance(stack, dict) and stack:
      return not all(_is_index(k) for k in stack)
    children = tree.values()
  elif isinstance(tree, (list, tuple)):
    children = tree
  else:
    return None
  for child in children:
    found = is_stacked(child)
    if found is not None:
      return found
  return None
