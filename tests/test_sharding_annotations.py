"""Every parameter carries logical axis names, and sharding by them leaves the model's output unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hf_tiny
from llava_jax import load_hf_checkpoint
from llava_jax.sharding import logical_to_spec, param_shardings


def test_every_parameter_has_logical_axes(tmp_path):
  hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2)).save_pretrained(tmp_path)
  model = load_hf_checkpoint(str(tmp_path))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path
  named = {".".join(map(str, p)): v.get_metadata()["out_sharding"]
           for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert named["language_model.layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
  assert named["language_model.embed_tokens.embedding"] == ("vocab", "embed")


def test_sharded_forward_on_8_devices_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  hf.save_pretrained(tmp_path)
  model = load_hf_checkpoint(str(tmp_path))
  ids = jnp.asarray([[1, 2] + [hf_tiny.IMAGE_TOKEN] * 16 + [3, 4]] * 2)
  px = jnp.asarray(hf_tiny.pixels(2))
  expected = np.asarray(model(ids, px))

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(model)
  shardings = param_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  k_proj = state["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
  assert k_proj.sharding.spec == jax.P("fsdp", "tensor")
  assert k_proj.addressable_shards[0].data.shape == (48 // 2, 80 // 2)  # really split

  @jax.jit
  def forward(state, ids, px):
    return nnx.merge(graphdef, state)(ids, px)

  with jax.set_mesh(mesh):
    got = forward(state, ids, px)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_dimension_not_divisible_stays_whole():
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
  assert logical_to_spec(("vocab", "embed"), (30, 48), mesh) == jax.P(None, "fsdp")
  assert logical_to_spec(("embed", "mlp"), (48, 80), mesh) == jax.P("fsdp", "tensor")
  assert logical_to_spec(("norm",), (48,), mesh) == jax.P(None)
