"""Every config builds; overrides of unknown keys are errors; the 7B/13B configs describe the published models."""

import os

import jax
import pytest
from flax import nnx

from llava_jax.models.llava import Llava
from llava_jax.train import run_config
from llava_jax.train.cli import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["tiny", "llava_v1_5_7b", "llava_v1_5_13b", "llava_v1_7b"]


def config_path(name):
  return os.path.join(ROOT, "configs", f"{name}.py")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("stage", ["stage1", "stage2", "lora"])
def test_every_config_builds(name, stage):
  config, workdir = parse(["--config", f"{config_path(name)}:{stage}", "--workdir", "/tmp/w"])
  assert config.stage == stage and workdir == "/tmp/w"
  cfg = run_config.model_config(config)
  assert cfg.num_image_tokens > 0


@pytest.mark.parametrize("preset, devices", [("v4-32", 16), ("v5p-64", 32), ("v5e-256", 256), ("gpu-8", 8)])
def test_presets_give_meshes_that_divide_their_devices(preset, devices):
  config, _ = parse(["--config", f"{config_path('llava_v1_5_7b')}:stage2,{preset}", "--workdir", "w"])
  data, fsdp, tensor = config.mesh
  assert data * fsdp * tensor == devices
  assert config.batch_size % (data * fsdp) == 0  # the global batch splits over the batch axes


def test_unknown_override_is_an_error():
  with pytest.raises(ValueError, match="config.optimizer.learning_rate"):
    parse(["--config", f"{config_path('tiny')}:stage1", "--workdir", "w", "--config.optimizer.learning_rate=1"])
  with pytest.raises(ValueError, match="unknown stage 'stage3'"):
    parse(["--config", f"{config_path('tiny')}:stage3", "--workdir", "w"])


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_7b_config_has_the_published_parameter_count():
  """LLaVA-1.5-7B: Vicuna-7B (6.74B) + CLIP ViT-L/14-336 (0.30B) + the MLP projector (21M) = 7.06B."""
  config, _ = parse(["--config", f"{config_path('llava_v1_5_7b')}:stage2", "--workdir", "w"])
  params = nnx.state(nnx.eval_shape(lambda: Llava(run_config.model_config(config))), nnx.Param)
  llm, clip, proj = (_count(params[k]) for k in ("language_model", "vision_tower", "multi_modal_projector"))
  llm += _count(params["lm_head"])
  assert abs(llm - 6.738e9) < 0.005e9, llm
  assert abs(clip - 0.3035e9) < 0.001e9, clip
  assert proj == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20.98M
  assert abs(llm + clip + proj - 7.063e9) < 0.005e9
  # The reference recipe.
  assert (config.batch_size, config.optimizer.lr, config.data.seq_len, config.data.template) == (
      128, 2e-5, 2048, "vicuna_v1")
  stage1, _ = parse(["--config", f"{config_path('llava_v1_5_7b')}:stage1", "--workdir", "w"])
  assert (stage1.batch_size, stage1.optimizer.lr, stage1.data.template) == (256, 1e-3, "plain")
  lora, _ = parse(["--config", f"{config_path('llava_v1_5_7b')}:lora", "--workdir", "w"])
  assert (lora.optimizer.lr, lora.optimizer.projector_lr, lora.lora.r, lora.lora.alpha) == (2e-4, 2e-5, 128, 256)


def test_13b_and_v1_configs():
  config, _ = parse(["--config", f"{config_path('llava_v1_5_13b')}:stage2", "--workdir", "w"])
  params = nnx.state(nnx.eval_shape(lambda: Llava(run_config.model_config(config))), nnx.Param)
  assert abs(_count(params) - 13.35e9) < 0.03e9  # Vicuna-13B 13.02B + CLIP 0.30B + projector 0.03B
  v1, _ = parse(["--config", f"{config_path('llava_v1_7b')}:stage1", "--workdir", "w"])
  cfg = run_config.model_config(v1)
  assert cfg.projector_type == "linear" and cfg.vision.image_size == 224 and cfg.num_image_tokens == 256
