"""LLaVA-1.5-13B: CLIP ViT-L/14 at 336 px, two-layer GELU projector, Vicuna-13B v1.5; the reference recipe
(configs/llava_v1_5_7b.py explains the arguments; same batch sizes and learning rates)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llava_v1_5_7b  # noqa: E402

VICUNA_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, head_dim=128, max_position_embeddings=4096)


def get_config(arg: str = "stage1"):
  return llava_v1_5_7b.recipe(arg, llava_v1_5_7b.CLIP_L_336, VICUNA_13B)
