"""The attention implementations (models/attention.py) compute one function: `blockwise` and `splash` (Pallas,
interpret mode on CPU) against `xla` in outputs and gradients, on tiny shapes that still cross block edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models import attention
from llava_jax.models.attention import SelfAttentionMask
from llava_jax.models.llava import attention_mask_4d
from llava_jax.models.options import ModelOptions

TOL = 1e-4
SCALE = 0.35


def qkv(b, t, s, heads, kv_heads, d=8, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return make(b, t, heads, d), make(b, s, kv_heads, d), make(b, s, kv_heads, d)


def padded_packed_mask(t, sliding_window=None):
  """Row 0 left-padded by 7; row 1 packs two samples (5 + 20 tokens at t = 40) then 15 padding slots."""
  valid = np.ones((2, t), bool)
  valid[0, :7] = False
  segments = np.ones((2, t), np.int32)
  segments[1, 5:25], segments[1, 25:] = 2, 0
  valid[1, 25:] = False
  return SelfAttentionMask(jnp.asarray(valid), jnp.asarray(segments), sliding_window), valid


def value_and_grads(fn, q, k, v, real_queries):
  """A loss over the real queries only (padding queries' outputs are unspecified), its gradients and the output."""
  weight = jnp.asarray(real_queries, jnp.float32)[:, :, None, None]

  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(weight * out * jnp.cos(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out) * np.asarray(weight), [np.asarray(g) for g in grads]


def assert_matches_xla(fn, mask, q, k, v, real_queries):
  out, grads = value_and_grads(fn, q, k, v, real_queries)
  dense = mask.dense() if isinstance(mask, SelfAttentionMask) else mask
  ref_out, ref_grads = value_and_grads(lambda *a: attention.xla_attention(*a, dense, scale=SCALE), q, k, v,
                                       real_queries)
  np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
  for name, got, ref in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0, err_msg=f"d{name}")


def test_self_attention_mask_is_the_definition():
  """Causal, padded keys masked, same segment, sliding window: the dense form against the rule written out."""
  t, window = 40, 6
  mask, valid = padded_packed_mask(t, window)
  segments = np.asarray(mask.segment_ids)
  expected = np.zeros((2, 1, t, t), bool)
  for b in range(2):
    for i in range(t):
      for j in range(t):
        expected[b, 0, i, j] = valid[b, j] and j <= i and i - j < window and segments[b, i] == segments[b, j]
  np.testing.assert_array_equal(np.asarray(mask.dense()), expected)
  np.testing.assert_array_equal(np.asarray(attention_mask_4d(mask.key_valid, t, 0, mask.segment_ids, window)),
                                expected)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("block", [16, 13])
def test_causal_xla_pieces_match_the_full_scores(window, block):
  """`causal_xla_attention` (queries in pieces, each against the keys up to its last query) against all scores at
  once: left padding, packed segments, GQA, pieces that do and do not divide 40; and `dot_product_attention`
  takes that path for a `SelfAttentionMask` under `xla`, with the mask `prepare_mask` materialised."""
  mask, valid = padded_packed_mask(40, window)
  q, k, v = qkv(2, 40, 40, heads=4, kv_heads=2, seed=3)
  fn = lambda q, k, v: attention.causal_xla_attention(q, k, v, mask.dense(), scale=SCALE, block=block)
  assert_matches_xla(fn, mask, q, k, v, valid)
  prepared = attention.prepare_mask(mask, "xla")
  assert isinstance(prepared, SelfAttentionMask) and prepared.materialised is not None
  assert attention.prepare_mask(mask, "cudnn").shape == (2, 1, 40, 40)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, prepared, scale=SCALE, impl="xla")
  assert_matches_xla(fn, mask, q, k, v, valid)


def test_causal_xla_pieces_do_less_work():
  """At 1024 tokens in pieces of 256 the pieces see 10 of the 16 [256, 256] score blocks: XLA's FLOP count of the
  fwd + bwd drops to about that share (0.65 with the elementwise work), so the masked keys are really skipped."""
  mask = SelfAttentionMask(jnp.ones((1, 1024), bool))
  q, k, v = qkv(1, 1024, 1024, heads=2, kv_heads=2, d=16)

  def flops(fn):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().cost_analysis()["flops"]

  full = flops(lambda q, k, v: attention.xla_attention(q, k, v, mask.dense(), scale=SCALE))
  pieces = flops(lambda q, k, v: attention.causal_xla_attention(q, k, v, mask.dense(), scale=SCALE, block=256))
  assert 0.55 < pieces / full < 0.7, pieces / full


@pytest.mark.parametrize("window", [None, 9])
def test_blockwise_matches_xla_across_key_blocks(window):
  """Blocks of 16 over 40 keys: several blocks, a padded last one, blocks wholly masked for some rows."""
  mask, valid = padded_packed_mask(40, window)
  q, k, v = qkv(2, 40, 40, heads=4, kv_heads=2)
  fn = lambda q, k, v: attention.blockwise_attention(q, k, v, mask, scale=SCALE, block=16)
  assert_matches_xla(fn, mask, q, k, v, valid)


def test_blockwise_without_mask_and_with_a_cache_mask():
  """The vision tower (no mask, all keys) and prefill into a longer cache (dense mask, 12 queries, 40 slots)."""
  q, k, v = qkv(2, 37, 37, heads=4, kv_heads=4, seed=1)
  fn = lambda q, k, v: attention.blockwise_attention(q, k, v, None, scale=SCALE, block=16)
  assert_matches_xla(fn, None, q, k, v, np.ones((2, 37), bool))

  key_valid = np.zeros((2, 40), bool)
  key_valid[0, 3:12], key_valid[1, :12] = True, True
  dense = attention_mask_4d(jnp.asarray(key_valid), 12)
  q, k, v = qkv(2, 12, 40, heads=4, kv_heads=1, seed=2)
  fn = lambda q, k, v: attention.blockwise_attention(q, k, v, dense, scale=SCALE, block=16)
  assert_matches_xla(fn, dense, q, k, v, key_valid[:, :12])


@pytest.mark.parametrize("window", [None, 9])
def test_splash_matches_xla(window):
  """Pallas splash in interpret mode: left padding and packed segments as segment ids, GQA (4 heads on 2)."""
  mask, valid = padded_packed_mask(40, window)
  q, k, v = qkv(2, 40, 40, heads=4, kv_heads=2, seed=3)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, scale=SCALE, impl="splash")
  assert_matches_xla(fn, mask, q, k, v, valid)


def test_splash_without_mask_is_bidirectional():
  q, k, v = qkv(1, 20, 20, heads=2, kv_heads=2, seed=4)
  fn = lambda q, k, v: attention.splash_attention(q, k, v, None, scale=SCALE)
  assert_matches_xla(fn, None, q, k, v, np.ones((1, 20), bool))


def batch_of_masks(b, t):
  """`padded_packed_mask`'s two rows repeated to b rows, the left padding differing per row (3 to 3 + b / 2)."""
  mask, valid = padded_packed_mask(t)
  valid, segments = np.tile(valid, (b // 2, 1)), np.tile(np.asarray(mask.segment_ids), (b // 2, 1))
  for row in range(0, b, 2):
    valid[row] = np.arange(t) >= 3 + row // 2
  return SelfAttentionMask(jnp.asarray(valid), jnp.asarray(segments)), valid


def kernel_placement(jaxpr, inside=False):
  """(the shard_map equations, the pallas_calls outside any shard_map) of a jaxpr and its nested jaxprs (jit,
  custom VJP rules, the transposed backward)."""
  maps, stray = [], 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      maps.append(eqn)
    stray += eqn.primitive.name == "pallas_call" and not inside
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          inner_maps, inner_stray = kernel_placement(inner, inside or eqn.primitive.name == "shard_map")
          maps, stray = maps + inner_maps, stray + inner_stray
  return maps, stray


@pytest.mark.parametrize("mesh_shape, batch, heads, kv_heads, expected", [
    ((2, 4, 1), 8, 4, 2, jax.P(("data", "fsdp"), None, None, None)),    # batch over 8 shards
    ((2, 2, 2), 4, 4, 2, jax.P(("data", "fsdp"), None, "tensor", None)),  # and GQA heads over tensor
    ((2, 2, 2), 4, 4, 1, jax.P(("data", "fsdp"), None, None, None)),    # 1 kv head: heads kept whole
    ((2, 2, 2), 6, 3, 3, jax.P(None, None, None, None)),                # 6 rows on 4 shards: replicated
])
def test_splash_under_a_mesh_runs_in_shard_map_and_matches_xla(mesh_shape, batch, heads, kv_heads, expected):
  """Under `jax.set_mesh` of 8 (fake CPU) devices the Pallas call sits in a shard_map over the batch (and heads),
  batch-sharded inputs with left padding, packed segments and GQA give xla's outputs and dQ/dK/dV; where the
  mesh does not divide a dimension it is replicated."""
  from llava_jax.sharding import batch_sharding, batch_shards, make_mesh  # pylint: disable=import-outside-toplevel

  mesh = make_mesh(mesh_shape)
  mask, valid = batch_of_masks(batch, 40)
  q, k, v = qkv(batch, 40, 40, heads=heads, kv_heads=kv_heads, seed=6)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, scale=SCALE, impl="splash")
  with jax.set_mesh(mesh):
    if batch % batch_shards(mesh) == 0:
      q, k, v = (jax.device_put(x, batch_sharding(mesh, 4)) for x in (q, k, v))
    (forward,), stray = kernel_placement(jax.make_jaxpr(fn)(q, k, v).jaxpr)
    specs = [spec for var, spec in zip(forward.invars, forward.params["in_specs"])
             if var.aval.shape[:2] == (batch, 40)]  # q, k, v [B, T, H, D] and the row ids [B, T]
    assert stray == 0 and specs == [expected] * 3 + [jax.P(*expected[:2])], specs
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
    maps, stray = kernel_placement(jax.make_jaxpr(grad)(q, k, v).jaxpr)
    assert maps and stray == 0  # the backward's kernels too
    assert_matches_xla(fn, mask, q, k, v, valid)


def test_splash_without_a_mesh_or_on_one_device_calls_the_kernel_directly():
  from llava_jax.sharding import make_mesh  # pylint: disable=import-outside-toplevel

  q, k, v = qkv(2, 20, 20, heads=2, kv_heads=2)
  fn = lambda q, k, v: attention.splash_attention(q, k, v, None, scale=SCALE)
  maps, stray = kernel_placement(jax.make_jaxpr(fn)(q, k, v).jaxpr)
  assert not maps and stray > 0
  with jax.set_mesh(make_mesh((1, 1, 1), jax.devices()[:1])):
    maps, stray = kernel_placement(jax.make_jaxpr(fn)(q, k, v).jaxpr)
    assert not maps and stray > 0


def test_dense_masks_take_the_xla_path_under_splash():
  """Generation's decode step (one query against a cache) is not splash's job: the dense mask goes to `xla`."""
  key_valid = jnp.asarray(np.arange(24)[None] < np.array([[10], [17]]))
  dense = attention_mask_4d(key_valid, 1, 16)
  q, k, v = qkv(2, 1, 24, heads=4, kv_heads=2, seed=5)
  got = attention.dot_product_attention(q, k, v, dense, scale=SCALE, impl="splash")
  np.testing.assert_allclose(got, attention.xla_attention(q, k, v, dense, scale=SCALE), atol=1e-6)


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation (inside scans and custom rules too) produces."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          largest = max(largest, _largest_intermediate(inner))
  return largest


def test_blockwise_gradient_never_holds_all_scores():
  """The point of `blockwise`: forward and backward hold [T, block] scores per head, never [T, T]."""
  b, t, heads, block = 1, 256, 2, 32
  mask = SelfAttentionMask(jnp.ones((b, t), bool))
  q, k, v = qkv(b, t, t, heads=heads, kv_heads=heads)
  all_scores = b * heads * t * t

  def largest(fn):
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
    return _largest_intermediate(jax.make_jaxpr(grad)(q, k, v).jaxpr)

  assert largest(lambda q, k, v: attention.xla_attention(q, k, v, mask.dense(), scale=SCALE)) >= all_scores
  blockwise = largest(lambda q, k, v: attention.blockwise_attention(q, k, v, mask, scale=SCALE, block=block))
  assert blockwise <= all_scores * block // t


def test_every_impl_reaches_its_own_kernel(monkeypatch):
  """Each name in IMPLS (what ModelOptions accepts) dispatches to its own kernel, none falls through to another's;
  an unknown name is refused by ModelOptions and by the entry point."""
  calls = []
  spy = lambda name: lambda q, *args, **kwargs: calls.append(name) or jnp.zeros_like(q)
  monkeypatch.setattr(attention, "causal_xla_attention", spy("xla"))
  monkeypatch.setattr(attention, "blockwise_attention", spy("blockwise"))
  monkeypatch.setattr(attention, "splash_attention", spy("splash"))
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy("cudnn"))
  q, k, v = qkv(1, 4, 4, 2, 1)
  mask = SelfAttentionMask(jnp.ones((1, 4), bool))
  for impl in attention.IMPLS:
    calls.clear()
    attention.dot_product_attention(q, k, v, attention.prepare_mask(mask, impl), scale=SCALE, impl=impl)
    assert calls == [impl]
    assert ModelOptions(attention_impl=impl).attention_impl == impl
  with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
    ModelOptions(attention_impl="flash")
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, scale=SCALE, impl="flash")


@pytest.mark.slow  # about a minute of CPU per impl
@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_scanned_rematerialised_model_gradients_match_xla(impl):
  """The training configuration (scanned layers, full remat, fp32 logits) with packed rows: the kernels' custom
  VJPs inside scan and checkpoint give xla's gradients."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from llava_jax.config import LlavaConfig, TextConfig, VisionConfig  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import Llava  # pylint: disable=import-outside-toplevel

  cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14),
                    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8))
  ids = jnp.asarray(np.random.default_rng(7).integers(1, 60, (2, 24)))
  segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
  positions = jnp.asarray([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4])

  def loss_and_grads(attention_impl):
    options = ModelOptions(attention_impl=attention_impl, scan_layers=True, remat="full", logits_dtype="float32")
    model = Llava(cfg, rngs=nnx.Rngs(0), options=options)
    loss = lambda m: jnp.sum(jnp.where(segments[..., None] > 0, jnp.tanh(m(ids, positions=positions,
                                                                           segment_ids=segments)), 0.0))
    value, grads = nnx.value_and_grad(loss)(model)
    return value, jax.tree.leaves(grads)

  value, grads = loss_and_grads(impl)
  ref_value, ref_grads = loss_and_grads("xla")
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
