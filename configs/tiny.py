"""Tiny LLaVA (CLIP 2x64 at 28px, LLaMA 2x64) for CPU runs, tests and demos; the schema every config shares.

  llava-jax train --config configs/tiny.py:stage1 --workdir runs/tiny --config.total_steps=20

`get_config(arg)`: arg is the stage, stage1 (projector only), stage2 (projector + LLM) or lora (adapters +
projector), with the reference's learning rates. The schema lives in `llava_jax.train.recipes.base_config`;
bigger configs change `model` / `init_checkpoint`, `data`, `mesh` and the batch, the rest stays.
"""

from llava_jax.train import recipes


def get_config(arg: str = "stage1"):
  return recipes.base_config(arg)
