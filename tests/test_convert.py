"""HF <-> Orbax conversion: every input layout, round trips, and bad checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from hf_tiny import IMAGE_TOKEN
from llava_jax import export_hf, load_checkpoint
from llava_jax.checkpoint_files import CheckpointError
from llava_jax.cli import main as cli
from llava_jax.convert import ConversionError, canonical_key
from llava_jax.safetensors_io import CheckpointFileError, SafetensorsReader, write_safetensors

N_IMG = 16  # tiny CLIP: 28px / 7px patches


@pytest.fixture(scope="module")
def hf_model():
  return hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  d = tmp_path_factory.mktemp("llava_hf")
  hf_model.save_pretrained(d)
  (d / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 28, "width": 28}}))
  return d


def inputs(image_token=IMAGE_TOKEN):
  ids = np.array([[1, 4, 5] + [image_token] * N_IMG + [6, 7], [1, 9] + [image_token] * N_IMG + [2, 3, 8]])
  return ids, np.ones_like(ids), hf_tiny.pixels(2, seed=3)


def our_logits(model, ids, mask, px):
  return np.asarray(model(jnp.asarray(ids), None if px is None else jnp.asarray(px), jnp.asarray(mask)))


def tensors(path):
  reader = SafetensorsReader(path)
  return {k: reader.get(k) for k in reader.keys()}


def test_roundtrip_hf_orbax_hf_is_bit_identical_and_loads_in_transformers(hf_model, hf_dir, tmp_path):
  assert cli(["convert", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  assert (tmp_path / "ckpt" / "assets" / "preprocessor_config.json").exists()  # assets travel with it
  model = load_checkpoint(str(tmp_path / "ckpt"))
  ids, mask, px = inputs()
  ref = hf_tiny.reference_logits(hf_model, ids, px, mask)
  np.testing.assert_allclose(our_logits(model, ids, mask, px), ref, atol=1e-4)

  # A tiny shard limit forces the sharded layout with an index.
  assert cli(["export-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
              "--max-shard-gb", str(20_000 / 2**30)]) == 0
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  original, exported = tensors(hf_dir), tensors(tmp_path / "out")
  assert original.keys() == exported.keys()
  for k in original:
    assert original[k].dtype == exported[k].dtype and np.array_equal(original[k], exported[k]), k

  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_array_equal(hf_tiny.reference_logits(reloaded, ids, px, mask), ref)


def _rewrite(src, dst, rename, shard_bytes=2**40):
  os.makedirs(dst, exist_ok=True)
  reader = SafetensorsReader(src)
  write_safetensors(((rename(k), reader.get(k)) for k in reader.keys()), str(dst), shard_bytes)
  for name in ("config.json",):
    (dst / name).write_text((src / name).read_text())


def _hub_name(k):
  return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k


def _in_memory_name(k):
  for a, b in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
    if k.startswith(a):
      return b + k[len(a):]
  return k


@pytest.mark.parametrize("layout", ["hub_sharded", "in_memory"])
def test_other_llava_hf_layouts(hf_model, hf_dir, tmp_path, layout):
  rename, shard = (_hub_name, 30_000) if layout == "hub_sharded" else (_in_memory_name, 2**40)
  _rewrite(hf_dir, tmp_path / "hf", rename, shard)
  if layout == "hub_sharded":
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert any(k.startswith("vision_tower.vision_model.") for k in SafetensorsReader(tmp_path / "hf").keys())
  ids, mask, px = inputs()
  ref = hf_tiny.reference_logits(hf_model, ids, px, mask)
  # transformers reads this layout too, so it is a real one, not one we made up.
  hf_reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  np.testing.assert_array_equal(hf_tiny.reference_logits(hf_reloaded, ids, px, mask), ref)
  assert cli(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  np.testing.assert_allclose(our_logits(load_checkpoint(str(tmp_path / "ckpt")), ids, mask, px), ref, atol=1e-4)


@pytest.fixture(scope="module")
def clip_and_llm_dirs(hf_model, tmp_path_factory):
  """A full CLIPModel (text tower included, to be ignored) and a LlamaForCausalLM holding the llava's weights."""
  root = tmp_path_factory.mktemp("parts")
  vcfg = hf_model.config.vision_config
  clip_cfg = transformers.CLIPConfig(
      vision_config=vcfg.to_dict(),
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=50, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
      projection_dim=16)
  clip = transformers.CLIPModel(clip_cfg)
  clip.vision_model.load_state_dict(hf_model.model.vision_tower.state_dict())
  clip.save_pretrained(root / "clip")
  llm = transformers.LlamaForCausalLM(hf_model.config.text_config)
  llm.model.load_state_dict(hf_model.model.language_model.state_dict())
  llm.lm_head.load_state_dict(hf_model.lm_head.state_dict())
  llm.save_pretrained(root / "llm")
  return root / "clip", root / "llm", llm


def test_clip_plus_llm_gives_fresh_stage1_start(hf_model, clip_and_llm_dirs, tmp_path):
  clip_dir, llm_dir, llm = clip_and_llm_dirs
  assert cli(["convert", "--clip", str(clip_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "ckpt"),
              "--quiet"]) == 0
  model = load_checkpoint(str(tmp_path / "ckpt"))
  cfg = model.config
  assert cfg.image_token_index == cfg.text.vocab_size  # spliced, as in the reference: outside the vocabulary
  # The fresh projector follows torch nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  k1 = np.asarray(model.multi_modal_projector.linear_1.kernel[...])
  assert np.abs(k1).max() <= 1 / np.sqrt(k1.shape[0]) and k1.std() > 0.5 / np.sqrt(3 * k1.shape[0])
  # Text-only: exactly the LLM.
  ids = np.array([[1, 5, 9, 13, 2]])
  with torch.no_grad():
    ref = llm(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(our_logits(model, ids, np.ones_like(ids), None), ref, atol=1e-4)
  # With an image: the llava reference holding our fresh projector.
  ref_model = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  ref_model.load_state_dict(hf_model.state_dict())
  for name in ("linear_1", "linear_2"):
    layer = getattr(model.multi_modal_projector, name)
    getattr(ref_model.model.multi_modal_projector, name).weight.data = torch.from_numpy(
        np.asarray(layer.kernel[...]).T.copy())
    getattr(ref_model.model.multi_modal_projector, name).bias.data = torch.from_numpy(np.array(layer.bias[...]))
  ids, mask, px = inputs(cfg.image_token_index)
  ref_ids, _, _ = inputs()
  np.testing.assert_allclose(our_logits(model, ids, mask, px), hf_tiny.reference_logits(ref_model, ref_ids, px, mask),
                             atol=1e-4)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_original_llava_format_with_clip_dir(hf_model, hf_dir, clip_and_llm_dirs, tmp_path, projector):
  clip_dir, _, _ = clip_and_llm_dirs
  ref_model = hf_tiny.llava_model(text=hf_tiny.text_config(num_key_value_heads=2))
  ref_model.load_state_dict(hf_model.state_dict())
  if projector == "linear":  # LLaVA-1.0: one Linear connector
    ref_model.model.multi_modal_projector = torch.nn.Linear(32, 48)

  def original_name(k):
    for a, b in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                 ("multi_modal_projector.linear_2.", "model.mm_projector.2.")):
      if k.startswith(a):
        return b + k[len(a):]
    return k

  state = {"language_model.model." + k: v for k, v in ref_model.model.language_model.state_dict().items()}
  state["language_model.lm_head.weight"] = ref_model.lm_head.weight
  if projector == "linear":
    state.update({"model.mm_projector." + k: v for k, v in ref_model.model.multi_modal_projector.state_dict().items()})
  else:
    state.update({"multi_modal_projector." + k: v
                  for k, v in ref_model.model.multi_modal_projector.state_dict().items()})
  out = tmp_path / "orig"
  out.mkdir()
  write_safetensors({original_name(k): v.detach().numpy() for k, v in state.items()}, str(out))
  config = hf_model.config.text_config.to_dict()
  config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_vision_tower="openai/clip",
                mm_projector_type=projector, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                mm_hidden_size=32, image_aspect_ratio="pad")
  (out / "config.json").write_text(json.dumps(config))

  with pytest.raises(ValueError, match="--clip"):
    load_hf = __import__("llava_jax").load_hf_checkpoint
    load_hf(str(out))
  assert cli(["convert", "--hf", str(out), "--clip", str(clip_dir), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  model = load_checkpoint(str(tmp_path / "ckpt"))
  assert model.config.projector_type == projector
  ids, mask, px = inputs(model.config.image_token_index)
  ref_ids, _, _ = inputs()
  np.testing.assert_allclose(our_logits(model, ids, mask, px), hf_tiny.reference_logits(ref_model, ref_ids, px, mask),
                             atol=1e-4)


def test_dtype_flag_converts(hf_dir, tmp_path):
  assert cli(["convert", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16",
              "--quiet"]) == 0
  model = load_checkpoint(str(tmp_path / "ckpt"))
  assert model.config.param_dtype == "bfloat16"
  assert model.lm_head.kernel[...].dtype == jnp.bfloat16


# -- bad inputs --------------------------------------------------------------------------------------------------


def _broken_copy(hf_dir, dst, edit):
  dst.mkdir()
  state = tensors(hf_dir)
  edit(state)
  write_safetensors(state, str(dst))
  (dst / "config.json").write_text((hf_dir / "config.json").read_text())


@pytest.mark.parametrize("problem, edit, message", [
    ("missing", lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"),
     r"missing keys \(1\):\s+language_model.model.layers.1.mlp.up_proj.weight"),
    ("extra", lambda s: s.update({"language_model.model.layers.7.mlp.up_proj.weight": np.zeros(3, np.float32)}),
     r"unexpected keys \(1\):\s+language_model.model.layers.7.mlp.up_proj.weight"),
    ("shape", lambda s: s.update({"multi_modal_projector.linear_2.bias": np.zeros(5, np.float32)}),
     r"wrong shapes \(1\):\s+multi_modal_projector.linear_2.bias: checkpoint \(5,\), model expects \(48,\)"),
])
def test_bad_checkpoint_is_named_and_nothing_is_written(hf_dir, tmp_path, problem, edit, message, capsys):
  _broken_copy(hf_dir, tmp_path / "bad", edit)
  with pytest.raises(ConversionError, match=message):
    __import__("llava_jax").convert_checkpoint(str(tmp_path / "out"), hf=str(tmp_path / "bad"), progress=False)
  assert cli(["convert", "--hf", str(tmp_path / "bad"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
  assert problem and "does not match" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["bad"]  # no output, no partial directory


def test_truncated_safetensors_is_named(hf_dir, tmp_path):
  (tmp_path / "bad").mkdir()
  data = (hf_dir / "model.safetensors").read_bytes()
  (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) - 1000])
  (tmp_path / "bad" / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(CheckpointFileError, match=r"model.safetensors: truncated safetensors file: tensor '.+'"):
    __import__("llava_jax").convert_checkpoint(str(tmp_path / "out"), hf=str(tmp_path / "bad"), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_unknown_architecture_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "architectures": ["Qwen2VL"]}))
  with pytest.raises(ValueError, match="unknown architecture: model_type='qwen2_vl'"):
    __import__("llava_jax").load_hf_checkpoint(str(tmp_path))


def test_checkpoint_whose_shapes_do_not_match_its_config(hf_dir, tmp_path):
  assert cli(["convert", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  cfg_path = tmp_path / "ckpt" / "llava_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["text"]["intermediate_size"] += 8
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"wrong shape language_model.layers.0.mlp.down_proj.kernel"):
    load_checkpoint(str(tmp_path / "ckpt"))


def test_existing_output_is_not_overwritten(hf_dir, tmp_path):
  (tmp_path / "ckpt").mkdir()
  assert cli(["convert", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 2


def test_export_refuses_what_transformers_cannot_hold(clip_and_llm_dirs, tmp_path):
  clip_dir, llm_dir, _ = clip_and_llm_dirs
  model = __import__("llava_jax").load_hf_checkpoint(clip=str(clip_dir), llm=str(llm_dir))
  with pytest.raises(ValueError, match="image_token_index 64 is outside the vocabulary"):
    export_hf(model, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_key_layouts():
  assert canonical_key("model.language_model.layers.0.mlp.up_proj.weight", "llava_hf") == \
      "language_model.model.layers.0.mlp.up_proj.weight"
  assert canonical_key("vision_model.embeddings.position_ids", "clip") is None
  assert canonical_key("encoder.layers.0.mlp.fc1.weight", "clip") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
  assert canonical_key("text_model.embeddings.token_embedding.weight", "clip") is None
  assert canonical_key("model.mm_projector.weight", "original") == "multi_modal_projector.linear_1.weight"
  assert canonical_key("model.layers.0.self_attn.rotary_emb.inv_freq", "original") is None


def test_checkpoint_in_many_parts_loads_whole(hf_dir, tmp_path):
  """The writer bounds memory by saving slices; a checkpoint of many slices restores to the same model."""
  from llava_jax.checkpoint import params_of, write_checkpoint

  model = __import__("llava_jax").load_hf_checkpoint(str(hf_dir))
  write_checkpoint(str(tmp_path / "ckpt"), model.config, params_of(model), part_bytes=20_000)
  assert len(os.listdir(tmp_path / "ckpt" / "params")) > 5
  again = load_checkpoint(str(tmp_path / "ckpt"))
  for (path, a), (_, b) in zip(_leaves(params_of(model)), _leaves(params_of(again))):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path


def _leaves(tree, prefix=()):
  for k in sorted(tree, key=str):
    v = tree[k]
    yield from (_leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])
