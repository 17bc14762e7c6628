"""Optimizer: AdamW with linear warm-up + cosine decay and global-norm clipping, over optimizer groups given as data.

A group entry is `(name, pattern, lr)`. The trainable tree is `{"model": params, "lora": adapters}` and a leaf's path
is its "/"-joined keys: "model/language_model/layers/3/mlp/down_proj/kernel" (no layer key when layers are
stacked), "lora/language_model/layers/3/self_attn/q_proj/lora_a". `pattern` is a regular expression matched from
the start of a path to a "/" or its end, a leading "model/" optional: "vision_tower" takes the whole tower,
"language_model|lm_head" two parts, "lora" the adapters. Every leaf must match exactly one entry and every entry at
least one leaf, or building the optimizer is a ValueError naming the path and the entries.

`lr` is FROZEN (optax.set_to_zero: no update, no gradient, no moment buffers), a number (the group's peak rate),
"lr" / "projector_lr" / "vision_tower_lr" (that OptimConfig setting; the last two default to lr), or one of those
times a scale ("lr*0.1"). Only FROZEN entries are named "frozen". Entries may share a name when they share a rate
(a stage's frozen parts): one name is one `optax.multi_transform` group, and the names key the optimizer state, so
a stage's names stay as they are (old workdirs restore by them). The stages' lists live in `recipes.STAGE_GROUPS`.

Defaults are the reference's (LLaVA's scripts on HF Trainer): warm-up ratio 0.03, cosine to 0, weight decay 0,
clipping 1.0, betas (0.9, 0.999), eps 1e-8.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import optax

FROZEN = "frozen"
LR_SETTINGS = ("lr", "projector_lr", "vision_tower_lr")  # what an entry's lr may name


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
  groups: tuple = ()  # (name, pattern, lr) entries replacing the stage's (recipes.STAGE_GROUPS); () keeps them


@dataclasses.dataclass(frozen=True)
class Group:
  """One resolved entry: the leaves `pattern` matches train at peak `lr` in group `name` (lr None: frozen)."""
  name: str
  pattern: str
  lr: float | None

  @property
  def regex(self) -> re.Pattern:
    return re.compile(f"(?:model/)?(?:{self.pattern})(?=/|$)")

  def matches(self, path: str) -> bool:
    return self.regex.match(path) is not None

  def __str__(self) -> str:
    return f"{self.name} {self.pattern!r}"


def _resolve_lr(lr, cfg: OptimConfig) -> float | None:
  if lr == FROZEN:
    return None
  if isinstance(lr, (int, float)) and not isinstance(lr, bool):
    value = float(lr)
  elif isinstance(lr, str):
    setting, star, scale = (s.strip() for s in lr.partition("*"))
    if setting not in LR_SETTINGS:
      raise ValueError(f"learning rate {lr!r}: use a number, {FROZEN!r}, or one of {LR_SETTINGS} (times a scale, "
                       "e.g. 'lr*0.1')")
    try:
      factor = float(scale) if star else 1.0
    except ValueError:
      raise ValueError(f"learning rate {lr!r}: the scale after '*' is not a number") from None
    base = getattr(cfg, setting)
    value = (cfg.lr if base is None else base) * factor
  else:
    raise ValueError(f"learning rate {lr!r}: use a number, {FROZEN!r}, or one of {LR_SETTINGS}")
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"learning rate {lr!r} gives {value}: use a finite number >= 0")
  return value


def resolve_groups(entries, cfg: OptimConfig) -> tuple[Group, ...]:
  """The (name, pattern, lr) entries checked (form, names, patterns) and with their peak learning rates."""
  groups, rates = [], {}
  for entry in entries:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
      raise ValueError(f"optimizer group entry {entry!r}: use (name, pattern, lr), e.g. ('llm', 'language_model', "
                       "'lr') or ('frozen', 'vision_tower', 'frozen')")
    name, pattern, lr = entry
    if not (isinstance(name, str) and name and isinstance(pattern, str) and pattern):
      raise ValueError(f"optimizer group entry {tuple(entry)!r}: the name and the pattern are non-empty strings")
    try:
      group = Group(name, pattern, _resolve_lr(lr, cfg))
      group.regex  # pylint: disable=pointless-statement
    except re.error as e:
      raise ValueError(f"optimizer group {name}: pattern {pattern!r} is not a regular expression ({e})") from None
    except ValueError as e:
      raise ValueError(f"optimizer group {name} {pattern!r}: {e}") from None
    if (name == FROZEN) != (group.lr is None):
      raise ValueError(f"optimizer group {name} {pattern!r} with lr {lr!r}: only {FROZEN!r} entries are named "
                       f"{FROZEN!r}")
    if rates.setdefault(name, group.lr) != group.lr:
      raise ValueError(f"optimizer group {name} has two learning rates, {rates[name]} and {group.lr}: one name is "
                       "one group; rename one entry")
    groups.append(group)
  if not groups:
    raise ValueError("no optimizer groups: give at least one (name, pattern, lr) entry")
  return tuple(groups)


def path_str(path) -> str:
  """A tree path as "/"-joined keys (dict keys, int layer keys, sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def group_labels(params: dict, groups: tuple[Group, ...]) -> dict:
  """A tree like `params` ({"model": ..., "lora": ...}) holding each leaf's group name; every leaf must be in
  exactly one entry and every entry must hold a leaf."""
  used = set()

  def label(path, _):
    where = path_str(path)
    hits = [g for g in groups if g.matches(where)]
    if len(hits) != 1:
      listed = ", ".join(map(str, hits or groups))
      raise ValueError(f"parameter {where} is in no optimizer group (groups: {listed})" if not hits else
                       f"parameter {where} is in {len(hits)} optimizer groups ({listed}); make the patterns "
                       "exclusive")
    used.add(hits[0])
    return hits[0].name

  labels = jax.tree_util.tree_map_with_path(label, params)
  idle = [g for g in groups if g not in used]
  if idle:
    parts = sorted({"/".join(path_str(p).split("/")[:2]) for p, _ in jax.tree_util.tree_leaves_with_path(params)})
    raise ValueError(f"optimizer group {idle[0]} matches no parameter; the parts are {', '.join(parts)}")
  return labels


def warmup_cosine(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """HF's cosine schedule with warm-up: 0 -> peak over ceil(ratio * total) steps, then cosine to 0 at total."""
  warmup = math.ceil(warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)


def schedules(cfg: OptimConfig, groups: tuple[Group, ...], total_steps: int) -> dict[str, optax.Schedule]:
  """Each trained group's learning-rate schedule, by name (warm-up + cosine to its peak)."""
  return {g.name: warmup_cosine(g.lr, total_steps, cfg.warmup_ratio) for g in groups if g.lr is not None}


def make_optimizer(cfg: OptimConfig, groups: tuple[Group, ...], labels: dict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for a labelled tree, and the schedule of its main learning rate (for logging): the last trained
  group's (the LLM's, the adapters', or in stage 1 the projector's)."""
  by_name = schedules(cfg, groups, total_steps)

  def adamw(schedule):
    # As HF Trainer: no decay on biases and norm scales (1-D leaves).
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree))

  used = sorted(set(jax.tree.leaves(labels)))
  tx = optax.multi_transform({k: optax.set_to_zero() if k == FROZEN else adamw(by_name[k]) for k in used}, labels)
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  trained = [g.name for g in groups if g.lr is not None]
  main = by_name[trained[-1]] if trained else warmup_cosine(0.0, total_steps, cfg.warmup_ratio)
  return tx, main
