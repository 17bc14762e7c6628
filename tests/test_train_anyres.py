"""LLaVA-NeXT stage-2 training through the CLI's config path on a tiny anyres model and real grain data (images of
many sizes): one compile for the run, the vision tower bit-identical when frozen and moving at its own learning rate
when trained, the loss falls, and a kill -9 resume gives the same loss sequence."""

import os
import random

import numpy as np
import pytest
from flax import nnx

import train_util
from llava_jax import load_checkpoint
from llava_jax.checkpoint import write_checkpoint
from llava_jax.models.llava import Llava
from llava_jax.train import loop, run_config
from llava_jax.train.cli import load_config

TINY_NEXT = os.path.join(train_util.ROOT, "configs", "tiny_next.py")
VOCAB = 1024  # the synthetic tokenizer's ids fit below; the image token is the next id


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A shapes corpus with sides 20..90 px (1 to 5 tiles), its tokenizer, and an init checkpoint of known weights."""
  from llava_jax.data import build_tokenizer, write_shapes_corpus

  root = tmp_path_factory.mktemp("next")
  paths = write_shapes_corpus(str(root / "shapes"), num_train=24, num_eval=2, min_size=20, max_size=90)
  build_tokenizer(str(root / "tok"))
  overrides = {"model.text.vocab_size": VOCAB, "model.image_token_index": VOCAB}
  cfg = run_config.model_config(load_config(f"{TINY_NEXT}:stage2", overrides))
  params = nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  write_checkpoint(str(root / "init"), cfg, params)
  data = {"data.kind": "llava", "data.json_path": paths["stage2"], "data.image_dir": paths["image_dir"],
          "data.tokenizer": str(root / "tok"), "data.num_distinct_batches": 0, "init_checkpoint": str(root / "init"),
          "log.progress": False, **overrides}
  return data, train_util.flat(params)


def _final_params(workdir) -> dict:
  return train_util.flat(nnx.to_pure_dict(nnx.state(load_checkpoint(workdir), nnx.Param)))


def _changed(before: dict, after: dict, prefix: str) -> list[str]:
  keys = [k for k in before if k.startswith(prefix)]
  assert keys, prefix
  return [k for k in keys if not np.array_equal(before[k], after[k])]


def test_stage2_compiles_once_keeps_the_frozen_tower_and_the_loss_falls(setup, tmp_path):
  data, initial = setup
  config = load_config(f"{TINY_NEXT}:stage2", {**data, "total_steps": 8, "optimizer.lr": 3e-3,
                                               "checkpoint.every_steps": 0})
  result = loop.train(config, str(tmp_path / "run"))
  assert len(result["trainer"]._compiled) == 1  # pylint: disable=protected-access  # every batch: one shape
  losses = result["losses"]
  assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  final = _final_params(str(tmp_path / "run"))
  assert not _changed(initial, final, "vision_tower")  # bit-identical
  assert _changed(initial, final, "multi_modal_projector") and _changed(initial, final, "language_model")
  assert _changed(initial, final, "image_newline")  # trains with the LLM in stage 2, as LLaVA-NeXT


def test_a_trained_vision_tower_moves_at_its_own_learning_rate(setup, tmp_path):
  # One step without warm-up: Adam's first update is lr * g / (|g| + eps), so each group's largest change is its
  # own learning rate (to eps / |g|): 1e-4 for the tower, 1e-2 for the projector and the LLM.
  data, initial = setup
  config = load_config(f"{TINY_NEXT}:stage2", {**data, "total_steps": 1, "optimizer.warmup_ratio": 0.0,
                                               "optimizer.lr": 1e-2, "optimizer.vision_tower_lr": 1e-4,
                                               "train_vision_tower": True})
  loop.train(config, str(tmp_path / "run"))
  final = _final_params(str(tmp_path / "run"))
  assert _changed(initial, final, "vision_tower")

  def largest_change(prefix):
    return max(float(np.max(np.abs(final[k] - initial[k]))) for k in initial if k.startswith(prefix))

  np.testing.assert_allclose(largest_change("vision_tower"), 1e-4, rtol=1e-3)
  np.testing.assert_allclose(largest_change("multi_modal_projector"), 1e-2, rtol=1e-3)
  np.testing.assert_allclose(largest_change("language_model"), 1e-2, rtol=1e-3)


def test_train_vision_tower_is_a_stage2_setting(setup, tmp_path, capsys):
  from llava_jax.train import cli

  data, _ = setup
  args = ["--config", f"{TINY_NEXT}:stage1", "--workdir", str(tmp_path / "run"), "--config.train_vision_tower=True"]
  assert cli.main(args) == 2
  assert "only stage2 trains the vision tower" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_resume_gives_the_loss_sequence_of_an_uninterrupted_run(setup, tmp_path):
  data, _ = setup
  total = 10
  overrides = {**data, "total_steps": total, "checkpoint.every_steps": 3, "train_vision_tower": True,
               "optimizer.vision_tower_lr": 2e-4}
  reference = loop.train(load_config(f"{TINY_NEXT}:stage2", overrides), str(tmp_path / "reference"))

  losses = train_util.losses_killed_and_resumed(f"{TINY_NEXT}:stage2", overrides, str(tmp_path / "run"), random.randint(4, 7))
  assert len(losses) == total
  assert losses == reference["losses"]  # exactly
