"""A SigLIP vision tower (LLaVA-OneVision's) inside our Llava, against transformers' LlavaForConditionalGeneration
with a SiglipVisionModel tower (PyTorch, CPU, fp32): logits, configs and the conversion round trip."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import hf_tiny
from hf_tiny import IMAGE_TOKEN
from llava_jax import export_hf, load_hf_checkpoint
from llava_jax.config import ConfigError, LlavaConfig, VisionConfig, vision_config_from_hf
from llava_jax.convert import canonical_key, name_table
from llava_jax.models.siglip import SiglipVisionTower
from llava_jax.safetensors_io import SafetensorsReader

TOL = 1e-4
SIZE = 56  # 4x4 patches of 14 px


def siglip_llava(**kw):
  kw = {"vision_feature_select_strategy": "full", "vision_feature_layer": -1, **kw}
  return hf_tiny.llava_model(vision=hf_tiny.siglip_vision_config(), **kw)


def rows_for(n):
  """Row 0: the image in the middle of the text; row 1: shorter, image first; left padding on row 1."""
  rows = [[1, 5, 7, 9] + [IMAGE_TOKEN] * n + [11, 12, 13], [1] + [IMAGE_TOKEN] * n + [21, 22]]
  t = max(map(len, rows))
  ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
  for i, row in enumerate(rows):
    ids[i, t - len(row):], mask[i, t - len(row):] = row, 1
  return ids, mask


def our_logits(model, ids, mask, px):
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)), np.float32)


@pytest.mark.parametrize("kw,n_tokens", [
    (dict(vision_feature_layer=-1), 16),
    (dict(vision_feature_layer=-2), 16),
    (dict(vision_feature_layer=[-3, -1]), 16),
    (dict(vision_feature_layer=[0, 2]), 16),  # the embedding output too
    # transformers' "default" drops the first token whatever the tower: for SigLIP a patch, so 15 features.
    (dict(vision_feature_select_strategy="default", vision_feature_layer=-2), 15),
])
def test_logits_match_transformers(kw, n_tokens, tmp_path):
  hf = siglip_llava(**kw)
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"))
  assert isinstance(ours.vision_tower, SiglipVisionTower) and ours.config.num_image_tokens == n_tokens
  ids, mask = rows_for(n_tokens)
  px = hf_tiny.pixels(2, size=SIZE)
  ref = hf_tiny.reference_logits(hf, ids, px, mask)
  err = np.abs(ref - our_logits(ours, ids, mask, px))[mask.astype(bool)].max()
  assert err <= TOL, f"max abs logit diff {err:.3g} > {TOL}"


def test_hidden_states_match_siglip_vision_model(tmp_path):
  """Every hidden state of the tower, and post_layernorm (kept, unused for features) on the last one."""
  import torch

  hf = siglip_llava()
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"))
  px = hf_tiny.pixels(2, size=SIZE, seed=1)
  with torch.no_grad():
    out = hf.model.vision_tower(hf_tiny.to_torch_pixels(px), output_hidden_states=True)
  hidden = ours.vision_tower(jnp.asarray(px))
  assert len(hidden) == len(out.hidden_states) == 4
  for got, ref in zip(hidden, out.hidden_states):
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.vision_tower.post_layernorm(hidden[-1])),
                             out.last_hidden_state.numpy(), atol=1e-5)


def test_roundtrip_through_export_is_bit_identical_and_loads_in_transformers(tmp_path):
  hf = siglip_llava(vision_feature_layer=-2)
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"))
  export_hf(ours, str(tmp_path / "out"))
  original, exported = SafetensorsReader(tmp_path / "hf"), SafetensorsReader(tmp_path / "out")
  assert sorted(original.keys()) == sorted(exported.keys())
  assert {"vision_tower.embeddings.patch_embedding.bias", "vision_tower.post_layernorm.weight",
          "vision_tower.embeddings.position_embedding.weight"} <= set(exported.keys())
  for k in original.keys():
    a, b = original.get(k), exported.get(k)
    assert a.dtype == b.dtype and np.array_equal(a, b), k
  vision = json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]
  assert vision["model_type"] == "siglip_vision_model" and vision["vision_use_head"] is False
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  assert isinstance(reloaded.model.vision_tower, transformers.SiglipVisionModel)
  ids, mask = rows_for(16)
  px = hf_tiny.pixels(2, size=SIZE, seed=2)
  np.testing.assert_array_equal(hf_tiny.reference_logits(reloaded, ids, px, mask),
                                hf_tiny.reference_logits(hf, ids, px, mask))


def test_hub_nested_tower_keys_are_read(tmp_path):
  """llava-hf's hub checkpoints (written by transformers 4) nest the tower as `vision_tower.vision_model.*`."""
  from llava_jax.safetensors_io import write_safetensors

  hf = siglip_llava()
  hf.save_pretrained(tmp_path / "hf")
  reader = SafetensorsReader(tmp_path / "hf")
  nest = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)
  (tmp_path / "hub").mkdir()
  write_safetensors(((nest(k), reader.get(k)) for k in reader.keys()), str(tmp_path / "hub"), 2**40)
  (tmp_path / "hub" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  ours = load_hf_checkpoint(str(tmp_path / "hub"))
  ids, mask = rows_for(16)
  px, real = hf_tiny.pixels(2, size=SIZE), mask.astype(bool)
  np.testing.assert_allclose(our_logits(ours, ids, mask, px)[real],
                             hf_tiny.reference_logits(hf, ids, px, mask)[real], atol=TOL)


def test_name_table_has_siglip_keys_and_no_clip_ones():
  cfg = LlavaConfig.from_hf(siglip_llava().config.to_dict())
  keys = {e.hf_key: e.kind for e in name_table(cfg)}
  assert keys["vision_tower.embeddings.patch_embedding.weight"] == "conv"
  assert keys["vision_tower.embeddings.patch_embedding.bias"] == "plain"
  assert keys["vision_tower.encoder.layers.2.self_attn.out_proj.weight"] == "linear"
  assert not any("class_embedding" in k or "pre_layrnorm" in k for k in keys)


def test_configs_read_and_write_siglip():
  hf = siglip_llava()
  cfg = LlavaConfig.from_hf(hf.config.to_dict())
  v = cfg.vision
  assert (v.model_type, v.hidden_act, v.layer_norm_eps, v.num_tokens, v.has_cls) == (
      "siglip", "gelu_pytorch_tanh", 1e-6, 16, False)
  assert LlavaConfig.from_hf(cfg.to_hf_dict()) == cfg
  assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  # A CLIP config keeps its meaning: CLS counted for "full", dropped for "default".
  assert VisionConfig().model_type == "clip" and LlavaConfig().num_image_tokens == 576
  assert LlavaConfig(vision_feature_select_strategy="full").num_image_tokens == 577
  with pytest.raises(ConfigError, match="model_type"):
    VisionConfig(model_type="vit")


def test_pooling_head_refused_inside_llava_and_ignored_in_a_standalone_tower():
  with_head = hf_tiny.siglip_vision_config(vision_use_head=True)
  raw = siglip_llava().config.to_dict()
  raw["vision_config"] = with_head.to_dict()
  with pytest.raises(ConfigError, match="vision_use_head"):
    LlavaConfig.from_hf(raw)
  # so400m as released (SiglipModel, with head) is a tower to start stage 1 from: the head's weights are skipped.
  assert vision_config_from_hf(with_head.to_dict()).model_type == "siglip"
  full = transformers.SiglipConfig(vision_config=with_head.to_dict()).to_dict()
  assert vision_config_from_hf(full) == vision_config_from_hf(with_head.to_dict())
  for key in ("vision_model.head.probe", "head.attention.in_proj_weight", "logit_bias", "text_model.head.weight"):
    assert canonical_key(key, "clip") is None, key
  assert canonical_key("vision_model.post_layernorm.bias", "clip") == "vision_tower.post_layernorm.bias"


def test_stacked_layers_and_logical_axes(tmp_path):
  """With the tower's layers stacked under scan (and the tower's remat), the same logits; every SigLIP parameter
  carries logical axes for sharding."""
  from flax import nnx

  from llava_jax.checkpoint import model_from_params

  hf = siglip_llava(vision_feature_layer=-2)
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"))
  for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path
  stacked = model_from_params(ours.config, nnx.to_pure_dict(nnx.state(ours, nnx.Param)),
                              ours.options.replace(scan_layers=True, remat="full"))
  ids, mask = rows_for(16)
  px, real = hf_tiny.pixels(2, size=SIZE, seed=4), mask.astype(bool)
  np.testing.assert_allclose(our_logits(stacked, ids, mask, px)[real],
                             hf_tiny.reference_logits(hf, ids, px, mask)[real], atol=TOL)


def test_stage1_start_from_a_released_siglip_model(tmp_path):
  """A whole SiglipModel (pooling head and text tower, as so400m is released) plus an LLM: the head and text
  weights are skipped, every patch is a feature (strategy "full"), and the hidden states are SigLIP's."""
  import torch

  siglip = transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=hf_tiny.siglip_vision_config(vision_use_head=True).to_dict(),
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=50, max_position_embeddings=16))).eval()
  siglip.save_pretrained(tmp_path / "siglip")
  keys = SafetensorsReader(tmp_path / "siglip").keys()
  assert any(".head." in k for k in keys) and "logit_bias" in keys
  transformers.LlamaForCausalLM(hf_tiny.text_config()).save_pretrained(tmp_path / "llm")
  ours = load_hf_checkpoint(clip=str(tmp_path / "siglip"), llm=str(tmp_path / "llm"))
  assert ours.config.vision.model_type == "siglip" and ours.config.num_image_tokens == 16
  px = hf_tiny.pixels(2, size=SIZE, seed=5)
  with torch.no_grad():
    ref = siglip.vision_model(hf_tiny.to_torch_pixels(px), output_hidden_states=True).hidden_states
  for got, want in zip(ours.vision_tower(jnp.asarray(px)), ref):
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)
