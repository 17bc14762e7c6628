"""Tiny LLaVA-NeXT (CLIP 2x64 at 28 px tiles, LLaMA 2x64, anyres over the 1.6 pinpoints scaled to 28 px) for CPU
runs, tests and the main job with anyres:

  llava-jax train --config configs/tiny_next.py:stage2 --workdir runs/tiny-next --config.total_steps=20

`get_config(arg)`: arg is the stage (stage1, stage2, lora) as in configs/tiny.py. An image takes up to 5 tiles and
88 image tokens; add --config.train_vision_tower=True (stage2) to train the vision tower at
--config.optimizer.vision_tower_lr.
"""

from llava_jax.train import recipes


def get_config(arg: str = "stage2"):
  return recipes.tiny_next(arg)
