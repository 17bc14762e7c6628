"""Tiny LLaVA-OneVision (SigLIP-style 2x64 tower at 28 px tiles, Qwen2-style 2x64 decoder, anyres_max_9 over 1x1 ...
6x6 tiles) for CPU runs and tests:

  llava-jax train --config configs/tiny_onevision.py:si --workdir runs/tiny-ov --config.total_steps=20

`get_config(arg)`: arg is a OneVision stage (stage1, si, ov). Random rows only (data.kind="synthetic") until the
data pipeline places OneVision images.
"""

from llava_jax.train import recipes


def get_config(arg: str = "si"):
  return recipes.tiny_onevision(arg)
