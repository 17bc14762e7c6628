"""LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, two-layer GELU projector, Vicuna-7B v1.5; the reference recipe.

  llava-jax train --config configs/llava_v1_5_7b.py:stage1,v5p-64 --workdir gs://BUCKET/llava-7b/stage1 \
      --config.init_checkpoint=CKPT --config.data.json_path=blip_laion_cc_sbu_558k.json --config.data.image_dir=IMGS

`get_config("STAGE[,PRESET]")`: STAGE is stage1 (projector; LLaVA-Pretrain 558k, `plain` template, batch 256,
lr 1e-3), stage2 (projector + LLM; llava_v1_5_mix665k, `vicuna_v1`, batch 128, lr 2e-5) or lora (r 128, alpha 256,
lr 2e-4, projector lr 2e-5); PRESET a hardware preset of configs/mesh_presets.py (default v5p-64). One epoch,
warm-up 0.03, cosine, max length 2048, weight decay 0, images padded to square: scripts/v1_5/*.sh of the reference.
CKPT comes from `llava-jax convert --clip clip-vit-large-patch14-336 --llm vicuna-7b-v1.5` (stage 1) or from the
previous stage's workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mesh_presets  # noqa: E402
import tiny  # noqa: E402

# Samples in one epoch of each stage's data (the reference trains one epoch).
PRETRAIN_SAMPLES = 558_128  # blip_laion_cc_sbu_558k.json
FINETUNE_SAMPLES = 665_298  # llava_v1_5_mix665k.json

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096)


def recipe(arg: str, vision: dict, text: dict, default_preset: str = "v5p-64"):
  """The LLaVA-1.5 recipe around a given model; shared by the 7B and 13B configs."""
  stage, _, preset = arg.partition(",")
  c = tiny.get_config(stage)
  hardware = mesh_presets.get(preset or default_preset)
  c.model = dict(vision=vision, text=text, image_token_index=text["vocab_size"], vision_feature_layer=-2)
  c.dtype, c.param_dtype = "bfloat16", "float32"
  c.remat, c.scan_layers = "full", True
  c.mesh = hardware["mesh"]
  stage1 = stage == "stage1"
  c.batch_size = 256 if stage1 else 128
  c.total_steps = -(-(PRETRAIN_SAMPLES if stage1 else FINETUNE_SAMPLES) // c.batch_size)
  if stage == "lora":
    c.lora = dict(r=128, alpha=256.0, dropout=0.05)
  c.data.kind = "llava"
  c.data.seq_len = 2048
  c.data.template = "plain" if stage1 else "vicuna_v1"
  c.data.aspect_ratio = "pad"
  c.data.group_by_modality_length = not stage1
  c.data.num_workers = 4
  c.checkpoint.every_steps = 500
  c.log.every_steps = 10
  return c


def get_config(arg: str = "stage1"):
  return recipe(arg, CLIP_L_336, VICUNA_7B)
