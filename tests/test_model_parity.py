"""Our Llava against transformers' LlavaForConditionalGeneration (PyTorch, CPU, fp32) on tiny random models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from hf_tiny import IMAGE_TOKEN
from llava_jax import load_hf_checkpoint

TOL = 1e-4


def convert(hf_model, tmp_path, dtype=None):
  hf_model.save_pretrained(tmp_path / "hf")
  return load_hf_checkpoint(str(tmp_path / "hf"), dtype=dtype)


def image_tokens(hf_model):
  cfg = hf_model.config
  n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
  return n + (cfg.vision_feature_select_strategy == "full")


def batch(rows, pad_side="right", pad_id=0):
  """rows: lists of token ids -> (input_ids, attention_mask) padded to the longest row."""
  t = max(map(len, rows))
  ids = np.full((len(rows), t), pad_id, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, row in enumerate(rows):
    sl = slice(t - len(row), t) if pad_side == "left" else slice(0, len(row))
    ids[i, sl], mask[i, sl] = row, 1
  return ids, mask


def assert_same_logits(hf_model, ours, ids, mask, px, tol=TOL):
  ref = hf_tiny.reference_logits(hf_model, ids, px, mask)
  got = np.asarray(ours(jnp.asarray(ids), None if px is None else jnp.asarray(px), jnp.asarray(mask)),
                   np.float32)
  real = mask.astype(bool)
  err = np.abs(ref - got)[real].max()
  assert err <= tol, f"max abs logit diff {err:.3g} > {tol}"
  return err


CASES = {
    "mha": dict(),
    "gqa": dict(text=dict(num_key_value_heads=2)),
    "mqa_head_dim": dict(text=dict(num_key_value_heads=1, head_dim=16)),
    "layer_-1": dict(vision_feature_layer=-1),
    "layer_list": dict(vision_feature_layer=[-3, -1]),
    "layer_0_and_1": dict(vision_feature_layer=[0, 1]),
    "strategy_full": dict(vision_feature_select_strategy="full"),
    "rope_linear": dict(text=dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))),
    "rope_llama3": dict(text=dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32, rope_theta=500000.0))),
    "tied_head_biases": dict(text=dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
                             tie_word_embeddings=True),
    "no_projector_bias": dict(multimodal_projector_bias=False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_logits_match_transformers(name, pad_side, tmp_path):
  kw = dict(CASES[name])
  text = hf_tiny.text_config(**kw.pop("text", {}))
  hf = hf_tiny.llava_model(text=text, **kw)
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  # Row 0: the image in the middle of the text; row 1: shorter, image first; so padding lands on one row.
  rows = [[1, 5, 7, 9] + [IMAGE_TOKEN] * n + [11, 12, 13, 14, 15], [1] + [IMAGE_TOKEN] * n + [21, 22]]
  ids, mask = batch(rows, pad_side)
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(2))


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_attention_impls_match_transformers(impl, tmp_path):
  """The memory-efficient kernels (splash in Pallas interpret mode on CPU) in the whole model, vision tower
  included: GQA, left padding (padded keys as segment ids)."""
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"), attention_impl=impl)
  assert ours.options.attention_impl == impl
  n = image_tokens(hf)
  rows = [[1, 5, 7, 9] + [IMAGE_TOKEN] * n + [11, 12, 13, 14, 15], [1] + [IMAGE_TOKEN] * n + [21, 22]]
  ids, mask = batch(rows, "left")
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(2))


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_xla_attention_in_query_pieces_matches_transformers(pad_side, tmp_path, monkeypatch):
  """`xla` takes a causal mask's queries in pieces against the keys they can see (XLA_QUERY_BLOCK, 256 in use):
  pieces of 7 here, so the tiny rows cross several piece edges, with padding on either side and GQA."""
  from llava_jax.models import attention

  monkeypatch.setattr(attention, "XLA_QUERY_BLOCK", 7)
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  ours = convert(hf, tmp_path)
  assert ours.options.attention_impl == "xla"
  n = image_tokens(hf)
  rows = [[1, 5, 7, 9] + [IMAGE_TOKEN] * n + [11, 12, 13, 14, 15], [1] + [IMAGE_TOKEN] * n + [21, 22]]
  ids, mask = batch(rows, pad_side)
  assert ids.shape[1] > 3 * 7
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(2))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mlp_in_position_pieces_matches_transformers(scan_layers, tmp_path):
  """`ModelOptions.seq_chunk`: the decoder MLP applied 5 positions at a time (the last piece padded), per-layer and
  stacked."""
  from flax import nnx

  from llava_jax.checkpoint import model_from_params

  hf = hf_tiny.llava_model()
  ours = convert(hf, tmp_path)
  options = ours.options.replace(seq_chunk=5, scan_layers=scan_layers)
  chunked = model_from_params(ours.config, nnx.to_pure_dict(nnx.state(ours, nnx.Param)), options)
  n = image_tokens(hf)
  ids, mask = batch([[1, 5, 7] + [IMAGE_TOKEN] * n + [11, 12, 13], [1] + [IMAGE_TOKEN] * n + [21, 22]], "left")
  assert ids.shape[1] % 5  # a padded last piece
  assert_same_logits(hf, chunked, ids, mask, hf_tiny.pixels(2, seed=3))


def test_two_images_in_one_row_and_rows_without_images(tmp_path):
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  rows = [[1, 3] + [IMAGE_TOKEN] * n + [4, 5] + [IMAGE_TOKEN] * n + [6],  # two images
          [1, 8, 9, 10, 11, 12],  # text only, in the same batch
          [1] + [IMAGE_TOKEN] * n + [30, 31, 32]]
  ids, mask = batch(rows, "left")
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(3, seed=1))


def test_text_only_batch(tmp_path):
  hf = hf_tiny.llava_model()
  ours = convert(hf, tmp_path)
  ids, mask = batch([[1, 2, 3, 4, 5, 6, 7], [1, 40, 41]], "left")
  assert_same_logits(hf, ours, ids, mask, None)


def test_dynamic_rope_beyond_max_positions(tmp_path):
  # Dynamic NTK only changes anything past max_position_embeddings: make the sequence longer than that.
  text = hf_tiny.text_config(max_position_embeddings=24,
                             rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))
  hf = hf_tiny.llava_model(text=text)
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  ids, mask = batch([[1, 2, 3] + [IMAGE_TOKEN] * n + list(range(2, 20))])
  assert ids.shape[1] > 24
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(1))


def test_left_padded_row_equals_row_alone(tmp_path):
  hf = hf_tiny.llava_model()
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  short = [1] + [IMAGE_TOKEN] * n + [7, 8]
  ids, mask = batch([[1, 2, 3, 4] + [IMAGE_TOKEN] * n + [5, 6, 7, 8], short], "left")
  px = hf_tiny.pixels(2)
  padded = np.asarray(ours(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)))[1, -len(short):]
  alone = np.asarray(ours(jnp.asarray([short]), jnp.asarray(px[1:])))[0]
  np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_bfloat16_is_as_close_to_exact_as_transformers_bfloat16(tmp_path):
  """bf16 tolerance, justified: our bf16 logits may differ from the fp32 reference by no more than twice what
  transformers' own bf16 model does (plus 0.02 for rounding noise); both round at different places."""
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  ours = convert(hf, tmp_path, dtype="bfloat16")
  n = image_tokens(hf)
  ids, mask = batch([[1, 2] + [IMAGE_TOKEN] * n + [3, 4, 5], [1] + [IMAGE_TOKEN] * n + [9]], "left")
  px = hf_tiny.pixels(2)
  exact = hf_tiny.reference_logits(hf, ids, px, mask)
  hf_bf16 = hf_tiny.reference_logits(hf.to(torch.bfloat16), ids, px, mask)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)), np.float32)
  real = mask.astype(bool)
  hf_err, our_err = np.abs(hf_bf16 - exact)[real].max(), np.abs(got - exact)[real].max()
  assert ours.language_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
  assert our_err <= 2 * hf_err + 0.02, (our_err, hf_err)


def test_image_token_count_mismatch_is_a_clear_error(tmp_path):
  hf = hf_tiny.llava_model()
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  ids = jnp.asarray([[1] + [IMAGE_TOKEN] * (n - 1) + [5]])
  with pytest.raises(ValueError, match="Image features and image tokens do not match"):
    ours(ids, jnp.asarray(hf_tiny.pixels(1)))
  with pytest.raises(ValueError, match="no pixel_values"):
    ours(ids)


def test_clip_hidden_states_match_layer_by_layer(tmp_path):
  hf = hf_tiny.llava_model(vision=hf_tiny.vision_config(num_hidden_layers=4))
  ours = convert(hf, tmp_path)
  px = hf_tiny.pixels(3, seed=2)
  with torch.no_grad():
    ref = hf.model.vision_tower(hf_tiny.to_torch_pixels(px), output_hidden_states=True)
  hidden = ours.vision_tower(jnp.asarray(px))
  assert len(hidden) == len(ref.hidden_states) == 5
  for i, (h, r) in enumerate(zip(hidden, ref.hidden_states)):
    np.testing.assert_allclose(np.asarray(h), r.numpy(), atol=1e-5, err_msg=f"hidden state {i}")
  pooled = ours.vision_tower.post_layernorm(hidden[-1][:, 0])  # CLIP's pooled output: the CLS token, normed
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5)


def test_linear_projector_matches_reference_with_linear_connector(tmp_path):
  """LLaVA-1.0's connector is one Linear; transformers has no such Llava, so the reference is HF's model with its
  projector swapped for a torch Linear (exactly what the original code computes)."""
  from llava_jax.checkpoint import model_from_params, params_of

  hf = hf_tiny.llava_model()
  ours_mlp = convert(hf, tmp_path)
  linear = torch.nn.Linear(32, 48)
  hf.model.multi_modal_projector = linear
  params = params_of(ours_mlp)
  params["multi_modal_projector"] = {"linear_1": {"kernel": jnp.asarray(linear.weight.detach().numpy().T),
                                                  "bias": jnp.asarray(linear.bias.detach().numpy())}}
  ours = model_from_params(ours_mlp.config.replace(projector_type="linear"), params)
  n = image_tokens(hf)
  ids, mask = batch([[1, 2] + [IMAGE_TOKEN] * n + [3, 4, 5]])
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(1))


def test_image_mask_skips_blank_slots(tmp_path):
  """Fixed-shape batches carry a blank image slot for a row without an image; image_mask drops it."""
  hf = hf_tiny.llava_model()
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  ids, mask = batch([[1, 2] + [IMAGE_TOKEN] * n + [3], [1, 5, 6, 7], [1] + [IMAGE_TOKEN] * n + [8, 9]], "left")
  real = hf_tiny.pixels(2, seed=5)
  slots = np.stack([real[0], np.zeros_like(real[0]), real[1]])
  ref = hf_tiny.reference_logits(hf, ids, real, mask)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(slots), jnp.asarray(mask),
                        image_mask=jnp.asarray([True, False, True])))
  assert np.abs(ref - got)[mask.astype(bool)].max() <= TOL


def test_images_by_row_splices_like_the_batch_wide_gather(tmp_path):
  """The train step's row-local splice (`images_by_row`): rows with two, no and one image (the one in its second
  slot) give transformers' logits, and the same embeddings as the batch-wide gather."""
  hf = hf_tiny.llava_model()
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  ids, mask = batch([[1] + [IMAGE_TOKEN] * n + [2] + [IMAGE_TOKEN] * n + [3], [1, 5, 6, 7],
                     [1, 4] + [IMAGE_TOKEN] * n + [8, 9]], "left")
  real = hf_tiny.pixels(3, seed=7)
  blank = np.zeros_like(real[0])
  slots = np.stack([np.stack([real[0], real[1]]), np.stack([blank, blank]), np.stack([blank, real[2]])])
  image_mask = np.array([[True, True], [False, False], [False, True]])
  args = [jnp.asarray(x) for x in (ids, slots, image_mask)]
  by_row = ours.embed(args[0], args[1], args[2], images_by_row=True)
  np.testing.assert_allclose(np.asarray(by_row), np.asarray(ours.embed(*args)), rtol=1e-6, atol=1e-6)
  ref = hf_tiny.reference_logits(hf, ids, real, mask)
  got = np.asarray(ours(args[0], args[1], jnp.asarray(mask), image_mask=args[2], images_by_row=True))
  assert np.abs(ref - got)[mask.astype(bool)].max() <= TOL
  with pytest.raises(ValueError, match="do not match"):  # a row's tokens must match its own images
    ours.embed(args[0], args[1], jnp.asarray([[True, True], [False, True], [False, False]]), images_by_row=True)


def test_packed_row_equals_its_samples_alone(tmp_path):
  """Sequence packing: segment_ids keep attention within a sample and positions restart, so each packed sample
  gives the logits it gives alone (the data pipeline's packed batch contract)."""
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  a = [1, 4] + [IMAGE_TOKEN] * n + [5, 6]
  b = [1, 7, 8, 9]
  c = [1] + [IMAGE_TOKEN] * n + [10]
  pad = 3
  ids = np.array([a + b + [0] * pad, c + [0] * (len(a) + len(b) + pad - len(c))])
  seg = np.array([[1] * len(a) + [2] * len(b) + [0] * pad, [1] * len(c) + [0] * (ids.shape[1] - len(c))])
  pos = np.array([list(range(len(a))) + list(range(len(b))) + [0] * pad,
                  list(range(len(c))) + [0] * (ids.shape[1] - len(c))])
  px = hf_tiny.pixels(4, seed=6)  # [B, M=2, H, W, 3]: row 0 has one image, row 1 one image
  slots = np.stack([np.stack([px[0], np.zeros_like(px[0])]), np.stack([px[1], np.zeros_like(px[1])])])
  image_mask = np.array([[True, False], [True, False]])
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(slots), jnp.asarray(seg > 0), image_mask=jnp.asarray(image_mask),
                        positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
  alone = lambda row, pixels: np.asarray(ours(jnp.asarray([row]), None if pixels is None else jnp.asarray(pixels)))[0]
  np.testing.assert_allclose(got[0, :len(a)], alone(a, px[:1]), atol=1e-5)
  np.testing.assert_allclose(got[0, len(a):len(a) + len(b)], alone(b, None), atol=1e-5)
  np.testing.assert_allclose(got[1, :len(c)], alone(c, px[1:2]), atol=1e-5)
  assert np.isfinite(got).all()  # padding rows and positions give no NaN


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_gradients_match_transformers_backward(kv_heads, tmp_path, monkeypatch):
  """The backward pass against torch's autograd: d(sum of logits x fixed weights) / d(every decoder, projector and
  lm_head weight), with `xla` attention in query pieces of 7 (their head-major layout) and `Dense`'s own VJP
  (its CPU weight-gradient product, models/layers.py)."""
  import jax
  from flax import nnx

  from llava_jax.models import attention

  monkeypatch.setattr(attention, "XLA_QUERY_BLOCK", 7)
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=kv_heads))
  ours = convert(hf, tmp_path)
  n = image_tokens(hf)
  ids, mask = batch([[1, 5, 7] + [IMAGE_TOKEN] * n + [11, 12, 13, 14], [1] + [IMAGE_TOKEN] * n + [21, 22]], "left")
  px = hf_tiny.pixels(2, seed=5)
  weights = np.random.default_rng(0).standard_normal(ids.shape + (hf.config.text_config.vocab_size,))
  weights = (weights * mask[..., None]).astype(np.float32)

  hf.zero_grad()
  logits = hf(input_ids=torch.from_numpy(ids), pixel_values=hf_tiny.to_torch_pixels(px),
              attention_mask=torch.from_numpy(mask)).logits
  (logits * torch.from_numpy(weights)).sum().backward()
  ref = {name: p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}

  graph, params, rest = nnx.split(ours, nnx.Param, ...)

  def loss(params):
    model = nnx.merge(graph, params, rest)
    return jnp.sum(model(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)) * weights)

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  checked = 0
  for layer in range(hf.config.text_config.num_hidden_layers):
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp", ("gate_proj", "up_proj", "down_proj"))):
      for name in names:
        got = np.asarray(grads["language_model"]["layers"][layer][part][name]["kernel"]).T
        want = ref[f"model.language_model.layers.{layer}.{part}.{name}.weight"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)
        checked += 1
  projector, vision_fc1 = grads["multi_modal_projector"], grads["vision_tower"]["encoder"]["layers"][0]["mlp"]["fc1"]
  for got, want in ((grads["lm_head"]["kernel"], "lm_head.weight"),
                    (projector["linear_1"]["kernel"], "model.multi_modal_projector.linear_1.weight"),
                    (vision_fc1["kernel"], "model.vision_tower.encoder.layers.0.mlp.fc1.weight")):
    want = ref[want]
    np.testing.assert_allclose(np.asarray(got).T, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert checked == 7 * hf.config.text_config.num_hidden_layers
