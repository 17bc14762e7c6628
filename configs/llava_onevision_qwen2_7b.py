"""LLaVA-OneVision-Qwen2-7B: SigLIP so400m-patch14-384 (26 layers kept), two-layer GELU projector,
Qwen2-7B-Instruct (3584 hidden, 28 layers, 28 heads / 4 KV), anyres_max_9 over 384 px tiles up to 2304x2304, `qwen_1_5`.

  llava-jax train --config configs/llava_onevision_qwen2_7b.py:si,v5p-64 --workdir gs://BUCKET/ov-7b/si \
      --config.init_checkpoint=CKPT --config.data.json_path=MIX.json --config.data.image_dir=IMGS

`get_config("STAGE[,PRESET]")`: stage1 (projector; LLaVA-Pretrain 558k, `plain`, lr 1e-3), si (single-image) or
ov (OneVision): tower at 2e-6, projector and LLM at 1e-5, max length 32768. `llava_jax.train.recipes.llava_onevision`
says where each setting comes from.
"""

from llava_jax.train import recipes


def get_config(arg: str = "stage1"):
  return recipes.llava_onevision(arg, recipes.QWEN2_7B)
