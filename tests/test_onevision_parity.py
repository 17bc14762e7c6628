"""LLaVA-OneVision: our Llava loaded from a saved transformers LlavaOnevisionForConditionalGeneration (PyTorch, CPU,
fp32) against it: logits, greedy generation, the config mapping, `convert` and the export round trip, and the same
weights in the original (lmms-lab) layout. One image per prompt.

Tiny random models: a 56-px SigLIP with 14-px patches (4x4 features a tile), a Qwen2 with GQA and q/k/v biases
(tied and untied), OneVision's 36 pinpoints scaled by 56 / 384, and anyres_max_2, so a grid map above
1.21 * 2 * 16 features is shrunk: small sizes give both shrunk and unshrunk grids.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import hf_tiny
from llava_jax import export_hf, generate, load_checkpoint, load_hf_checkpoint
from llava_jax.cli import main as cli
from llava_jax.config import LlavaConfig
from llava_jax.data import onevision
from llava_jax.data.layout import OneVisionLayout
from llava_jax.safetensors_io import SafetensorsReader

TOL = 1e-4
IMAGE, VIDEO, TILE, PPS, MAX = 60, 61, 56, 4, 2
PINPOINTS = hf_tiny.PINPOINTS_OV_56
LAYOUT = OneVisionLayout(PINPOINTS, tile=TILE, patches_per_side=PPS, max_grid_tiles=MAX)
SHRUNK, KEPT, ONE_BY_ONE, EXTREME = (150, 130), (50, 110), (30, 40), (20, 330)


def onevision_model(tied: bool, seed: int = 0) -> transformers.LlavaOnevisionForConditionalGeneration:
  return hf_tiny.onevision_model(tied, seed, image_token=IMAGE, video_token=VIDEO, pinpoints=PINPOINTS,
                                 max_grid_tiles=MAX)


@pytest.fixture(scope="module", params=["untied", "tied"])
def models(request, tmp_path_factory):
  """(transformers model, its save_pretrained directory, ours loaded from it)."""
  hf = onevision_model(request.param == "tied", seed=len(request.param))
  folder = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(folder)
  return hf, folder, load_hf_checkpoint(str(folder))


def make_batch(rows, seed=0):
  """rows: per prompt, text ids and at most one image size (a tuple) -> left-padded ids, mask, tiles
  [N, batch max, 56, 56, 3] (random: the tiler is tested elsewhere) and image_sizes [N, 2]."""
  input_ids, mask, sizes = hf_tiny.left_padded_rows(rows, IMAGE, LAYOUT.num_image_tokens)
  tiles = max(LAYOUT.num_tiles(hw) for hw in sizes)
  pixels = np.random.default_rng(seed).standard_normal((len(sizes), tiles, TILE, TILE, 3)).astype(np.float32)
  return input_ids, mask, pixels, np.asarray(sizes, np.int64)


def torch_pixels(pixels):
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 1, 4, 2, 3)))


def reference_logits(hf, ids, mask, pixels, sizes):
  ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
  with torch.no_grad():
    return hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              pixel_values=torch_pixels(pixels), image_sizes=torch.as_tensor(sizes)).logits.numpy()


def ours_logits(model, ids, mask, pixels, sizes):
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask), image_sizes=sizes), np.float32)


def test_the_sizes_cover_shrunk_and_kept_grids():
  def grid(hw):
    return onevision.image_grid(hw, PINPOINTS, TILE, PPS, MAX)

  assert grid(SHRUNK)[0] != grid(SHRUNK)[1] and grid(EXTREME)[0] != grid(EXTREME)[1]
  assert grid(KEPT)[0] == grid(KEPT)[1] and LAYOUT.num_tiles(KEPT) > 2
  assert LAYOUT.num_tiles(ONE_BY_ONE) == 2  # the base tile and a 1x1 grid


@pytest.mark.parametrize("hw", [SHRUNK, KEPT, ONE_BY_ONE, EXTREME])
def test_one_image(hw, models):
  hf, _, ours = models
  ids, mask, pixels, sizes = make_batch([[1, 5, hw, 7, 8]])
  err = np.abs(reference_logits(hf, ids, mask, pixels, sizes) - ours_logits(ours, ids, mask, pixels, sizes)).max()
  assert err <= TOL


def test_left_padded_batch(models):
  """One image a row (each kind of grid), a text-only row, left padding; ours also with the layout's slot count."""
  hf, _, ours = models
  ids, mask, pixels, sizes = make_batch([[1, 5, SHRUNK, 7], [1, KEPT, 9, 10, 11, 12], list(range(1, 30)),
                                         [1, 2, ONE_BY_ONE], [1, EXTREME, 3]], seed=1)
  ref = reference_logits(hf, ids, mask, pixels, sizes)
  on = mask.astype(bool)
  assert np.abs(ref - ours_logits(ours, ids, mask, pixels, sizes))[on].max() <= TOL
  slots = np.pad(pixels, ((0, 0), (0, LAYOUT.max_tiles - pixels.shape[1]), (0, 0), (0, 0), (0, 0)))
  assert np.abs(ref - ours_logits(ours, ids, mask, slots, sizes))[on].max() <= TOL
  text_only = ids[2:3, -29:], mask[2:3, -29:]
  with torch.no_grad():
    ref_text = hf(input_ids=torch.as_tensor(text_only[0])).logits.numpy()
  got = np.asarray(ours(jnp.asarray(text_only[0]), None, jnp.asarray(text_only[1])), np.float32)
  assert np.abs(ref_text - got).max() <= TOL


def test_greedy_generation_equals_transformers(models):
  hf, _, ours = models
  ids, mask, pixels, sizes = make_batch([[1, 5, SHRUNK, 7], [1, KEPT, 21, 22], [1, 9, EXTREME]], seed=2)
  new = 8
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      pixel_values=torch_pixels(pixels), image_sizes=torch.as_tensor(sizes), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
  got = generate(ours, ids, jnp.asarray(pixels), mask, image_sizes=sizes, max_new_tokens=new, eos_token_id=(),
                 pad_token_id=0, prompt_bucket=16)
  np.testing.assert_array_equal(got, ref.numpy())


def test_config_mapping(models):
  hf, folder, ours = models
  cfg = ours.config
  assert cfg.is_onevision and cfg.vision_aspect_ratio == "anyres_max_2" and cfg.video_token_index == VIDEO
  assert cfg.vision.model_type == "siglip" and cfg.vision_feature_select_strategy == "full"
  assert cfg.text.model_type == "qwen2" and cfg.text.qkv_bias and cfg.tokenization == "hf"
  assert cfg.text.tie_word_embeddings == hf.config.tie_word_embeddings == (ours.lm_head is None)
  assert cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
  assert LlavaConfig.from_hf(cfg.to_hf_dict()) == cfg
  no_video = cfg.replace(video_token_index=None)  # transformers wants an int; we read back what we wrote
  assert transformers.LlavaOnevisionConfig.from_dict(no_video.to_hf_dict()).video_token_index == 151647
  assert LlavaConfig.from_hf(no_video.to_hf_dict()) == no_video
  head = [k for k in SafetensorsReader(str(folder)).keys() if k.endswith("lm_head.weight")]
  assert bool(head) != cfg.text.tie_word_embeddings


def test_the_released_config_maps():
  """llava-hf's 0.5B OneVision config, as transformers' defaults spell it (SigLIP-so400m less its last layer)."""
  text = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=152000, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=32768, tie_word_embeddings=True, use_sliding_window=False)
  raw = transformers.LlavaOnevisionConfig(text_config=text).to_dict()
  cfg = LlavaConfig.from_hf(raw)
  assert (cfg.vision.model_type, cfg.vision.num_hidden_layers, cfg.vision.image_size, cfg.vision.hidden_size) == \
      ("siglip", 26, 384, 1152)
  assert (cfg.image_token_index, cfg.video_token_index, cfg.vision_feature_layer) == (151646, 151647, -1)
  assert cfg.vision_aspect_ratio == "anyres_max_9" and len(cfg.image_grid_pinpoints) == 36
  assert cfg.tokenization == "hf" and cfg.text.tie_word_embeddings and cfg.projector_bias
  assert cfg.num_image_tokens == 729 and cfg.projector_hidden_act == "gelu"
  out = cfg.to_hf_dict()
  assert out["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
  back = transformers.LlavaOnevisionConfig.from_dict(out)
  assert back.vision_config.num_hidden_layers == 26 and not back.vision_config.vision_use_head
  assert LlavaConfig.from_hf(out) == cfg


def test_export_round_trip_is_bit_identical(models, tmp_path):
  hf, _, ours = models
  export_hf(ours, str(tmp_path / "out"))
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["model_type"] == "llava_onevision" and config["video_token_index"] == VIDEO
  back = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  expected, got = hf.state_dict(), back.state_dict()
  assert set(got) == set(expected)
  for key, value in expected.items():
    assert torch.equal(got[key], value), key
  again = load_hf_checkpoint(str(tmp_path / "out"))
  assert again.config == ours.config


def test_cli_convert_reads_the_llava_hf_directory(models, tmp_path):
  _, folder, ours = models
  assert cli(["convert", "--hf", str(folder), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  loaded = load_checkpoint(str(tmp_path / "ckpt"))
  assert loaded.config == ours.config
  ids, mask, pixels, sizes = make_batch([[1, 5, SHRUNK, 7]])
  np.testing.assert_array_equal(ours_logits(loaded, ids, mask, pixels, sizes), ours_logits(ours, ids, mask, pixels,
                                                                                            sizes))


# -- the original layout (lmms-lab, `LlavaQwenForCausalLM`) --------------------------------------------------------


def original_directory(hf, root):
  """`hf`'s weights under the original names, its config as the original's `mm_*` keys, and the SigLIP directory
  `--clip` names: one layer longer (the original drops the last) and with the pooling head."""
  renames = [("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
             ("model.vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
             ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")]
  tensors = {}
  for key, value in hf.state_dict().items():
    if key == "lm_head.weight" and hf.config.tie_word_embeddings:
      continue
    old = next((o for o, _ in renames if key.startswith(o)), None)
    tensors[key if old is None else dict(renames)[old] + key[len(old):]] = value.contiguous()
  (root / "llava").mkdir()
  safetensors.torch.save_file(tensors, str(root / "llava" / "model.safetensors"))
  vision = hf.config.vision_config
  config = {**hf.config.text_config.to_dict(), "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
            "tie_word_embeddings": hf.config.tie_word_embeddings, "mm_vision_tower": "google/siglip-so400m-patch14-384",
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision.hidden_size, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "image_aspect_ratio": f"anyres_max_{MAX}",
            "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": "spatial_unpad", "image_token_index": 151646}
  (root / "llava" / "config.json").write_text(json.dumps(config))
  siglip = hf_tiny.siglip_vision_config(num_hidden_layers=vision.num_hidden_layers + 1, vision_use_head=True)
  siglip.save_pretrained(root / "siglip")
  return str(root / "llava"), str(root / "siglip")


def test_original_layout_loads_with_its_siglip_directory(models, tmp_path):
  hf, _, ours = models
  llava_dir, siglip_dir = original_directory(hf, tmp_path)
  original = load_hf_checkpoint(llava_dir, clip=siglip_dir)
  cfg = original.config
  assert cfg.vision.num_hidden_layers == 3 and cfg.vision_feature_layer == -1 and cfg.is_onevision
  assert cfg.tokenization == "reference" and cfg.image_token_index == cfg.text.vocab_size
  assert cfg.replace(image_token_index=IMAGE, tokenization="hf", video_token_index=VIDEO) == ours.config
  ids, mask, pixels, sizes = make_batch([[1, 5, SHRUNK, 7], [1, KEPT, 3], [1, 2, EXTREME]], seed=3)
  spliced = np.where(ids == IMAGE, cfg.image_token_index, ids)
  ref = reference_logits(hf, ids, mask, pixels, sizes)
  assert np.abs(ref - ours_logits(original, spliced, mask, pixels, sizes))[mask.astype(bool)].max() <= TOL
  with pytest.raises(ValueError, match="--clip"):
    load_hf_checkpoint(llava_dir)
