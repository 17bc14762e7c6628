"""LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, two-layer GELU projector, Vicuna-7B v1.5; the reference recipe.

  llava-jax train --config configs/llava_v1_5_7b.py:stage1,v5p-64 --workdir gs://BUCKET/llava-7b/stage1 \
      --config.init_checkpoint=CKPT --config.data.json_path=blip_laion_cc_sbu_558k.json --config.data.image_dir=IMGS

`get_config("STAGE[,PRESET]")`: STAGE is stage1 (projector; LLaVA-Pretrain 558k, `plain` template, batch 256,
lr 1e-3), stage2 (projector + LLM; llava_v1_5_mix665k, `vicuna_v1`, batch 128, lr 2e-5) or lora (r 128, alpha 256,
lr 2e-4, projector lr 2e-5); PRESET a hardware preset of `llava_jax.train.recipes.PRESETS` (default v5p-64). One
epoch, warm-up 0.03, cosine, max length 2048, weight decay 0, images padded to square: scripts/v1_5/*.sh of the
reference. CKPT comes from `llava-jax convert --clip clip-vit-large-patch14-336 --llm vicuna-7b-v1.5` (stage 1) or
from the previous stage's workdir.
"""

from llava_jax.train import recipes


def get_config(arg: str = "stage1"):
  return recipes.llava_v1_5(arg, recipes.CLIP_L_336, recipes.VICUNA_7B)
