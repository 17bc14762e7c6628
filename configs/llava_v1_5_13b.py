"""LLaVA-1.5-13B: CLIP ViT-L/14 at 336 px, two-layer GELU projector, Vicuna-13B v1.5; the reference recipe
(configs/llava_v1_5_7b.py explains the arguments; same batch sizes and learning rates)."""

from llava_jax.train import recipes


def get_config(arg: str = "stage1"):
  return recipes.llava_v1_5(arg, recipes.CLIP_L_336, recipes.VICUNA_13B)
