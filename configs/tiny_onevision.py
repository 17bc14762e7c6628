"""Tiny LLaVA-OneVision (SigLIP-style 2x64 tower at 28 px tiles, Qwen2-style 2x64 decoder, anyres_max_9 over 1x1 ...
6x6 tiles) for CPU runs and tests:

  llava-jax train --config configs/tiny_onevision.py:si --workdir runs/tiny-ov --config.total_steps=20

`get_config(arg)`: arg is a OneVision stage (stage1, si, ov). Random rows by default (data.kind="synthetic"); on
LLaVA data with a Qwen2 tokenizer (<|im_start|> / <|im_end|>, for qwen_1_5):

  llava-jax train --config configs/tiny_onevision.py:si --workdir runs/tiny-ov --config.data.kind=llava \
      --config.data.json_path=data.json --config.data.image_dir=images --config.data.tokenizer=TOK \
      --config.data.max_images_per_sample=2

with --config.model.text.vocab_size, model.image_token_index and model.video_token_index set past the tokenizer's
ids (tests/test_train_onevision_cli.py does this).
"""

from llava_jax.train import recipes


def get_config(arg: str = "si"):
  return recipes.tiny_onevision(arg)
