"""Optimizer: AdamW with linear warm-up + cosine decay and global-norm clipping, and the training stages as
`optax.multi_transform` masks.

The trainable tree is `{"model": params, "lora": adapters}`. Every leaf gets a label:

  frozen     vision tower (unless trained); the LLM in stage1, lora -> optax.set_to_zero(), no moment buffers
  projector  multi_modal_projector                                -> AdamW at `projector_lr` (default: lr)
  llm        language_model, lm_head, image_newline, stage2 only  -> AdamW at lr
  lora       the adapters, lora only                              -> AdamW at lr
  vision     vision tower, stage2 with `train_vision_tower` only  -> AdamW at `vision_tower_lr` (default: lr)

LLaVA-1.6 trained the vision tower in stage 2 at its own, smaller rate (`mm_vision_tower_lr` 2e-6 with the
reference LLaVA-NeXT's `mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model"`).

Defaults are the reference's (LLaVA's scripts on HF Trainer): warm-up ratio 0.03, cosine to 0, weight decay 0,
clipping 1.0, betas (0.9, 0.999), eps 1e-8.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

STAGES = ("stage1", "stage2", "lora")
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-3
  projector_lr: float | None = None  # None: same as lr (LoRA runs use 2e-5 here, as the reference)
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # global norm over all trainable gradients; 0 disables
  vision_tower_lr: float | None = None  # None: same as lr; used only with train_vision_tower
  train_vision_tower: bool = False      # stage2 only: the vision tower gets the "vision" group, not frozen


def check_stage(stage: str) -> None:
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r} is not one of {STAGES}: use configs/<model>.py:stage1 (projector only), "
                     ":stage2 (projector + LLM) or :lora (LoRA adapters + projector), or set --config.stage")


def stage_labels(params: dict, stage: str, train_vision_tower: bool = False) -> dict:
  """A tree like `params` ({"model": ..., "lora": ...}) holding each leaf's optimizer group."""
  check_stage(stage)
  if train_vision_tower and stage != "stage2":
    raise ValueError(f"train_vision_tower is a stage2 setting (as LLaVA-1.6 trained it), not {stage}; set "
                     "--config.train_vision_tower=False or use :stage2")
  llm = "llm" if stage == "stage2" else FROZEN
  # LLaVA-NeXT's image_newline trains with the LLM: LLaVA-NeXT's train.py unfreezes it under "mm_language_model"
  # (every parameter outside vision_tower and mm_projector), not under "mm_mlp_adapter".
  groups = {"vision_tower": "vision" if train_vision_tower else FROZEN, "multi_modal_projector": "projector",
            "image_newline": llm, "language_model": llm, "lm_head": llm}

  def label(path, _):
    top = path[0].key
    if top == "lora":
      return "lora"
    name = path[1].key
    if name not in groups:
      raise ValueError(f"no optimizer group for parameters under {name!r}")
    return groups[name]

  return jax.tree_util.tree_map_with_path(label, params)


def warmup_cosine(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """HF's cosine schedule with warm-up: 0 -> peak over ceil(ratio * total) steps, then cosine to 0 at total."""
  warmup = math.ceil(warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg: OptimConfig, labels: dict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                               optax.Schedule]:
  """The optimizer for a labelled tree, and the schedule of its main learning rate (for logging)."""
  lr = warmup_cosine(cfg.lr, total_steps, cfg.warmup_ratio)
  projector_lr = lr if cfg.projector_lr is None else warmup_cosine(cfg.projector_lr, total_steps, cfg.warmup_ratio)

  def adamw(schedule):
    # As HF Trainer: no decay on biases and norm scales (1-D leaves).
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree))

  vision_lr = lr if cfg.vision_tower_lr is None else warmup_cosine(cfg.vision_tower_lr, total_steps,
                                                                 cfg.warmup_ratio)
  available = {FROZEN: optax.set_to_zero(), "projector": adamw(projector_lr), "llm": adamw(lr),
               "lora": adamw(lr), "vision": adamw(vision_lr)}
  used = sorted(set(jax.tree.leaves(labels)))
  tx = optax.multi_transform({k: available[k] for k in used}, labels)
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  main = lr if any(k in used for k in ("llm", "lora")) else projector_lr
  return tx, main
