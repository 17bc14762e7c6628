"""The pieces every training config shares: the config schema (with the tiny model's values), the reference's
per-stage learning rates and optimizer groups, the published model dimensions, the LLaVA-1.5 recipe and the
hardware presets.

`configs/*.py` are short files that import these from the installed package (`from llava_jax.train import
recipes`), so a config runs from any directory and nothing reaches into `configs/` through `sys.path`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from llava_jax.sharding import DEFAULT_RULES
from llava_jax.train.optim import FROZEN, Group, OptimConfig, resolve_groups

# The reference's per-stage learning rates: LLaVA-1.5's scripts, and LLaVA-OneVision's single-image ("si") and
# OneVision ("ov") stages (LLaVA-NeXT's scripts/train/finetune_{si,ov}.sh: --learning_rate 1e-5).
STAGE_LR = {"stage1": 1e-3, "stage2": 2e-5, "lora": 2e-4, "si": 1e-5, "ov": 1e-5}

# What each stage trains, as optimizer group entries (name, pattern over parameter paths, lr): train/optim.py says
# how they match. The names key the optimizer state: keep them, or old workdirs no longer restore. LLaVA-NeXT's
# image_newline trains with the LLM: LLaVA-NeXT's train.py unfreezes it under "mm_language_model" (every parameter
# outside vision_tower and mm_projector), not under "mm_mlp_adapter".
LLM_PARTS = "language_model|lm_head|image_newline"
# train_vision_tower (stage2): the tower's entry instead of the frozen one, at its own rate (LLaVA-1.6's
# mm_vision_tower_lr with mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model").
TRAINED_VISION_TOWER = ("vision", "vision_tower", "vision_tower_lr")
# OneVision's si and ov stages train everything: mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,
# mm_language_model", the tower at mm_vision_tower_lr.
_EVERYTHING = (TRAINED_VISION_TOWER, ("projector", "multi_modal_projector", "projector_lr"), ("llm", LLM_PARTS, "lr"))
STAGE_GROUPS = {
    "stage1": ((FROZEN, "vision_tower", FROZEN), ("projector", "multi_modal_projector", "projector_lr"),
               (FROZEN, LLM_PARTS, FROZEN)),
    "stage2": ((FROZEN, "vision_tower", FROZEN), ("projector", "multi_modal_projector", "projector_lr"),
               ("llm", LLM_PARTS, "lr")),
    "lora": ((FROZEN, "vision_tower", FROZEN), ("projector", "multi_modal_projector", "projector_lr"),
             (FROZEN, LLM_PARTS, FROZEN), ("lora", "lora", "lr")),
    "si": _EVERYTHING,
    "ov": _EVERYTHING,
}
STAGES = tuple(STAGE_GROUPS)
LLAVA_STAGES = ("stage1", "stage2", "lora")  # what the LLaVA-1.x configs offer
ONEVISION_STAGES = ("stage1", "si", "ov")    # what the LLaVA-OneVision configs offer


def check_stage(stage: str) -> None:
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r} is not one of {STAGES}: use configs/<model>.py:stage1 (projector only), "
                     ":stage2 (projector + LLM), :lora (LoRA adapters + projector) or, for LLaVA-OneVision, :si / "
                     ":ov (everything, the tower at vision_tower_lr), or set --config.stage")


def stage_groups(stage: str, train_vision_tower: bool = False) -> tuple:
  """The stage's group entries, with the vision tower trained if asked (stage2 only)."""
  check_stage(stage)
  if not train_vision_tower:
    return STAGE_GROUPS[stage]
  if stage != "stage2":
    raise ValueError(f"train_vision_tower is a stage2 setting (as LLaVA-1.6 trained it), not {stage}; set "
                     "--config.train_vision_tower=False or use :stage2")
  return tuple(TRAINED_VISION_TOWER if e[1] == "vision_tower" else e for e in STAGE_GROUPS[stage])


def optim_groups(optim: OptimConfig, stage: str) -> tuple[Group, ...]:
  """A run's resolved groups: `optim.groups` if given, else the stage's."""
  if optim.groups and optim.train_vision_tower:
    raise ValueError("train_vision_tower and explicit optimizer.groups both say what trains: give the vision "
                     "tower's entry in optimizer.groups and leave train_vision_tower False")
  return resolve_groups(optim.groups or stage_groups(stage, optim.train_vision_tower), optim)

# Samples in one epoch of each stage's data (the reference trains one epoch).
PRETRAIN_SAMPLES = 558_128  # blip_laion_cc_sbu_558k.json
FINETUNE_SAMPLES = 665_298  # llava_v1_5_mix665k.json

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096)
VICUNA_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, head_dim=128, max_position_embeddings=4096)

# Hardware presets: device count, hosts, and the (data, fsdp, tensor) mesh we train 7B/13B with on each. Used by
# configs (`--config.mesh`) and by `launch/` (accelerator type, TPU runtime, host count). FSDP over all chips fits
# 7B/13B stage 2 and has the fewest collectives per layer, so tensor parallelism stays at 1 until the global batch
# (128 sequences in stage 2) no longer covers the batch axes: on v5e-256 a 4-way tensor axis takes the rest.
PRESETS = {
    # TPU v4: the name counts TensorCores, 2 per chip; JAX sees one device per chip.
    "v4-32": dict(kind="tpu", accelerator_type="v4-32", runtime="tpu-ubuntu2204-base", devices=16, hosts=4,
                  mesh=(1, 16, 1)),
    # TPU v5p: likewise 2 TensorCores per chip, one JAX device per chip.
    "v5p-64": dict(kind="tpu", accelerator_type="v5p-64", runtime="v2-alpha-tpuv5", devices=32, hosts=8,
                   mesh=(1, 32, 1)),
    # TPU v5e: the name counts chips, 1 TensorCore each, 4 per host; 16 GiB HBM per chip.
    "v5e-256": dict(kind="tpu", accelerator_type="v5litepod-256", runtime="v2-alpha-tpuv5-lite", devices=256,
                    hosts=64, mesh=(1, 64, 4)),
    # One node of 8 GPUs (e.g. 8x A100/H100 80 GB).
    "gpu-8": dict(kind="gpu", accelerator_type="8xGPU", runtime="", devices=8, hosts=1, mesh=(1, 8, 1)),
}


def preset(name: str) -> dict:
  if name not in PRESETS:
    raise ValueError(f"unknown hardware preset {name!r}; known: {sorted(PRESETS)}")
  return dict(PRESETS[name])


def model_schema(vision: dict, text: dict, **fields) -> dict:
  """`config.model`: every `LlavaConfig` field a recipe may set, at `LlavaConfig`'s defaults (CLIP tower, LLaMA
  decoder, no OneVision) where `vision`, `text` and `fields` do not say otherwise, so `--config.model.*` reaches
  them all. Fresh placeholders per call: a shared one would tie configs together."""
  return dict(
      vision=dict(dict(model_type="clip", layer_norm_eps=1e-5, hidden_act="quick_gelu"), **vision),
      text=dict(dict(model_type="llama", qkv_bias=False, tie_word_embeddings=False, rms_norm_eps=1e-5), **text),
      **dict(dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                  vision_aspect_ratio=config_dict.placeholder(str), video_token_index=config_dict.placeholder(int)),
             **fields))


def base_config(stage: str = "stage1") -> ml_collections.ConfigDict:
  """The schema every config shares, filled in for the tiny model (CLIP 2x64 at 28 px, LLaMA 2x64) that runs in
  seconds on a CPU. Bigger configs change `model` / `init_checkpoint`, `data`, `mesh` and the batch."""
  if stage not in STAGE_LR:
    raise ValueError(f"unknown stage {stage!r}: use stage1 (projector only), stage2 (projector + LLM), lora, or "
                     "si / ov (LLaVA-OneVision)")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.distributed = "auto"  # jax.distributed.initialize() when launched as several processes ("yes" / "no")

  # Model: from a `llava-jax convert` directory if set, else built from `model` and freshly initialised.
  c.init_checkpoint = ""
  c.model = model_schema(
      vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=28, patch_size=7),
      text=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
      image_token_index=256)
  c.dtype = "float32"        # compute; "bfloat16" on accelerators
  c.param_dtype = "float32"  # master weights and optimizer state
  c.attention_impl = "xla"
  c.remat = "none"           # none | full | dots_saveable
  c.scan_layers = False
  # Positions per piece of the MLP and of the lm_head + loss, each piece recomputed backward (0: whole rows). The
  # pod recipes use 512: the [rows, T, intermediate] and fp32 [rows, T, vocab] buffers are a step's widest.
  c.seq_chunk = 0

  # Steps and batch: batch_size is global (all hosts), split into grad_accum_steps micro-batches.
  c.total_steps = 100
  c.batch_size = 8
  c.grad_accum_steps = 1
  # What trains is the stage's STAGE_GROUPS; train_vision_tower (stage2 only) trains the vision tower too, at
  # optimizer.vision_tower_lr (unset: lr), as LLaVA-1.6. optimizer.groups, if given, replaces the stage's entries:
  # (name, pattern, lr) tuples as train/optim.py describes, e.g. (("vision", "vision_tower", 2e-6), ("projector",
  # "multi_modal_projector", 1e-5), ("llm", "language_model|lm_head|image_newline", 1e-5)), which is what
  # LLaVA-OneVision's si / ov stages say as data.
  c.train_vision_tower = False
  c.optimizer = dict(lr=STAGE_LR[stage], projector_lr=config_dict.placeholder(float),
                     vision_tower_lr=config_dict.placeholder(float), warmup_ratio=0.03,
                     weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, groups=())
  if stage == "lora":
    c.optimizer.projector_lr = 2e-5
  c.lora = dict(r=8, alpha=16.0, dropout=0.05)  # the 7B/13B recipe: r=128, alpha=256

  # Mesh (data, fsdp, tensor), -1 takes the remaining devices; logical axis -> mesh axes.
  c.mesh = (-1, 1, 1)
  c.sharding_rules = DEFAULT_RULES

  # Data: "synthetic" random rows, or "llava" (LLaVA JSON + image folder, or TFDS) through the grain pipeline.
  # A setting the chosen kind does not use (e.g. json_path with kind="synthetic") is an error, not ignored.
  c.data = dict(
      kind="synthetic", seq_len=48, num_distinct_batches=0,
      json_path="", image_dir="", tfds_name="", tfds_data_dir="",
      template="plain" if stage == "stage1" else "vicuna_v1", tokenizer="", image_processor="",
      aspect_ratio="pad", shuffle=True, group_by_modality_length=False, packing=False, num_workers=0,
      # A pipeline that only skips stops the run (exit 2) with counts per reason instead of spinning:
      max_consecutive_skips=1000, max_skip_fraction=0.1, min_samples_for_fraction=200,
      max_image_pixels=64_000_000, allow_images_outside_dir=False,
      # Frames taken from a video at most (OneVision's --frames_upbound); the pipeline reads no videos yet.
      max_frames=0,
      # Image slots a padded row has (LLaVA-OneVision only): a record of several images takes each base-only in
      # its own slot, and one of more images than slots is skipped. Every slot goes through the tower.
      max_images_per_sample=1)

  c.checkpoint = dict(every_steps=50, keep=3, async_save=True)
  # A step with a non-finite loss or gradients skips its update; this many in a row stop the run (exit 3).
  c.nonfinite = dict(max_consecutive=5)
  c.log = dict(every_steps=10, progress=True, tensorboard=True, peak_tflops=0.0)  # 0: by device kind
  return c


def llava_v1_5(arg: str, vision: dict, text: dict, default_preset: str = "v5p-64") -> ml_collections.ConfigDict:
  """The LLaVA-1.5 recipe around a given model (scripts/v1_5/*.sh of the reference). `arg` is "STAGE[,PRESET]":
  stage1 (LLaVA-Pretrain 558k, `plain`, batch 256, lr 1e-3), stage2 (llava_v1_5_mix665k, `vicuna_v1`, batch 128,
  lr 2e-5) or lora (r 128, alpha 256, lr 2e-4, projector lr 2e-5); one epoch, max length 2048, padded images."""
  stage, _, preset_name = arg.partition(",")
  if stage in STAGE_LR and stage not in LLAVA_STAGES:
    raise ValueError(f"stage {stage!r} is a LLaVA-OneVision stage; this recipe offers {LLAVA_STAGES}")
  c = base_config(stage)
  hardware = preset(preset_name or default_preset)
  c.model = model_schema(vision, text, image_token_index=text["vocab_size"])
  c.dtype, c.param_dtype = "bfloat16", "float32"
  c.remat, c.scan_layers = "full", True
  c.seq_chunk = 512
  c.mesh = hardware["mesh"]
  stage1 = stage == "stage1"
  c.batch_size = 256 if stage1 else 128
  c.total_steps = -(-(PRETRAIN_SAMPLES if stage1 else FINETUNE_SAMPLES) // c.batch_size)
  if stage == "lora":
    c.lora = dict(r=128, alpha=256.0, dropout=0.05)
  c.data.kind = "llava"
  c.data.seq_len = 2048
  c.data.template = "plain" if stage1 else "vicuna_v1"
  c.data.aspect_ratio = "pad"
  c.data.group_by_modality_length = not stage1
  c.data.num_workers = 4
  c.checkpoint.every_steps = 500
  c.log.every_steps = 10
  return c


# -- LLaVA-1.6 (LLaVA-NeXT) ------------------------------------------------------------------------------------------

# The anyres canvases of every llava-v1.6 checkpoint, as (height, width): up to 672x672, 336x1008, 1008x336.
PINPOINTS_1_6 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# Samples of the 1.6 stage-2 mix: "760K" in the LLaVA-NeXT release blog (2024-01-30); the mix itself was not published.
NEXT_FINETUNE_SAMPLES = 760_000
NEXT_VISION_TOWER_LR = 2e-6  # mm_vision_tower_lr of LLaVA-NeXT's scripts/train/finetune_clip.sh
# Mistral-7B-Instruct-v0.2 (llava-v1.6-mistral-7b): GQA 32/8, rope_theta 1e6, no sliding window (v0.1 had 4096).
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  rope_parameters=dict(rope_theta=1e6, rope_type="default"), sliding_window=None,
                  model_type="mistral")
# Nous-Hermes-2-Yi-34B (llava-v1.6-34b): the LLaMA architecture with Yi-34B's dimensions (Yi-34B config.json:
# 64000 vocab, 7168 hidden, 20480 MLP, 60 layers, 56 heads, 8 KV heads, rope_theta 5e6, 4096 positions).
YI_34B = dict(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
              num_attention_heads=56, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
              rope_parameters=dict(rope_theta=5e6, rope_type="default"))
NEXT_TEMPLATES = {"mistral": "mistral_instruct", "vicuna": "vicuna_v1", "yi": "chatml_direct"}


def llava_v1_6(arg: str, vision: dict, text: dict, template: str,
               default_preset: str = "v5p-64") -> ml_collections.ConfigDict:
  """The LLaVA-1.6 recipe around a given model; `arg` is "STAGE[,PRESET]" as for `llava_v1_5`.

  What differs from 1.5: anyres tiles over `PINPOINTS_1_6` (up to 2,928 image tokens per image, so max length
  4096), the backbone's own template in stage 2, and in stage 2 the vision tower trained at 2e-6
  (`train_vision_tower`, `optimizer.vision_tower_lr`) besides the projector and LLM at 2e-5. Stage 1 is 1.5's
  (LLaVA-Pretrain 558k, `plain`, lr 1e-3, batch 256). The 1.6 stage-2 data (760K samples) was described but not
  released, and its batch size and lr were not published: we keep 1.5's batch 128 and lr 2e-5 (the LLaVA-NeXT
  repository's later CLIP script uses lr 1e-5 with mm_vision_tower_lr 2e-6); point data.json_path at your mix.
  """
  c = llava_v1_5(arg, vision, text, default_preset)
  c.model.image_grid_pinpoints = PINPOINTS_1_6
  c.data.seq_len = 4096
  c.data.aspect_ratio = "anyres"
  if c.stage != "stage1":
    c.data.template = template
  if c.stage != "stage1":
    c.total_steps = -(-NEXT_FINETUNE_SAMPLES // c.batch_size)
  if c.stage == "stage2":
    c.train_vision_tower = True
    c.optimizer.vision_tower_lr = NEXT_VISION_TOWER_LR
  return c


# The tiny model's anyres canvases: the 1.6 pinpoints scaled from 336 px tiles to its 28 px ones (1/12).
TINY_PINPOINTS = tuple((h // 12, w // 12) for h, w in PINPOINTS_1_6)


def tiny_next(stage: str = "stage2") -> ml_collections.ConfigDict:
  """The tiny model as a LLaVA-NeXT: anyres over `TINY_PINPOINTS` (up to 5 tiles, 88 image tokens per image),
  a sequence long enough for one such image and a short conversation, and `vicuna_v1` past stage 1."""
  c = base_config(stage)
  c.model.image_grid_pinpoints = TINY_PINPOINTS
  c.data.seq_len = 160
  c.data.aspect_ratio = "anyres"
  return c


# -- LLaVA-OneVision ---------------------------------------------------------------------------------------------------

# google/siglip-so400m-patch14-384 with its last layer dropped (LLaVA-NeXT's SigLIP tower deletes it; transformers'
# LlavaOnevisionConfig default keeps 26 of 27), read at the last kept layer with every patch (layer -1, "full").
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                     model_type="siglip")
# Qwen2(-Instruct) decoders: q/k/v biases, rope_theta 1e6, RMSNorm eps 1e-6, 32k positions, no sliding window;
# <|endoftext|> 151643 is BOS, <|im_end|> 151645 EOS.
_QWEN2 = dict(model_type="qwen2", qkv_bias=True, rms_norm_eps=1e-6, max_position_embeddings=32768,
              rope_parameters=dict(rope_theta=1e6, rope_type="default"), bos_token_id=151643, eos_token_id=151645)
QWEN2_0_5B = dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
QWEN2_7B = dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)
QWEN2_72B = dict(_QWEN2, vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
ONEVISION_IMAGE_TOKEN, ONEVISION_VIDEO_TOKEN = 151646, 151647  # <image>, <video> after Qwen2's specials
# The 36 canvases (1x1 ... 6x6 tiles of 384 px), as `data/onevision.py` lists them (kept here as data: the recipe
# must not import the image code).
PINPOINTS_ONEVISION = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))
ONEVISION_VISION_TOWER_LR = 2e-6  # --mm_vision_tower_lr of finetune_{si,ov}.sh
ONEVISION_SEQ_LEN = {"stage1": 8192, "si": 32768, "ov": 32768}  # --model_max_length of each stage's script
ONEVISION_MAX_FRAMES = 32  # --frames_upbound
# Image slots per row: the single-image stages' data has one image a record; the OneVision mix has records of
# several (the reference caps none). 4 keeps most such records while each row's tower work grows with the slots.
ONEVISION_MAX_IMAGES = {"stage1": 1, "si": 1, "ov": 4}
# Samples per stage: LLaVA-Pretrain 558k (pretrain_siglip.sh), and the paper's 3.2M single-image and 1.6M OneVision
# mixes (the scripts' data YAMLs are not all published).
ONEVISION_SAMPLES = {"stage1": PRETRAIN_SAMPLES, "si": 3_200_000, "ov": 1_600_000}


def llava_onevision(arg: str, text: dict, default_preset: str = "v5p-64") -> ml_collections.ConfigDict:
  """The LLaVA-OneVision recipe (LLaVA-NeXT's scripts/train/{pretrain_siglip,finetune_si,finetune_ov}.sh) around a
  Qwen2 decoder; `arg` is "STAGE[,PRESET]" with STAGE one of `ONEVISION_STAGES`.

  stage1 trains the projector (lr 1e-3, `plain`, max length 8192); si and ov train the SigLIP tower at 2e-6 and
  the projector and LLM at 1e-5 (`qwen_1_5`, max length 32768, up to 32 frames a video). All: cosine with 3%
  warm-up, weight decay 0, one epoch, anyres_max_9 over the 36 canvases. Batch 256 (the scripts' comments: 1 per
  GPU x 2 accumulation x 128 GPUs for 7B, 1 x 1 x 256 for 72B; stage 1's GPU count is not given). The reference's
  stage 1 saw plain 384 px squares (its default image_aspect_ratio); our stage 1 keeps the model's anyres layout.
  """
  stage, _, preset_name = arg.partition(",")
  if stage not in ONEVISION_STAGES:
    raise ValueError(f"unknown stage {stage!r} for LLaVA-OneVision: use one of {ONEVISION_STAGES}")
  c = base_config(stage)
  hardware = preset(preset_name or default_preset)
  c.model = model_schema(SIGLIP_SO400M, text, image_token_index=ONEVISION_IMAGE_TOKEN,
                         video_token_index=ONEVISION_VIDEO_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS_ONEVISION,
                         vision_aspect_ratio="anyres_max_9")
  c.dtype, c.param_dtype = "bfloat16", "float32"
  c.remat, c.scan_layers = "full", True
  c.seq_chunk = 512
  c.mesh = hardware["mesh"]
  c.batch_size = 256
  c.total_steps = -(-ONEVISION_SAMPLES[stage] // c.batch_size)
  if stage != "stage1":
    c.optimizer.vision_tower_lr = ONEVISION_VISION_TOWER_LR
  c.data.kind = "llava"
  c.data.seq_len = ONEVISION_SEQ_LEN[stage]
  c.data.template = "plain" if stage == "stage1" else "qwen_1_5"
  c.data.aspect_ratio = "anyres"
  c.data.group_by_modality_length = stage != "stage1"
  # Frame slots go through the tower every step (static shapes): only the stage whose data has videos has them.
  c.data.max_frames = ONEVISION_MAX_FRAMES if stage == "ov" else 0
  c.data.max_images_per_sample = ONEVISION_MAX_IMAGES[stage]
  c.data.num_workers = 4
  c.checkpoint.every_steps = 1000  # --save_steps
  c.log.every_steps = 10
  return c


# The tiny OneVision's canvases: 1x1 ... 6x6 tiles of its 28 px tiles, as OneVision's of 384 px.
TINY_ONEVISION_PINPOINTS = tuple((h, w) for h in range(28, 169, 28) for w in range(28, 169, 28))


def tiny_onevision(stage: str = "si") -> ml_collections.ConfigDict:
  """The tiny model as a LLaVA-OneVision: a SigLIP-style tower (no CLS, read at its last layer, every patch), a
  Qwen2-style decoder (q/k/v biases, tied embeddings), anyres_max_9 over `TINY_ONEVISION_PINPOINTS`, OneVision's
  stages and template. Random rows by default (`data.kind="synthetic"`); `data.kind="llava"` reads LLaVA data."""
  if stage not in ONEVISION_STAGES:
    raise ValueError(f"unknown stage {stage!r} for LLaVA-OneVision: use one of {ONEVISION_STAGES}")
  c = base_config(stage)
  c.model = model_schema(
      vision=dict(c.model.vision.to_dict(), model_type="siglip", layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
      text=dict(c.model.text.to_dict(), model_type="qwen2", qkv_bias=True, tie_word_embeddings=True,
                rms_norm_eps=1e-6),
      image_token_index=256, video_token_index=257, vision_feature_layer=-1, vision_feature_select_strategy="full",
      image_grid_pinpoints=TINY_ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9")
  if stage != "stage1":
    c.optimizer.vision_tower_lr = ONEVISION_VISION_TOWER_LR
  c.data.seq_len = 256
  c.data.template = "plain" if stage == "stage1" else "qwen_1_5"
  c.data.aspect_ratio = "anyres"
  return c
