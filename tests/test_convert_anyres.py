"""LLaVA-NeXT conversion: the three key layouts a 1.6 checkpoint comes in, and export back to transformers.

  transformers 5 in memory  model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*,
                            model.image_newline, lm_head.*
  llava-hf hub (older)      language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
                            multi_modal_projector.*, image_newline
  original liuhaotian 1.6   LlavaMistralForCausalLM config with mm_* keys; model.*, lm_head.*,
                            model.mm_projector.{0,2}.*, model.image_newline,
                            model.vision_tower.vision_tower.vision_model.* (llava/model/llava_arch.py)

The oracle is the transformers model the files were written from: its logits, and its own tensors.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import hf_tiny
from hf_tiny import IMAGE_TOKEN, PINPOINTS_56
from llava_jax import load_checkpoint, load_hf_checkpoint
from llava_jax.checkpoint import model_from_params, params_of
from llava_jax.cli import main as cli
from llava_jax.convert import export_hf
from llava_jax.data.layout import AnyresGeometry

TOL = 1e-4
HF_GEOMETRY = AnyresGeometry(PINPOINTS_56, tile=56, patches_per_side=4)
ORIGINAL_GEOMETRY = AnyresGeometry(PINPOINTS_56, tile=56, patches_per_side=4, semantics="original")
WIDE = (57, 113)  # a size both semantics treat alike (asserted below), so the original layout can be compared too


@pytest.fixture(scope="module")
def hf():
  return hf_tiny.llava_next_model(text=hf_tiny.mistral_text_config(sliding_window=8))


def state(hf_model):
  return {k: v.detach().contiguous() for k, v in hf_model.state_dict().items()}


def write_dir(folder, config: dict, tensors: dict):
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(config))
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


def renamed(tensors: dict, rules) -> dict:
  out = {}
  for key, value in tensors.items():
    for pattern, repl in rules:
      if re.search(pattern, key):
        key = re.sub(pattern, repl, key, count=1)
        break
    out[key] = value
  return out


# From transformers 5's in-memory names (hf.state_dict()) to the other two layouts.
HUB_RULES = [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
             (r"^model\.vision_tower\.", "vision_tower.vision_model."), (r"^model\.", "")]
ORIGINAL_RULES = [(r"^model\.language_model\.", "model."), (r"^model\.vision_tower\.",
                                                             "model.vision_tower.vision_tower.vision_model."),
                  (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
                  (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2.")]


def original_config(hf_model) -> dict:
  """What a liuhaotian/llava-v1.6-mistral-7b config.json holds: the Mistral config plus the mm_* keys."""
  text = hf_model.config.text_config.to_dict()
  text.update(architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral", image_aspect_ratio="anyres",
              image_grid_pinpoints=PINPOINTS_56, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
              mm_hidden_size=hf_model.config.vision_config.hidden_size, mm_vision_select_layer=-2,
              mm_vision_select_feature="patch", mm_vision_tower="openai/clip-vit-large-patch14-336",
              mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_vision_tower_lr=2e-6,
              unfreeze_mm_vision_tower=True, tokenizer_padding_side="right")
  return text


def prompt(image_token, hw=WIDE):
  ids = np.asarray([[1, 5, 6] + [image_token] * HF_GEOMETRY.num_image_tokens(hw) + [7, 8, 9]])
  tiles = np.random.default_rng(0).standard_normal((1, HF_GEOMETRY.num_tiles(hw), 56, 56, 3)).astype(np.float32)
  return ids, tiles, np.asarray([hw])


def assert_matches(hf_model, ours, image_token=IMAGE_TOKEN):
  ids, tiles, sizes = prompt(IMAGE_TOKEN)
  ref = hf_tiny.next_reference_logits(hf_model, ids, tiles, None, sizes)
  got = np.asarray(ours(jnp.asarray(np.where(ids == IMAGE_TOKEN, image_token, ids)), jnp.asarray(tiles),
                        image_sizes=sizes))
  assert np.abs(ref - got).max() <= TOL


def test_both_llava_hf_layouts_convert_to_the_same_model(hf, tmp_path):
  tensors = state(hf)
  assert "model.image_newline" in tensors and "lm_head.weight" in tensors
  config = hf.config.to_dict()
  memory = write_dir(tmp_path / "memory", config, tensors)
  hub = write_dir(tmp_path / "hub", config, renamed(tensors, HUB_RULES))
  assert {"image_newline", "vision_tower.vision_model.post_layernorm.weight",
          "language_model.lm_head.weight"} <= set(renamed(tensors, HUB_RULES))

  assert cli(["convert", "--hf", str(memory), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  ours = load_checkpoint(str(tmp_path / "ckpt"))
  assert ours.config.is_next and ours.config.text.model_type == "mistral" and ours.config.text.sliding_window == 8
  assert ours.config.image_grid_pinpoints == tuple(map(tuple, PINPOINTS_56)) and ours.config.anyres_semantics == "hf"
  np.testing.assert_array_equal(np.asarray(ours.image_newline[...]), tensors["model.image_newline"].numpy())
  assert_matches(hf, ours)
  from_hub = load_hf_checkpoint(str(hub))
  jax.tree.map(np.testing.assert_array_equal, params_of(from_hub), params_of(ours))


def test_cli_refusal_to_overwrite_names_the_flag(hf, tmp_path, capsys):
  hf.save_pretrained(tmp_path / "hf")
  (tmp_path / "taken").mkdir()
  assert cli(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "taken"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "taken already exists; remove it or pass --overwrite" in err and "overwrite=True" not in err
  assert cli(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  assert cli(["export-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "taken")]) == 2
  err = capsys.readouterr().err
  assert "taken already exists; remove it or pass --overwrite" in err and "overwrite=True" not in err


def test_original_llava_1_6_layout_with_clip(hf, tmp_path):
  """The original checkpoint carries its own (trained) tower; --clip gives the tower's config, and its weights
  lose to the checkpoint's. The converted model keeps the reference's anyres semantics."""
  assert (HF_GEOMETRY.feature_index(WIDE) == ORIGINAL_GEOMETRY.feature_index(WIDE)).all()
  tensors = renamed(state(hf), ORIGINAL_RULES)
  assert {"model.image_newline", "model.mm_projector.2.bias", "lm_head.weight", "model.embed_tokens.weight",
          "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"} <= set(tensors)
  original = write_dir(tmp_path / "original", original_config(hf), tensors)
  clip = transformers.CLIPVisionModel(hf.config.vision_config)  # same shapes, other (fresh) weights
  clip.save_pretrained(tmp_path / "clip")

  assert cli(["convert", "--hf", str(original), "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "ckpt"),
              "--quiet"]) == 0
  ours = load_checkpoint(str(tmp_path / "ckpt"))
  cfg = ours.config
  assert cfg.anyres_semantics == "original" and cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS_56))
  assert cfg.text.model_type == "mistral" and cfg.image_token_index == cfg.text.vocab_size == 64
  assert_matches(hf, ours, image_token=cfg.image_token_index)
  # Where the semantics differ the original's holds: a 20x30 image, no larger than a tile, goes on a canvas
  # 56 wide x 112 high (the reference reads [56, 112] as width, height), a 2x1 grid = an 8x4 feature map; its
  # aspect 30/20 > 4/8 crops the rows to int(20 * 4 / 30) = 2: 16 base features + 2 * 4 + 2 newlines = 26.
  ids, tiles, sizes = prompt(cfg.image_token_index, hw=(20, 30))
  with pytest.raises(ValueError, match="do not match"):  # the hf count (44) is not the original's
    ours(jnp.asarray(ids), jnp.asarray(tiles), image_sizes=sizes)
  ids = np.asarray([[1] + [cfg.image_token_index] * 26 + [2]])
  assert np.isfinite(np.asarray(ours(jnp.asarray(ids), jnp.asarray(tiles), image_sizes=sizes))).all()

  # Pinpoints written as a Python literal string, which the reference also accepts.
  config = dict(original_config(hf), image_grid_pinpoints=str(PINPOINTS_56))
  (original / "config.json").write_text(json.dumps(config))
  assert load_hf_checkpoint(str(original), clip=str(tmp_path / "clip")).config == ours.config


def test_export_loads_in_transformers_and_round_trips(hf, tmp_path):
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"))
  export_hf(ours, str(tmp_path / "export"))
  back = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
  assert back.config.text_config.model_type == "mistral" and back.config.text_config.sliding_window == 8
  ids, tiles, sizes = prompt(IMAGE_TOKEN)
  np.testing.assert_array_equal(hf_tiny.next_reference_logits(back, ids, tiles, None, sizes),
                                hf_tiny.next_reference_logits(hf, ids, tiles, None, sizes))
  again = load_hf_checkpoint(str(tmp_path / "export"))
  assert again.config == ours.config
  jax.tree.map(np.testing.assert_array_equal, params_of(again), params_of(ours))


def test_export_keeps_original_semantics(hf, tmp_path):
  """An original-semantics model exports as LlavaNext (transformers computes its own semantics there) and its
  semantics come back when we load the export."""
  hf.save_pretrained(tmp_path / "hf")
  ours = load_hf_checkpoint(str(tmp_path / "hf"))
  original = model_from_params(ours.config.replace(anyres_semantics="original"), params_of(ours))
  export_hf(original, str(tmp_path / "export"))
  assert load_hf_checkpoint(str(tmp_path / "export")).config.anyres_semantics == "original"
  assert transformers.LlavaNextConfig.from_pretrained(tmp_path / "export").image_grid_pinpoints == PINPOINTS_56
