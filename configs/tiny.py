"""Tiny LLaVA (CLIP 2x64 at 28px, LLaMA 2x64) for CPU runs, tests and demos; the schema every config shares.

  llava-jax train --config configs/tiny.py:stage1 --workdir runs/tiny --config.total_steps=20

`get_config(arg)`: arg is the stage, stage1 (projector only), stage2 (projector + LLM) or lora (adapters +
projector), with the reference's learning rates. Bigger configs change `model` / `init_checkpoint`, `data`,
`mesh` and the batch; the rest of the schema stays.
"""

import ml_collections
from ml_collections import config_dict

# The reference's per-stage learning rates (LLaVA-1.5 scripts).
STAGE_LR = {"stage1": 1e-3, "stage2": 2e-5, "lora": 2e-4}


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
  if arg not in STAGE_LR:
    raise ValueError(f"unknown stage {arg!r}: use configs/tiny.py:stage1, :stage2 or :lora")
  c = ml_collections.ConfigDict()
  c.stage = arg
  c.seed = 0
  c.distributed = "auto"  # jax.distributed.initialize() when launched as several processes ("yes" / "no")

  # Model: from a `llava-jax convert` directory if set, else built from `model` and freshly initialised.
  c.init_checkpoint = ""
  c.model = dict(
      vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=28, patch_size=7),
      text=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
      image_token_index=256, vision_feature_layer=-2)
  c.dtype = "float32"        # compute; "bfloat16" on accelerators
  c.param_dtype = "float32"  # master weights and optimizer state
  c.attention_impl = "xla"
  c.remat = "none"           # none | full | dots_saveable
  c.scan_layers = False

  # Steps and batch: batch_size is global (all hosts), split into grad_accum_steps micro-batches.
  c.total_steps = 100
  c.batch_size = 8
  c.grad_accum_steps = 1
  c.optimizer = dict(lr=STAGE_LR[arg], projector_lr=config_dict.placeholder(float), warmup_ratio=0.03,
                     weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
  if arg == "lora":
    c.optimizer.projector_lr = 2e-5
  c.lora = dict(r=8, alpha=16.0, dropout=0.05)  # the 7B/13B recipe: r=128, alpha=256

  # Mesh (data, fsdp, tensor), -1 takes the remaining devices; logical axis -> mesh axes.
  c.mesh = (-1, 1, 1)
  c.sharding_rules = (
      ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vision_embed", "fsdp"), ("mlp", "tensor"),
      ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"), ("norm", None))

  # Data: "synthetic" random rows, or "llava" (LLaVA JSON + image folder, or TFDS) through the grain pipeline.
  c.data = dict(
      kind="synthetic", seq_len=48, num_distinct_batches=0,
      json_path="", image_dir="", tfds_name="", tfds_data_dir="",
      template="plain" if arg == "stage1" else "vicuna_v1", tokenizer="", image_processor="",
      aspect_ratio="pad", shuffle=True, group_by_modality_length=False, packing=False, num_workers=0)

  c.checkpoint = dict(every_steps=50, keep=3, async_save=True)
  c.log = dict(every_steps=10, progress=True, tensorboard=True, peak_tflops=0.0)  # 0: by device kind
  return c
