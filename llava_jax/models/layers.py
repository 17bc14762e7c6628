"""Small building blocks shared by the vision tower and the decoder.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names ("embed", "mlp",
"heads", ...). Eager sharding is off for them: logical names are not mesh axes; `llava_jax.sharding` maps them
to the mesh by the rules in the config.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, init, shape, axes, dtype) -> nnx.Param:
  """A parameter initialised by `init(key, shape, dtype)`, tagged with logical axis names."""
  assert len(axes) == len(shape), (axes, shape)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); used where the reference starts from it."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def normal_init(std: float = 0.02):
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of torch's weight)."""

  def __init__(self, in_features: int, out_features: int, axes: tuple, *, use_bias: bool, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32, kernel_init=None):
    kernel_init = kernel_init or normal_init()
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = param(rngs, zeros_init, (out_features,), axes[1:], param_dtype) if use_bias else None
    self.dtype = dtype
    self.adapter = None  # optional module added to the output, adapter(x); LoRA attaches one in training

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.adapter is not None:
      y = y + self.adapter(x).astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm with statistics in fp32 (CLIP)."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    self.scale = param(rngs, ones_init, (dim,), ("norm",), param_dtype)
    self.bias = param(rngs, zeros_init, (dim,), ("norm",), param_dtype)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: normalise in fp32, cast back, then scale (the order HF uses, which matters in bf16)."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    self.scale = param(rngs, ones_init, (dim,), ("norm",), param_dtype)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied-head logits."""

  def __init__(self, num_embeddings: int, features: int, axes: tuple, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32):
    self.embedding = param(rngs, normal_init(), (num_embeddings, features), axes, param_dtype)
    self.dtype = dtype

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x, dtype=None):
    """Tied-head logits, computed in `dtype` (default: the compute dtype)."""
    dtype = dtype or self.dtype
    return jnp.dot(x.astype(dtype), self.embedding[...].astype(dtype).T)


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def over_position_pieces(fn, xs: tuple, chunk: int, fills: tuple):
  """`fn` applied to `chunk` positions (axis 1 of every x in `xs`, [B, T, ...]) at a time under `lax.scan`, each
  piece recomputed in the backward pass: a wide per-position computation (the MLP's hidden layer, the logits over
  the vocabulary) then keeps one piece's temporaries alive, not T's. The last piece is padded with `fills` (one per
  x). Returns fn's outputs stacked over pieces: [T / chunk (rounded up), ...]."""
  b, t = xs[0].shape[:2]
  pad = -t % chunk

  def pieces(x, fill):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

  body = jax.checkpoint(lambda carry, piece: (carry, fn(*piece)))
  return jax.lax.scan(body, None, tuple(pieces(x, f) for x, f in zip(xs, fills)))[1]
