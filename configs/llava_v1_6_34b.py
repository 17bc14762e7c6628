"""LLaVA-1.6-34b (LLaVA-NeXT): CLIP ViT-L/14 at 336 px tiles with anyres, two-layer GELU projector,
Nous-Hermes-2-Yi-34B (LLaMA architecture, 64k vocab, GQA 56/8, rope_theta 5e6), `chatml_direct`.

  llava-jax train --config configs/llava_v1_6_34b.py:stage2,v5p-64 --workdir gs://BUCKET/llava-1.6/stage2 \
      --config.init_checkpoint=CKPT --config.data.json_path=MIX.json --config.data.image_dir=IMGS

`get_config("STAGE[,PRESET]")`: stage1 (projector; LLaVA-Pretrain 558k, `plain`, batch 256, lr 1e-3), stage2
(projector + LLM at 2e-5 and the vision tower at 2e-6, batch 128) or lora; max length 4096 (an image is up to 2,928
tokens). `llava_jax.train.recipes.llava_v1_6` says which settings are published and which are 1.5's.
"""

from llava_jax.train import recipes


def get_config(arg: str = "stage1"):
  return recipes.llava_v1_6(arg, recipes.CLIP_L_336, recipes.YI_34B, recipes.NEXT_TEMPLATES["yi"])
