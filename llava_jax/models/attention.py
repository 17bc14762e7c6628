"""The one attention entry point. `impl="xla"` is plain einsum attention with the softmax in fp32; fused
kernels (cuDNN, Pallas splash) plug in here without touching the models."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn")


def dot_product_attention(q, k, v, mask=None, *, scale: float, impl: str = "xla"):
  """Grouped-query attention.

  q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; mask: bool, broadcastable to [B, 1, T, S], True where
  a query may attend. A row with nothing to attend to (a padding query) yields finite garbage, never NaN.
  """
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  if impl != "xla":
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))[:, :, None]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)
