"""The one attention entry point, with four implementations that compute the same function:

- `xla`: einsum attention with the softmax in fp32; materialises the [T, S] scores (the reference). Under a
  causal self-attention mask it takes the queries `XLA_QUERY_BLOCK` at a time against only the keys they can see
  (`causal_xla_attention`): about half the work.
- `cudnn`: `jax.nn.dot_product_attention`'s cuDNN kernel (GPU only).
- `blockwise`: plain JAX, any backend. Keys in blocks with an online softmax (flash attention's recurrence) and a
  custom VJP that recomputes each block's probabilities from the saved log-sum-exp, so neither pass keeps more
  than [T, block] scores per head.
- `splash`: the Pallas TPU splash-attention kernel (causal or full mask, segment ids, GQA); off TPU it runs in
  Pallas interpret mode (slow: for tests only). Under a multi-device mesh it runs in `shard_map` (batch, heads).

Masks come in two forms. A dense bool array [B, 1, T, S] (`causal_mask`) serves every case, including generation
with a KV cache. `SelfAttentionMask` describes the mask of a full forward pass (queries are the keys, no cache) by
the row's padding and segments, so the kernels never build [T, S]: `Llava.__call__` passes it, and
`LlamaModel` builds the dense form once, before the layers, for `xla`/`cudnn` (`prepare_mask`).
`splash` takes only the structured form (and no mask, for the vision tower); given a dense mask (generation's
prefill and decode steps, T = 1 with a cache) it uses the `xla` path: splash is for training and full forwards.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "blockwise", "splash")
BLOCKWISE_KEY_BLOCK = 512   # keys per step of `blockwise`; measured on CPU in docs/PERFORMANCE.md
XLA_QUERY_BLOCK = 256       # queries per piece of `causal_xla_attention`; measured on CPU in docs/PERFORMANCE.md
SPLASH_MAX_BLOCK = 512      # splash's q/kv tile; the sequence is padded to a multiple of the tile (>= 128)
_NEG = float(jnp.finfo(jnp.float32).min)
_PAD_ID, _TAIL_ID = -1, -2  # segment ids of left/packing padding and of the kernels' own tail padding


def causal_mask(key_valid, query_len: int, query_offset=0, segment_ids=None, sliding_window=None):
  """bool [B, 1, T, S]: query i (at key slot `query_offset + i`) sees the valid keys at or before it (and, with a
  `sliding_window` (Mistral v0.1), fewer than that many slots back), and, for packed rows (`segment_ids` [B, T],
  T == S), only its own segment."""
  s = key_valid.shape[-1]
  query_slot = (jnp.arange(query_len) + query_offset)[:, None]
  causal = jnp.arange(s)[None, :] <= query_slot  # [T, S]
  if sliding_window is not None:
    causal = causal & (jnp.arange(s)[None, :] > query_slot - sliding_window)
  mask = causal[None] & key_valid.astype(bool)[:, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask[:, None]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["key_valid", "segment_ids", "materialised"],
                   meta_fields=["sliding_window"])
@dataclasses.dataclass(frozen=True)
class SelfAttentionMask:
  """The causal mask of a full forward pass, described instead of materialised: key_valid bool [B, T] (False at
  padding), segment_ids int [B, T] for packed rows or None, and Mistral's sliding window or None. `materialised`
  holds `dense()` once `prepare_mask` has built it for the layers."""
  key_valid: jax.Array
  segment_ids: jax.Array | None = None
  sliding_window: int | None = None
  materialised: jax.Array | None = None

  def dense(self):
    if self.materialised is not None:
      return self.materialised
    return causal_mask(self.key_valid, self.key_valid.shape[-1], 0, self.segment_ids, self.sliding_window)

  def row_ids(self):
    """int32 [B, T]: each token's segment, `_PAD_ID` at padding. A query may see key j <= i with the same id:
    for a real query exactly the dense mask; a padding query sees padding keys (never an empty row)."""
    ids = jnp.ones(self.key_valid.shape, jnp.int32) if self.segment_ids is None else self.segment_ids
    return jnp.where(self.key_valid.astype(bool), ids.astype(jnp.int32), _PAD_ID)


def prepare_mask(mask, impl: str):
  """The mask the layers get: dense for `xla`/`cudnn` (built once, not per layer; `xla` keeps it in the
  `SelfAttentionMask`, whose causality it uses), as given for the kernels."""
  if isinstance(mask, SelfAttentionMask) and impl == "xla":
    return dataclasses.replace(mask, materialised=mask.dense())
  if isinstance(mask, SelfAttentionMask) and impl == "cudnn":
    return mask.dense()
  return mask


def dot_product_attention(q, k, v, mask=None, *, scale: float, impl: str = "xla"):
  """Grouped-query attention.

  q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; mask: None (all keys), a `SelfAttentionMask`
  (T == S), or bool broadcastable to [B, 1, T, S], True where a query may attend. A row with nothing to attend to
  (a padding query) yields finite garbage, never NaN; padding queries' outputs differ between implementations.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
  if impl == "splash" and (mask is None or isinstance(mask, SelfAttentionMask)):
    return splash_attention(q, k, v, mask, scale=scale)
  if impl == "blockwise":
    return blockwise_attention(q, k, v, mask, scale=scale)
  if impl == "xla" and isinstance(mask, SelfAttentionMask):
    return causal_xla_attention(q, k, v, mask.dense(), scale=scale)
  if isinstance(mask, SelfAttentionMask):
    mask = mask.dense()
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  return xla_attention(q, k, v, mask, scale=scale)


def xla_attention(q, k, v, mask=None, *, scale: float):
  """The reference: all scores at once, softmax in fp32."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  return _softmax_times_v(logits, v, mask, "bkgts,bskd->btkgd").astype(v.dtype).reshape(b, t, h, d)


def _softmax_times_v(logits, v, mask, product: str):
  """softmax(logits) @ v for scores [B, K, G, T, S] in fp32 and a mask broadcastable to [B, 1, T, S].

  The softmax is normalised after the product with V (a [T, D] divide instead of a [T, S] one): the same function,
  and 4% off the mid model's CPU train step, where XLA runs the [T, S] elementwise passes on one thread."""
  if mask is not None:
    mask = jnp.broadcast_to(mask, (logits.shape[0], 1) + logits.shape[-2:])[:, :, None]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, _NEG)
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  total = jnp.sum(weights, axis=-1)[..., None]  # [B, K, G, T, 1]
  if product.endswith("btkgd"):
    total = jnp.moveaxis(total, 3, 1)  # [B, T, K, G, 1]
  return jnp.einsum(product, weights.astype(v.dtype), v, preferred_element_type=jnp.float32) / total


def causal_xla_attention(q, k, v, mask, *, scale: float, block: int | None = None):
  """`xla_attention` under a causal self-attention mask (T == S, query i at key slot i): queries `block` at a time,
  each piece against only the keys up to its last query. The keys left out are masked for every query of the
  piece, so the function is the same (a padding query with no visible key gets other garbage), with about half
  the [T, T] work and memory: fwd + bwd 2.1x faster at 1024 tokens, 2.8x at 2048 on CPU (docs/PERFORMANCE.md).

  q, k and v go to head-major layout ([B, K, G, T, D], [B, K, S, D]) once, before the pieces: every piece's two
  products then read their operands in place, where per-piece einsums over [B, T, H, D] slices made XLA copy each
  piece's queries and each piece's key prefix (2.5x the keys at 1024 tokens) into that layout, and their
  gradients back, in the forward and again in the backward (docs/PERFORMANCE.md, "The backward's layout copies")."""
  b, t, h, d = q.shape
  block = block or XLA_QUERY_BLOCK
  if t <= block:
    return xla_attention(q, k, v, mask, scale=scale)
  kv_heads = k.shape[2]
  qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                 # [B, K, S, D]
  pieces = []
  for start in range(0, t, block):
    end = min(start + block, t)
    logits = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, start:end], kh[:, :, :end],
                        preferred_element_type=jnp.float32) * scale
    pieces.append(_softmax_times_v(logits, vh[:, :, :end], mask[:, :, start:end, :end], "bkgts,bksd->bkgtd"))
  out = jnp.concatenate(pieces, axis=3).astype(v.dtype)  # [B, K, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# -- blockwise: plain JAX, online softmax over key blocks, custom VJP ---------------------------------------------


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def blockwise_attention(q, k, v, mask=None, *, scale: float, block: int = BLOCKWISE_KEY_BLOCK):
  """Memory-efficient attention in plain JAX: the same function as `xla_attention`, keys `block` at a time."""
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  block = min(block, s)
  padded = _round_up(s, block)
  if padded != s:
    pad = ((0, 0), (0, padded - s), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  # The mask as arrays the custom VJP carries (no gradient) and a static description of how to read them.
  if mask is None:
    kind, arrays = ("none", None), ()
  elif isinstance(mask, SelfAttentionMask):
    if t != s:
      raise ValueError(f"a SelfAttentionMask needs as many queries as keys, got {t} and {s}")
    ids = mask.row_ids()
    kind, arrays = ("self", mask.sliding_window), (ids, jnp.pad(ids, ((0, 0), (0, padded - s)),
                                                               constant_values=_TAIL_ID))
  else:
    dense = jnp.asarray(mask, bool)
    dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
    dense = jnp.broadcast_to(dense, dense.shape[:2] + (t, s))
    kind, arrays = ("dense", None), (jnp.pad(dense, ((0, 0), (0, 0), (0, 0), (0, padded - s))),)
  out = _blockwise(q.reshape(b, t, kv_heads, h // kv_heads, d), k, v, arrays, kind, float(scale), s, block)
  return out.reshape(b, t, h, d)


def _block_mask(arrays, kind, start, block: int, t: int, s: int):
  """bool, broadcastable to the [B, K, G, T, block] scores of keys start..start+block, or None (all visible)."""
  key_slot = start + jnp.arange(block)
  name, window = kind
  if name == "none":
    return None if s % block == 0 else (key_slot < s)[None, None, None, None, :]
  if name == "dense":
    dense = jax.lax.dynamic_slice_in_dim(arrays[0], start, block, axis=3)  # [B or 1, 1, T, block]
    return dense[:, :, None]
  query_ids, key_ids = arrays
  key_ids = jax.lax.dynamic_slice_in_dim(key_ids, start, block, axis=1)  # [B, block]
  query_slot = jnp.arange(t)[:, None]
  visible = key_slot[None, :] <= query_slot  # [T, block]
  if window is not None:
    visible = visible & (key_slot[None, :] > query_slot - window)
  visible = visible[None] & (query_ids[:, :, None] == key_ids[:, None, :])  # [B, T, block]
  return visible[:, None, None]


def _key_blocks(x, block: int):
  """[B, S, K, D] -> [S / block, B, block, K, D]: the scan's leading axis."""
  b, s, kv_heads, d = x.shape
  return jnp.moveaxis(x.reshape(b, s // block, block, kv_heads, d), 1, 0)


def _scores(q, k_block, mask, scale):
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_block, preferred_element_type=jnp.float32) * scale
  return logits if mask is None else jnp.where(mask, logits, _NEG)


def _blockwise_forward(q, k, v, arrays, kind, scale, s, block):
  b, t, kv_heads, groups, d = q.shape
  starts = jnp.arange(k.shape[1] // block) * block

  def step(carry, xs):
    running_max, total, acc = carry
    k_block, v_block, start = xs
    logits = _scores(q, k_block, _block_mask(arrays, kind, start, block, t, s), scale)
    new_max = jnp.maximum(running_max, logits.max(-1))
    probs = jnp.exp(logits - new_max[..., None])
    rescale = jnp.exp(running_max - new_max)
    total = rescale * total + probs.sum(-1)
    acc = rescale[..., None] * acc + jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v_block,
                                                preferred_element_type=jnp.float32)
    return (new_max, total, acc), None

  init = (jnp.full((b, kv_heads, groups, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv_heads, groups, t), jnp.float32),
          jnp.zeros((b, kv_heads, groups, t, d), jnp.float32))
  (running_max, total, acc), _ = jax.lax.scan(step, init, (_key_blocks(k, block), _key_blocks(v, block), starts))
  out = jnp.einsum("bkgtd->btkgd", acc / total[..., None]).astype(q.dtype)
  return out, running_max + jnp.log(total)  # out [B, T, K, G, D], log-sum-exp [B, K, G, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _blockwise(q, k, v, arrays, kind, scale, s, block):
  return _blockwise_forward(q, k, v, arrays, kind, scale, s, block)[0]


def _blockwise_fwd(q, k, v, arrays, kind, scale, s, block):
  out, logsumexp = _blockwise_forward(q, k, v, arrays, kind, scale, s, block)
  return out, (q, k, v, arrays, out, logsumexp)


def _blockwise_bwd(kind, scale, s, block, residuals, d_out):
  """Flash attention's backward: per key block, probabilities from the saved log-sum-exp, then dV, dS, dQ, dK."""
  q, k, v, arrays, out, logsumexp = residuals
  t = q.shape[1]
  d_out32 = d_out.astype(jnp.float32)
  delta = jnp.einsum("btkgd,btkgd->bkgt", d_out32, out.astype(jnp.float32))  # rowsum(dO * O)
  starts = jnp.arange(k.shape[1] // block) * block

  def step(d_q, xs):
    k_block, v_block, start = xs
    logits = _scores(q, k_block, _block_mask(arrays, kind, start, block, t, s), scale)
    probs = jnp.exp(logits - logsumexp[..., None])
    d_v = jnp.einsum("bkgts,btkgd->bskd", probs.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out, v_block, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - delta[..., None]) * scale
    d_q = d_q + jnp.einsum("bkgts,bskd->btkgd", d_logits.astype(q.dtype), k_block,
                           preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bkgts,btkgd->bskd", d_logits.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

  d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32),
                                 (_key_blocks(k, block), _key_blocks(v, block), starts))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
  return d_q.astype(q.dtype), unblock(d_k), unblock(d_v), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# -- splash: the Pallas TPU kernel ---------------------------------------------------------------------------------


def _splash_kernel(num_heads: int, length: int, block: int, causal: bool, sliding_window: int | None,
                   interpret: bool):
  """The kernel for one example ([H, L, D] queries), with its block-sparsity tables.

  Normally the tables are concrete and cached per shape. When the trace compiles for another platform than this
  process runs (a TPU topology's mesh on a CPU host, benchmarks/aot_scale.py `--topology`) they cannot be made
  eagerly, there being no device of that kind here, so they become constants of the current trace (not cached:
  they belong to it)."""
  if target_platform() != jax.default_backend():
    return _build_splash_kernel(num_heads, length, block, causal, sliding_window, interpret)
  return _cached_splash_kernel(num_heads, length, block, causal, sliding_window, interpret,
                               jax.sharding.get_abstract_mesh())


@functools.lru_cache(maxsize=32)
def _cached_splash_kernel(num_heads, length, block, causal, sliding_window, interpret, context_mesh):
  """`context_mesh` (the abstract mesh current where the kernel is called) is only a cache key: the tables are made
  as arrays typed for the mesh current when they are built, and jax refuses them under another (e.g. one built
  inside a (2, 4, 1) mesh's shard_map, reused under (2, 2, 2))."""
  del context_mesh
  with jax.ensure_compile_time_eval():  # concrete tables even when first built under jit
    return _build_splash_kernel(num_heads, length, block, causal, sliding_window, interpret)


def _build_splash_kernel(num_heads, length, block, causal, sliding_window, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

  shape = (length, length)
  if sliding_window is not None:  # key j visible from query i iff i - (window - 1) <= j <= i
    head_mask = mask_lib.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
  else:
    head_mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
  blocks = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                 block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                 block_kv_dq=block)
  kernel = kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * num_heads), block_sizes=blocks,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)
  return kernel, kernel_lib.SegmentIds


def splash_attention(q, k, v, mask: SelfAttentionMask | None = None, *, scale: float, interpret: bool | None = None):
  """Splash attention for a full forward pass: causal with `mask` (padding and packed segments as segment ids),
  bidirectional over all keys without (the vision tower). Pads the length to the kernel's tile and vmaps the
  per-example kernel over the batch. `interpret` defaults to True unless the computation targets a TPU
  (`target_platform`).

  XLA does not partition a Pallas call: under a current mesh (`jax.set_mesh`) of more than one device the kernel
  runs inside `jax.shard_map`, each device on its own rows (and heads), see `_splash_partition`. With no mesh or
  a one-device mesh it is called directly.
  """
  b, t, h, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"splash attention here is self-attention: {t} queries, {k.shape[1]} keys")
  if interpret is None:
    interpret = target_platform() != "tpu"
  ids = jnp.zeros((b, t), jnp.int32) if mask is None else mask.row_ids()
  local = functools.partial(_splash_local, causal=mask is not None,
                            window=None if mask is None else mask.sliding_window, scale=scale,
                            interpret=bool(interpret))
  partition = _splash_partition(q.shape, k.shape)
  if partition is None:
    return local(q, k, v, ids)
  manual_axes, batch, heads = partition
  qkv_spec = jax.P(batch, None, heads, None)
  # check_vma=False: the kernel's pallas_calls declare no varying-manual-axes types for their outputs (jax refuses
  # them under check_vma=True). Gradients stay exact: tests/test_attention.py checks them on meshes where
  # inputs are split and where they are replicated.
  sharded = jax.shard_map(local, in_specs=(qkv_spec, qkv_spec, qkv_spec, jax.P(batch, None)), out_specs=qkv_spec,
                          axis_names=manual_axes, check_vma=False)
  return sharded(q, k, v, ids)


def target_platform() -> str:
  """The platform the traced computation is compiled for: the current mesh's devices' (a mesh of TPU devices
  from `jax.experimental.topologies` compiles for TPU on a host without one, benchmarks/aot_scale.py
  `--topology`), else the default backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


def _splash_partition(q_shape, k_shape):
  """How to split splash over the current mesh: (manual axes, batch axes or None, head axes or None), or None
  for no `shard_map` (no mesh, or one device).

  The batch and heads follow the logical `batch`/`heads`/`kv_heads` rules of `llava_jax.sharding.DEFAULT_RULES`
  (the trainer's activation split: batch over ("data", "fsdp"), heads over "tensor"); with other rules in the
  config the result is the same, only the resharding around the call differs. A dimension those axes do not
  divide is replicated (a batch of 6 rows on 8 batch shards: each device runs all 6), as are the heads unless q's
  and k/v's heads split over the same axes (GQA: each shard then holds whole groups, q heads j*H/n.. with kv heads
  j*K/n..). Axes already manual (inside an enclosing shard_map) are left alone; the other axes are made manual
  too, the inputs replicated over them, so no auto axis is left around the kernel.
  """
  from llava_jax.sharding import DEFAULT_RULES, logical_to_spec  # pylint: disable=import-outside-toplevel

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  free = {name: size for name, size in mesh.shape.items() if name not in mesh.manual_axes}
  if not free or all(size == 1 for size in free.values()):
    return None
  view = types.SimpleNamespace(shape=free)  # logical_to_spec reads only `.shape`
  q_spec = logical_to_spec(("batch", None, "heads", None), q_shape, view, DEFAULT_RULES)
  k_spec = logical_to_spec(("batch", None, "kv_heads", None), k_shape, view, DEFAULT_RULES)
  heads = q_spec[2] if q_spec[2] == k_spec[2] else None
  if heads is not None and q_spec[0] is not None:  # an axis can split only one dimension
    batch_axes = set((q_spec[0],) if isinstance(q_spec[0], str) else q_spec[0])
    if batch_axes & set((heads,) if isinstance(heads, str) else heads):
      heads = None
  return frozenset(free), q_spec[0], heads


def _splash_local(q, k, v, ids, *, causal: bool, window: int | None, scale: float, interpret: bool):
  """The kernel on the rows (and heads) at hand: ids [B, T] are the row ids (`SelfAttentionMask.row_ids`)."""
  _, t, h, _ = q.shape
  block = min(SPLASH_MAX_BLOCK, _round_up(t, 128))
  length = _round_up(t, block)
  ids = jnp.pad(ids, ((0, 0), (0, length - t)), constant_values=_TAIL_ID)
  kernel, segment_ids = _splash_kernel(h, length, block, causal, window, interpret)
  heads_first = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - t), (0, 0)))
  per_example = lambda q1, k1, v1, ids1: kernel(q1, k1, v1, segment_ids=segment_ids(ids1, ids1))
  out = jax.vmap(per_example)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), ids)
  return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


__all__ = ["IMPLS", "SelfAttentionMask", "blockwise_attention", "causal_mask", "dot_product_attention",
           "prepare_mask", "splash_attention", "xla_attention"]
