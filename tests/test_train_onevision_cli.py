"""LLaVA-OneVision's si stage through the CLI's config path (configs/tiny_onevision.py) on real grain data: images
of many sizes (the largest grids shrunk by anyres_max_9 at the tiny scale), records of two images base-only, a tiny
Qwen2 tokenizer and `qwen_1_5`. One compile for the run, the vision tower at its own learning rate, the loss falls,
and a kill -9 resume gives the same loss sequence."""

import json
import os
import random

import numpy as np
import pytest
from flax import nnx

import train_util
from llava_jax import load_checkpoint
from llava_jax.checkpoint import write_checkpoint
from llava_jax.models.llava import Llava
from llava_jax.train import batches, loop, run_config
from llava_jax.train.cli import load_config

TINY_OV = os.path.join(train_util.ROOT, "configs", "tiny_onevision.py")
VOCAB = 1024  # the tiny Qwen2 tokenizer's ids fit below; the image and video tokens are the next ids
MODEL = {"model.text.vocab_size": VOCAB, "model.image_token_index": VOCAB, "model.video_token_index": VOCAB + 1}


def _add_pairs(path: str) -> tuple[int, int]:
  """Turns every third record (text-only ones too) into one of two images: both tags in one turn, or one tag in
  each of two turns."""
  with open(path) as f:
    records = json.load(f)
  records = records[:len(records) // 8 * 8]  # whole batches of 8: an epoch's batches hold each record once
  names = [r["image"] for r in records if "image" in r]
  for i in range(0, len(records), 3):
    pair = [names[i % len(names)], names[(i + 1) % len(names)]]
    turns = ([("<image>\n<image>\nWhich shapes are these?", "Two shapes on plain backgrounds.")] if i % 2 else
             [("<image>\nWhat is this?", "A shape."), ("And this one? <image>", "Another shape.")])
    records[i] = {"id": f"pair-{i}", "image": pair, "conversations": [
        {"from": who, "value": value} for q, a in turns for who, value in (("human", q), ("gpt", a))]}
  with open(path, "w") as f:
    json.dump(records, f)
  return len(range(0, len(records), 3)), len(records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A shapes corpus with sides 20..160 px (1x1 to 6x6 tiles of 28 px) and records of two images, a tiny Qwen2
  tokenizer, and an init checkpoint of known weights."""
  from llava_jax.data import synthetic, write_shapes_corpus

  root = tmp_path_factory.mktemp("ov_cli")
  paths = write_shapes_corpus(str(root / "shapes"), num_train=24, num_eval=2, min_size=20, max_size=160)
  pairs, n = _add_pairs(paths["stage2"])
  synthetic.build_qwen_tokenizer(str(root / "tok"))
  cfg = run_config.model_config(load_config(f"{TINY_OV}:si", MODEL))
  params = nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  write_checkpoint(str(root / "init"), cfg, params)
  data = {"data.kind": "llava", "data.json_path": paths["stage2"], "data.image_dir": paths["image_dir"],
          "data.tokenizer": str(root / "tok"), "data.max_images_per_sample": 2,
          "init_checkpoint": str(root / "init"), "log.progress": False, **MODEL}
  return data, train_util.flat(params), (pairs, n)


def _final_params(workdir) -> dict:
  return train_util.flat(nnx.to_pure_dict(nnx.state(load_checkpoint(workdir), nnx.Param)))


def test_the_config_reads_pairs_and_shrunk_grids_without_skips(setup):
  data, _, (pairs, n) = setup
  config = load_config(f"{TINY_OV}:si", data)
  assert config.data.template == "qwen_1_5"
  it = batches.make_iterator(config.data, run_config.model_config(config), config.batch_size, seed=0)
  several = shrunk = 0
  for _ in range(n // config.batch_size):  # one epoch
    batch = next(it)
    assert batch["pixel_values"].shape[:2] == (config.batch_size, 2)  # two image slots a row
    several += int((batch["image_mask"].sum(axis=1) == 2).sum())
    weights = batch["image_feature_weights"]
    shrunk += int(((weights > 0) & (weights < 1)).any())  # a bilinear tap: a grid over anyres_max_9
  it.close()
  assert several == pairs and shrunk
  assert not it.skip_counts


def test_si_compiles_once_and_the_loss_falls(setup, tmp_path):
  data, initial, _ = setup
  config = load_config(f"{TINY_OV}:si", {**data, "total_steps": 8, "optimizer.lr": 3e-3,
                                         "optimizer.vision_tower_lr": 3e-4, "checkpoint.every_steps": 0})
  result = loop.train(config, str(tmp_path / "run"))
  assert len(result["trainer"]._compiled) == 1  # pylint: disable=protected-access  # every batch: one shape
  losses = result["losses"]
  assert len(losses) == 8 and np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  final = _final_params(str(tmp_path / "run"))
  for prefix in ("vision_tower", "multi_modal_projector", "language_model", "image_newline"):
    assert any(not np.array_equal(initial[k], final[k]) for k in initial if k.startswith(prefix)), prefix


def test_the_vision_tower_moves_at_its_own_learning_rate(setup, tmp_path):
  # One step without warm-up: Adam's first update is lr * g / (|g| + eps), so each group's largest change is its
  # own learning rate (to eps / |g|).
  data, initial, _ = setup
  config = load_config(f"{TINY_OV}:si", {**data, "total_steps": 1, "optimizer.warmup_ratio": 0.0,
                                         "optimizer.lr": 1e-2, "optimizer.vision_tower_lr": 1e-4})
  loop.train(config, str(tmp_path / "run"))
  final = _final_params(str(tmp_path / "run"))

  def largest_change(prefix):
    return max(float(np.max(np.abs(final[k] - initial[k]))) for k in initial if k.startswith(prefix))

  np.testing.assert_allclose(largest_change("vision_tower"), 1e-4, rtol=1e-3)
  np.testing.assert_allclose(largest_change("multi_modal_projector"), 1e-2, rtol=1e-3)
  np.testing.assert_allclose(largest_change("language_model"), 1e-2, rtol=1e-3)


@pytest.mark.slow
def test_kill_9_resume_gives_the_loss_sequence_of_an_uninterrupted_run(setup, tmp_path):
  data, _, _ = setup
  total = 8
  overrides = {**data, "total_steps": total, "checkpoint.every_steps": 2}
  reference = loop.train(load_config(f"{TINY_OV}:si", overrides), str(tmp_path / "reference"))

  losses = train_util.losses_killed_and_resumed(f"{TINY_OV}:si", overrides, str(tmp_path / "run"), random.randint(3, 5))
  assert len(losses) == total
  assert losses == reference["losses"]  # exactly


@pytest.mark.parametrize("flag, message", [
    ("--config.data.max_images_per_sample=0", "config.data.max_images_per_sample=0"),
    ("--config.data.max_images_per_sample=2", "not used by data.kind='synthetic'"),  # the tiny config's default
])
def test_max_images_per_sample_is_checked_at_start(tmp_path, capsys, flag, message):
  from llava_jax.train import cli

  assert cli.main(["--config", f"{TINY_OV}:si", "--workdir", str(tmp_path / "run"), flag]) == 2
  assert message in capsys.readouterr().err
