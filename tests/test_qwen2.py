"""Qwen2 as the language model (LLaVA-OneVision's decoder): our Llava against transformers' Llava on a Qwen2
backbone, conversion both ways, the config it reads and writes, a training step and the sharding annotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_tiny
import train_util
from hf_tiny import IMAGE_TOKEN
from llava_jax import export_hf, generate, load_hf_checkpoint
from llava_jax.config import ConfigError, LlavaConfig, TextConfig, text_config_from_hf
from llava_jax.models.options import ModelOptions
from llava_jax.sharding import param_shardings
from test_model_parity import assert_same_logits, batch, image_tokens

CASES = {
    "untied": dict(),
    "tied": dict(text=dict(tie_word_embeddings=True), tie_word_embeddings=True),
    # use_sliding_window with max_window_layers 0 windows every layer: the one windowed layout we hold.
    "window_every_layer": dict(text=dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
}


def hf_model(name, seed=0):
  kw = dict(CASES[name])
  return hf_tiny.llava_model(text=hf_tiny.qwen2_text_config(**kw.pop("text", {})), seed=seed, **kw)


def convert(hf, path, scan_layers=False):
  hf.save_pretrained(path)
  return load_hf_checkpoint(str(path), options=ModelOptions(scan_layers=scan_layers))


def prompts(hf):
  n = image_tokens(hf)
  # Row 0: the image in the middle of the text (longer than the window); row 1: shorter, so it is padded.
  return [[1, 5, 7, 9] + [IMAGE_TOKEN] * n + [11, 12, 13, 14, 15], [1] + [IMAGE_TOKEN] * n + [21, 22]]


@pytest.mark.parametrize("name, pad_side, scan_layers", [
    ("untied", "left", False), ("untied", "right", False), ("untied", "left", True), ("tied", "left", False),
    ("window_every_layer", "left", False)])
def test_logits_match_transformers(name, pad_side, scan_layers, tmp_path):
  hf = hf_model(name)
  biases = [p for n, p in hf.named_parameters() if "language_model" in n and n.endswith("_proj.bias")]
  assert len(biases) == 3 * 2 and all(b.abs().min() > 0 for b in biases)  # q/k/v per layer, random, not zero
  ours = convert(hf, tmp_path / "hf", scan_layers)
  t = ours.config.text
  assert (t.model_type, t.qkv_bias, t.attention_bias, t.rms_norm_eps) == ("qwen2", True, False, 1e-6)
  assert t.tie_word_embeddings == (name == "tied") and (ours.lm_head is None) == (name == "tied")
  assert t.sliding_window == (8 if name == "window_every_layer" else None)
  ids, mask = batch(prompts(hf), pad_side)
  assert_same_logits(hf, ours, ids, mask, hf_tiny.pixels(2))


def test_greedy_generation_equals_transformers(tmp_path):
  hf = hf_model("untied", seed=1)
  ours = convert(hf, tmp_path / "hf")
  ids, mask = batch(prompts(hf), "left")
  px = hf_tiny.pixels(2, seed=4)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=hf_tiny.to_torch_pixels(px), do_sample=False, max_new_tokens=6, min_new_tokens=0,
                      eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
  got = generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=6, eos_token_id=(), pad_token_id=0)
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_export_round_trip_loads_back_with_identical_weights(name, tmp_path):
  hf = hf_model(name)
  ours = convert(hf, tmp_path / "hf")
  export_hf(ours, str(tmp_path / "out"))
  back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  assert back.config.text_config.model_type == "qwen2" and not back.config.text_config.use_sliding_window
  original, exported = hf.state_dict(), back.state_dict()
  assert original.keys() == exported.keys()
  for k in original:
    assert torch.equal(original[k], exported[k]), k
  assert LlavaConfig.from_hf(str(tmp_path / "out")).text == ours.config.text


# Qwen2-0.5B-Instruct's config.json as published (LLaVA-OneVision-0.5B's decoder).
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_qwen2_config_json_is_read():
  t = text_config_from_hf(QWEN2_05B)
  assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
      896, 24, 14, 2, 64)
  assert t.vocab_size == 151936 and t.tie_word_embeddings and t.rms_norm_eps == 1e-6
  assert t.rope == {"rope_theta": 1e6, "rope_type": "default"}
  assert t.qkv_bias and not t.attention_bias and not t.mlp_bias and t.sliding_window is None
  assert (t.model_type, t.bos_token_id, t.eos_token_id) == ("qwen2", 151643, 151645)
  seven_b = text_config_from_hf({**QWEN2_05B, "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size":
                                 18944, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                 "tie_word_embeddings": False, "max_window_layers": 28})
  assert seven_b.head_dim == 128 and not seven_b.tie_word_embeddings and seven_b.sliding_window is None


def test_window_on_some_layers_only_is_refused():
  with pytest.raises(ConfigError, match="max_window_layers"):
    text_config_from_hf({**QWEN2_05B, "use_sliding_window": True, "max_window_layers": 21})
  every = text_config_from_hf({**QWEN2_05B, "use_sliding_window": True, "max_window_layers": 0,
                               "sliding_window": 4096})
  assert every.sliding_window == 4096


def test_biases_transformers_cannot_hold_are_refused_on_export():
  small = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12)
  with pytest.raises(ConfigError, match="q/k/v alone"):
    LlavaConfig(text=TextConfig(**small, qkv_bias=True), image_token_index=60).to_hf_dict()
  with pytest.raises(ConfigError, match="q/k/v only"):
    LlavaConfig(text=TextConfig(**small, model_type="qwen2"), image_token_index=60).to_hf_dict()


def test_every_parameter_has_logical_axes_and_the_biases_shard(tmp_path):
  ours = convert(hf_model("untied"), tmp_path / "hf")
  state = nnx.state(ours, nnx.Param)
  named = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  for name, var in named.items():
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, name
  attn = "language_model.layers.0.self_attn."
  assert named[attn + "q_proj.bias"].get_metadata()["out_sharding"] == ("heads",)
  assert named[attn + "k_proj.bias"].get_metadata()["out_sharding"] == ("kv_heads",)
  assert attn + "o_proj.bias" not in named
  mesh = jax.make_mesh((1, 1, 4), ("data", "fsdp", "tensor"), devices=jax.devices()[:4])
  shardings = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(param_shardings(state, mesh))}
  assert shardings[attn + "q_proj.bias"].spec == jax.P("tensor")


def test_training_step_moves_the_qkv_biases():
  config = train_util.tiny_config("stage2", **{"optimizer.lr": 1e-3, "total_steps": 4})
  with config.unlocked():  # the tiny schema says LLaMA
    config.model.text.model_type, config.model.text.qkv_bias = "qwen2", True
  trainer = train_util.make_trainer(config)
  state = trainer.init_state()
  before = train_util.flat(state["params"])
  key = next(k for k in before if k.endswith("layers.0.self_attn.q_proj.bias"))
  losses = []
  for b in train_util.batches(config, 2):
    state, metrics = trainer.step(state, b)
    losses.append(float(metrics["loss"]))
  after = train_util.flat(state["params"])
  assert np.isfinite(losses).all() and not np.array_equal(before[key], after[key])
