"""LoRA for the language model, kept outside the model's parameters: trained by `llava_jax.train`, merged into the
kernels when a training workdir is loaded for inference (`llava_jax.checkpoint`).

The adapters are their own tree, mirroring the paths of the kernels they adapt:
`{"language_model": {"layers": {0: {"self_attn": {"q_proj": {"lora_a": [in, r], "lora_b": [r, out]}}}}}}`, or with
the layers stacked as the kernels are (`{"layers": {"self_attn": {"q_proj": {"lora_a": [L, in, r], ...}}}}`).
Every linear layer of the LLM gets one (LLaVA's `find_all_linear_names`: not lm_head, not the projector, not the
vision tower). In the train step the adapters are attached to the model built there (`Dense.adapter`), which adds
`scale * dropout(x) @ A @ B` to the layer's output, as PEFT does; `merge` folds them into the kernels for export.
Init as PEFT: A ~ U(+-1/sqrt(in)) (kaiming_uniform with a=sqrt(5)), B = 0, so training starts at the base model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.sharding import logical_to_spec
from llava_jax.tree import LAYERS, get_path, is_stacked, relayout, set_path

TARGET_ROOT = "language_model"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, alpha and dropout of the adapters; `scale` (alpha / r) is what every use multiplies by."""

  r: int = 128
  alpha: float = 256.0
  dropout: float = 0.05

  @property
  def scale(self) -> float:
    return self.alpha / self.r


class LoraAdapter(nnx.Module):
  """scale * dropout(x) @ A @ B. A, B and the dropout key are Variables so layer stacks can scan over them."""

  def __init__(self, lora_a, lora_b, scale: float, dropout: float, key=None):
    self.lora_a, self.lora_b = nnx.Param(lora_a), nnx.Param(lora_b)
    self.key = nnx.Variable(key) if dropout > 0 and key is not None else None
    self.scale, self.dropout = scale, dropout

  def __call__(self, x):
    a, b = self.lora_a[...], self.lora_b[...]
    if self.key is not None:
      keep = jax.random.bernoulli(self.key[...], 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    return jnp.dot(jnp.dot(x, a.astype(x.dtype)), b.astype(x.dtype)) * self.scale


def target_paths(params: dict) -> list[tuple]:
  """Paths (into the model's params) of the modules LoRA adapts: every `kernel` under the language model."""
  paths = []

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, prefix + (k,))
      elif k == "kernel":
        paths.append(prefix)

  walk(params.get(TARGET_ROOT, {}), (TARGET_ROOT,))
  return sorted(paths, key=lambda p: tuple(str(x) for x in p))


def init(params: dict, r: int, key, dtype=jnp.float32) -> dict:
  """Fresh adapters for `params` (arrays or ShapeDtypeStructs), in the params' layer form with the same values
  whatever the form; works under jit and eval_shape."""
  if is_stacked(params):
    return relayout(init(relayout(params, stacked=False), r, key, dtype), stacked=True)
  adapters = {}
  for i, path in enumerate(target_paths(params)):
    *lead, d_in, d_out = get_path(params, path)["kernel"].shape  # lead: the layer axis of stacked kernels
    bound = 1.0 / d_in ** 0.5
    a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_in, r), dtype, -bound, bound)
    set_path(adapters, path, {"lora_a": a, "lora_b": jnp.zeros((*lead, r, d_out), dtype)})
  return adapters


def shardings(adapters: dict, kernel_axes: dict, mesh, rules) -> dict:
  """A takes the kernel's input axis, B its output axis (and both its layer axis); the rank stays whole."""

  def one(path, leaf_name, leaf):
    *lead, ax_in, ax_out = get_path(kernel_axes, path)["kernel"]
    axes = (*lead, ax_in, None) if leaf_name == "lora_a" else (*lead, None, ax_out)
    return jax.sharding.NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules))

  out = {}
  for path in _adapter_paths(adapters):
    node = get_path(adapters, path)
    set_path(out, path, {name: one(path, name, node[name]) for name in ("lora_a", "lora_b")})
  return out


def _adapter_paths(adapters: dict) -> list[tuple]:
  paths = []

  def walk(tree, prefix):
    if "lora_a" in tree:
      paths.append(prefix)
      return
    for k, v in tree.items():
      walk(v, prefix + (k,))

  walk(adapters, ())
  return sorted(paths, key=lambda p: tuple(str(x) for x in p))


def attach(model: nnx.Module, adapters: dict, scale: float, dropout: float = 0.0, key=None) -> None:
  """Attaches an adapter to each adapted Dense of `model` (built inside the train step, never saved). Each layer's
  dropout key is the same in either layer form."""
  order = {path: i for i, path in enumerate(_adapter_paths(relayout(adapters, stacked=False)))}
  for path in _adapter_paths(adapters):
    module = model
    for p in path:
      module = module[p] if isinstance(p, int) else getattr(module, p)
    node = get_path(adapters, path)
    layer_key = None
    if key is not None and path in order:
      layer_key = jax.random.fold_in(key, order[path])
    elif key is not None:  # a stacked module: one key per layer, as that layer's own module would get
      at = path.index(LAYERS) + 1
      layer_key = jnp.stack([jax.random.fold_in(key, order[path[:at] + (layer,) + path[at:]])
                             for layer in range(node["lora_a"].shape[0])])
    module.adapter = nnx.data(LoraAdapter(node["lora_a"], node["lora_b"], scale, dropout, layer_key))


def merge(params: dict, adapters: dict, scale: float) -> dict:
  """Base params with every adapter folded in: kernel + scale * A @ B (in fp32, stored in the kernel's dtype)."""
  params = jax.tree.map(lambda x: x, params)  # a copy of the dict structure; leaves are shared
  for path in _adapter_paths(adapters):
    node, module = get_path(adapters, path), get_path(params, path)
    kernel = module["kernel"]
    delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(node["lora_a"], jnp.float32),
                       jnp.asarray(node["lora_b"], jnp.float32), precision=jax.lax.Precision.HIGHEST)
    module["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
  return params
