"""LlavaConfig from Hugging Face configs: hub configs with omitted fields, both rope spellings, original LLaVA."""

import pytest

from llava_jax.config import ConfigError, LlavaConfig, VisionConfig, text_config_from_hf

# llava-hf/llava-1.5-7b-hf's config.json as published (transformers 4.36 era: many fields omitted).
HUB_LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_hub_config_gets_hf_defaults():
  cfg = LlavaConfig.from_hf(HUB_LLAVA_15_7B)
  t, v = cfg.text, cfg.vision
  # Omitted fields take LlamaConfig's defaults (7B shapes), as transformers would build the model.
  assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
  assert t.num_key_value_heads == 32 and t.head_dim == 128 and t.vocab_size == 32064
  assert t.rope == {"rope_theta": 10000.0, "rope_type": "default"}
  assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, v.hidden_act) == (
      1024, 24, 336, 14, "quick_gelu")
  assert cfg.image_token_index == 32000 and cfg.vision_feature_layer == -2
  assert cfg.num_image_tokens == 576 and cfg.projector_type == "mlp2x_gelu"


def test_both_rope_spellings_agree():
  base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=8192)
  old = text_config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
      "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}})
  new = text_config_from_hf({**base, "rope_parameters": {
      "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
  assert old == new and old.rope["rope_type"] == "llama3" and old.rope["rope_theta"] == 500000.0
  linear = text_config_from_hf({**base, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert linear.rope == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}


def test_unsupported_rope_is_an_error():
  with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
    text_config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_original_llava_config_needs_and_uses_the_clip_config():
  raw = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 5120,
         "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40, "vocab_size": 32000,
         "max_position_embeddings": 4096, "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
         "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
         "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad"}
  with pytest.raises(ConfigError, match="openai/clip-vit-large-patch14-336"):
    LlavaConfig.from_hf(raw)
  cfg = LlavaConfig.from_hf(raw, vision=VisionConfig())
  assert cfg.text.num_hidden_layers == 40 and cfg.projector_type == "mlp2x_gelu"
  assert cfg.vision_feature_select_strategy == "default" and cfg.image_token_index == 32000
  v1 = LlavaConfig.from_hf({**raw, "mm_projector_type": "linear", "mm_vision_select_feature": "cls_patch",
                            "mm_vision_select_layer": -1}, vision=VisionConfig())
  assert (v1.projector_type, v1.vision_feature_select_strategy, v1.vision_feature_layer) == ("linear", "full", -1)
  with pytest.raises(ConfigError, match="mm_hidden_size 768"):
    LlavaConfig.from_hf({**raw, "mm_hidden_size": 768}, vision=VisionConfig())


def test_hf_dict_and_own_dict_round_trip():
  cfg = LlavaConfig.from_hf(HUB_LLAVA_15_7B).replace(vision_feature_layer=(-3, -1))
  assert LlavaConfig.from_hf(cfg.to_hf_dict()) == cfg
  assert LlavaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(projector_type="mlp3x"), "projector_type 'mlp3x'"),
    (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy 'cls'"),
    (dict(vision_feature_layer=30), "vision_feature_layer 30 is outside"),
])
def test_bad_values_are_named(change, message):
  with pytest.raises(ConfigError, match=message):
    LlavaConfig(**change)


def test_unknown_architecture():
  with pytest.raises(ConfigError, match="unknown architecture: model_type='blip-2'"):
    LlavaConfig.from_hf({"model_type": "blip-2"})
