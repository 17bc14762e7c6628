"""train/optim.py: groups as data, every leaf in exactly one group, no buffers for frozen leaves, each group on its
own schedule, the stages' group names (old workdirs restore by them), and a three-group run that steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_util
from llava_jax.train import recipes
from llava_jax.train.optim import FROZEN, Group, OptimConfig, group_labels, make_optimizer, resolve_groups, schedules

ONEVISION = (("vision", "vision_tower", 2e-6), ("projector", "multi_modal_projector", 1e-5),
             ("llm", recipes.LLM_PARTS, 1e-5))


def tree(lora: bool = False) -> dict:
  """A trainable tree shaped like the model's: top-level parts, int layer keys, 1-D and 2-D leaves."""
  w = lambda *shape: jnp.full(shape, 0.5, jnp.float32)
  layer = {"mlp": {"up_proj": {"kernel": w(4, 8)}}, "input_layernorm": {"scale": w(4)}}
  model = {"vision_tower": {"encoder": {"layers": {0: {"fc1": {"kernel": w(3, 4), "bias": w(4)}}}}},
           "multi_modal_projector": {"linear_1": {"kernel": w(3, 4), "bias": w(4)}},
           "language_model": {"layers": {0: layer, 1: layer}, "norm": {"scale": w(4)}},
           "lm_head": {"kernel": w(4, 6)}, "image_newline": w(4)}
  adapters = {"language_model": {"layers": {0: {"mlp": {"up_proj": {"lora_a": w(4, 2), "lora_b": w(2, 8)}}}}}}
  return {"model": model, "lora": adapters if lora else {}}


def labels_by_path(labels) -> dict[str, str]:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}


def test_learning_rates_are_numbers_settings_or_scaled_settings():
  cfg = OptimConfig(lr=1e-3, projector_lr=2e-5)
  entries = [("a", "x", 3e-4), ("b", "y", "lr"), ("c", "z", "lr*0.5"), ("d", "u", "projector_lr"),
             ("e", "v", "vision_tower_lr"), (FROZEN, "w", FROZEN)]
  assert [g.lr for g in resolve_groups(entries, cfg)] == [3e-4, 1e-3, 5e-4, 2e-5, 1e-3, None]
  for bad, error in [(("a", "x", "lr*two"), "not a number"), (("a", "x", -1.0), ">= 0"),
                     (("a", "x", "beta"), "learning rate 'beta'"), ((FROZEN, "x", 1e-3), "named 'frozen'"),
                     (("a", "(", 1e-3), "not a regular expression"), (("a", "", 1e-3), "non-empty"),
                     (1e-3, r"use \(name, pattern, lr\)"), ("vision_tower", r"use \(name, pattern, lr\)")]:
    with pytest.raises(ValueError, match=error):
      resolve_groups([bad], cfg)


def test_patterns_match_whole_leading_path_parts():
  groups = resolve_groups([("mlp", r"language_model/layers/\d+/mlp", 1.0), ("llm", "language_model|lm_head", 2.0),
                           (FROZEN, "vision_tower|multi_modal_projector|image_newline", FROZEN)], OptimConfig())
  with pytest.raises(ValueError, match=r"model/language_model/layers/0/mlp/up_proj/kernel is in 2 optimizer groups"):
    group_labels(tree(), groups)
  ordered = resolve_groups([("mlp", r"language_model/layers/\d+/mlp", 1.0),
                            ("llm", "language_model/(norm|layers/\\d+/input_layernorm)|lm_head", 2.0),
                            (FROZEN, "vision_tower|multi_modal_projector|image_newline", FROZEN)], OptimConfig())
  labels = labels_by_path(group_labels(tree(), ordered))
  assert labels["model/language_model/layers/1/mlp/up_proj/kernel"] == "mlp"
  assert labels["model/language_model/layers/1/input_layernorm/scale"] == "llm"
  assert labels["model/lm_head/kernel"] == "llm"
  # "lm" is no part's name: a pattern takes whole parts, never a prefix of one.
  with pytest.raises(ValueError, match="optimizer group x 'lm' matches no parameter"):
    group_labels(tree(), ordered + resolve_groups([("x", "lm", 1.0)], OptimConfig()))


def test_an_uncovered_or_doubly_covered_leaf_is_an_error_naming_it():
  stage2 = resolve_groups(recipes.STAGE_GROUPS["stage2"], OptimConfig())
  with pytest.raises(ValueError, match=r"parameter lora/language_model/layers/0/mlp/up_proj/lora_a is in no "
                                       r"optimizer group \(groups: frozen 'vision_tower', projector"):
    group_labels(tree(lora=True), stage2)
  twice = stage2 + resolve_groups([("proj2", "multi_modal_projector/linear_1", 1.0)], OptimConfig())
  with pytest.raises(ValueError, match=r"parameter model/multi_modal_projector/linear_1/bias is in 2 optimizer "
                                       r"groups \(projector 'multi_modal_projector', proj2 "):
    group_labels(tree(), twice)


@pytest.mark.parametrize("stage, vision, names", [
    ("stage1", False, {FROZEN, "projector"}), ("stage2", False, {FROZEN, "projector", "llm"}),
    ("lora", False, {FROZEN, "projector", "lora"}), ("stage2", True, {"vision", "projector", "llm"})])
def test_stage_group_names_key_the_optimizer_state(stage, vision, names):
  """The multi_transform's groups are the names old workdirs were saved with."""
  cfg = OptimConfig(train_vision_tower=vision)
  groups = recipes.optim_groups(cfg, stage)
  labels = group_labels(tree(lora=stage == "lora"), groups)
  tx, _ = make_optimizer(cfg, groups, labels, 10)
  state = tx.init(tree(lora=stage == "lora"))
  assert set(state[1].inner_states) == names  # chain(clip, multi_transform)


def test_frozen_leaves_keep_no_moment_buffers():
  params = tree(lora=True)
  cfg = OptimConfig()
  groups = recipes.optim_groups(cfg, "lora")
  labels = group_labels(params, groups)
  tx, _ = make_optimizer(cfg, groups, labels, 10)
  state = tx.init(params)
  trained = [l for l in jax.tree.leaves(labels) if l != FROZEN]
  assert len(trained) == 4  # projector kernel and bias, lora_a, lora_b
  assert len([x for x in jax.tree.leaves(state) if x.ndim > 0]) == 2 * len(trained)  # mu and nu, nothing else
  assert not jax.tree.leaves(state[1].inner_states[FROZEN])


def test_each_group_follows_its_own_warmup_cosine_schedule():
  """With constant gradients Adam's step is the learning rate itself: each group's update at step k is its peak on
  the warm-up + cosine schedule, frozen leaves stay put."""
  total, peaks = 20, {"vision": 2e-6, "projector": 1e-5, "llm": 3e-5}
  cfg = OptimConfig(lr=3e-5, warmup_ratio=0.1, eps=1e-12)
  groups = resolve_groups([(n, p, peaks[n]) for n, p, _ in ONEVISION], cfg)
  params = tree()
  labels = group_labels(params, groups)
  tx, main = make_optimizer(cfg, groups, labels, total)
  warmup = math.ceil(0.1 * total)

  def expected(peak, k):
    return peak * k / warmup if k < warmup else peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))

  state, grads = tx.init(params), jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
  by_name = schedules(cfg, groups, total)
  for k in range(6):
    updates, state = tx.update(grads, state, params)
    for (path, update), label in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(labels)):
      np.testing.assert_allclose(-update, expected(peaks[label], k), rtol=1e-4, atol=1e-12, err_msg=str(path))
      np.testing.assert_allclose(by_name[label](k), expected(peaks[label], k), rtol=1e-6, atol=1e-15)
    assert main(k) == by_name["llm"](k)  # the last trained group's, for the logs


def test_a_stage_lr_setting_moves_only_its_group():
  """projector_lr and vision_tower_lr are inputs of the stage's entries: each sets one group's peak."""
  cfg = OptimConfig(lr=2e-5, projector_lr=1e-4, vision_tower_lr=2e-6, train_vision_tower=True)
  assert {g.name: g.lr for g in recipes.optim_groups(cfg, "stage2")} == {"vision": 2e-6, "projector": 1e-4,
                                                                         "llm": 2e-5}
  assert {g.name: g.lr for g in recipes.optim_groups(OptimConfig(lr=2e-5), "stage2")} == {
      FROZEN: None, "projector": 2e-5, "llm": 2e-5}
  with pytest.raises(ValueError, match="train_vision_tower is a stage2 setting"):
    recipes.optim_groups(OptimConfig(train_vision_tower=True), "lora")
  assert Group("x", "a|b", 1.0).matches("model/b/c") and not Group("x", "a|b", 1.0).matches("lora/b/c")


def test_three_groups_at_onevisions_rates_build_and_step():
  """LLaVA-OneVision's groups (vision tower 2e-6, projector and LLM 1e-5) from the config: one step moves each
  group by its own rate (Adam's first step is the learning rate)."""
  config = train_util.load_config(train_util.TINY.replace("tiny.py", "tiny_next.py") + ":stage2",
                                  {"optimizer.groups": ONEVISION, "optimizer.warmup_ratio": 0.0, "total_steps": 10,
                                   "batch_size": 2})
  trainer = train_util.make_trainer(config)
  assert sorted(set(jax.tree.leaves(trainer.labels))) == ["llm", "projector", "vision"]
  state = trainer.init_state()
  before = train_util.flat(state["params"])
  state, metrics = trainer.step(state, train_util.batches(config, 1)[0])
  after = train_util.flat(state["params"])
  assert float(metrics["lr"]) == pytest.approx(1e-5)
  for prefix, lr in [("model.vision_tower", 2e-6), ("model.multi_modal_projector", 1e-5),
                     ("model.language_model", 1e-5), ("model.lm_head", 1e-5)]:
    step = max(float(np.max(np.abs(after[n] - before[n]))) for n in before if n.startswith(prefix))
    assert 0.5 * lr < step < 1.1 * lr, (prefix, step)  # float32 steps on weights near 1 round by ~3% of 2e-6
  assert {k for k in state["opt_state"][1].inner_states} == {"vision", "projector", "llm"}
