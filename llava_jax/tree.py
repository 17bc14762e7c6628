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
