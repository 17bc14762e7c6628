"""The on-disk formats are frozen: a converted checkpoint and a training workdir written by an earlier version
(tests/fixtures/old_layout, made by tests/fixtures/make_old_layout.py) still load, resume, and match what the
current code writes."""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

import train_util
from llava_jax import checkpoint_files, load_checkpoint, save_checkpoint
from llava_jax.checkpoint import params_of, stored_tree
from llava_jax.config import LlavaConfig
from llava_jax.train import batches, checkpointing, loop, run_config
from llava_jax.train.step import Trainer
from llava_jax.tree import is_stacked, keys_to_int

HERE = os.path.dirname(os.path.abspath(__file__))
OLD = os.path.join(HERE, "fixtures", "old_layout")
STEP_ITEMS = ["data", "meta", "opt_state", "params"]


def _maker():
  spec = importlib.util.spec_from_file_location("make_old_layout", os.path.join(HERE, "fixtures",
                                                                                "make_old_layout.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lora_config(**overrides):
  """The run config the old workdir was trained with (2 steps), with `overrides`."""
  small = dict(_maker().SMALL, init_checkpoint=os.path.join(OLD, "ckpt"))
  small.update(overrides)
  return train_util.tiny_config("lora", **small)


def expected(name: str) -> dict:
  with open(os.path.join(OLD, "expected.json")) as f:
    return json.load(f)[name]


def assert_params_match(params: dict, summary: dict):
  """`params` against the old code's {dotted path: [shape, sum, sum of squares]}."""
  flat = train_util.flat(params)
  assert sorted(flat) == sorted(summary)
  for path, (shape, total, squares) in summary.items():
    x = flat[path].astype(np.float64)
    assert list(x.shape) == shape, path
    np.testing.assert_allclose([x.sum(), (x * x).sum()], [total, squares], rtol=1e-6, atol=1e-6, err_msg=path)


def test_the_names_of_the_format_are_unchanged():
  assert (checkpoint_files.CONFIG_NAME, checkpoint_files.PARAMS_DIR, checkpoint_files.ASSETS_DIR) == \
      ("llava_config.json", "params", "assets")
  assert (checkpoint_files.CHECKPOINTS, checkpoint_files.RUN_CONFIG_NAME) == ("checkpoints", "config.json")
  assert sorted([checkpoint_files.PARAMS_ITEM, checkpoint_files.OPT_STATE_ITEM, checkpoint_files.META_ITEM,
                 checkpoint_files.DATA_ITEM]) == STEP_ITEMS
  # The fixture itself has that layout.
  assert sorted(os.listdir(os.path.join(OLD, "ckpt"))) == ["assets", "llava_config.json", "params"]
  assert os.listdir(os.path.join(OLD, "ckpt", "params")) == ["part-00000"]
  assert os.listdir(os.path.join(OLD, "ckpt", "assets")) == ["generation_config.json"]
  assert sorted(os.listdir(os.path.join(OLD, "lora"))) == ["assets", "checkpoints", "config.json",
                                                            "llava_config.json"]
  step_dir = os.path.join(OLD, "lora", "checkpoints", "2")
  assert STEP_ITEMS == sorted(n for n in os.listdir(step_dir) if not n.startswith(("_", "commit")))
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    assert json.load(f) == {"step": 2, "stage": "lora", "lora": {"r": 2, "alpha": 16.0}}


@pytest.mark.parametrize("name", ["ckpt", "lora"])
def test_load_checkpoint_reads_the_old_layout(name):
  """A converted checkpoint, and a LoRA workdir's latest step with the adapters merged, load as they did."""
  model = load_checkpoint(os.path.join(OLD, name))
  from flax import nnx

  assert_params_match(nnx.to_pure_dict(nnx.state(model, nnx.Param)), expected(name))
  assert model.assets_dir == os.path.join(OLD, name, "assets")


def test_load_checkpoint_takes_the_options_whole():
  """`options=` reaches every layer (weights in the form it asks for, the same values); the older `attention_impl`
  keyword still works."""
  from flax import nnx

  from llava_jax.models.options import ModelOptions
  from llava_jax.models.stack import is_stacked_module
  from llava_jax.tree import relayout

  options = ModelOptions(attention_impl="blockwise", scan_layers=True, remat="full", seq_chunk=3)
  model = load_checkpoint(os.path.join(OLD, "ckpt"), options=options)
  layers = model.language_model.layers
  assert model.options == options and is_stacked_module(layers) and layers.self_attn.options == options
  assert model.vision_tower.encoder.layers.self_attn.options == options
  assert_params_match(relayout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), stacked=False), expected("ckpt"))
  older = load_checkpoint(os.path.join(OLD, "ckpt"), attention_impl="blockwise")
  assert older.options == ModelOptions(attention_impl="blockwise")


def test_save_checkpoint_writes_the_old_layout(tmp_path):
  model = load_checkpoint(os.path.join(OLD, "ckpt"))
  save_checkpoint(model, str(tmp_path / "again"))
  assert sorted(os.listdir(tmp_path / "again")) == ["assets", "llava_config.json", "params"]
  assert os.listdir(tmp_path / "again" / "params") == ["part-00000"]
  assert os.listdir(tmp_path / "again" / "assets") == ["generation_config.json"]
  with open(os.path.join(OLD, "ckpt", "llava_config.json")) as old, \
      open(tmp_path / "again" / "llava_config.json") as new:
    old, new = json.load(old), json.load(new)
  # Every old field keeps its value; fields added since (LLaVA-NeXT's) only add keys, with their defaults.
  for section in ("vision", "text"):
    assert old[section].items() <= new[section].items()
  assert {k: v for k, v in old.items() if k not in ("vision", "text")}.items() <= new.items()
  assert LlavaConfig.from_dict(old) == LlavaConfig.from_dict(new)


def test_training_resumes_from_the_old_workdir(tmp_path):
  workdir = str(tmp_path / "lora")
  shutil.copytree(os.path.join(OLD, "lora"), workdir)
  config = lora_config(total_steps=3, batch_size=8)  # the tests' 8 CPU devices split the batch in 8

  # The saved train state comes back as it was saved: step 2, the params the old code exported.
  trainer = Trainer(run_config.model_config(config), "lora", run_config.optim_config(config), 3,
                    train_util.mesh_of((1, 1, 1)), options=run_config.model_options(config),
                    lora=run_config.lora_config(config))
  data = batches.SyntheticIterator(config.batch_size, config.data.seq_len, trainer.model_cfg)
  manager = checkpointing.make_manager(workdir)
  state = checkpointing.restore(manager, trainer.abstract_state, data,
                                checkpointing.run_meta("lora", run_config.lora_config(config)))
  manager.close()
  assert int(jax.device_get(state["step"])) == 2 and data.get_state() == {"index": 2}
  assert_params_match(trainer.export_params(state), expected("lora"))

  # The loop resumes at step 2 and writes step 3 in the same layout.
  result = loop.train(config, workdir)
  assert result["start_step"] == 2 and result["step"] == 3
  step_dir = os.path.join(workdir, "checkpoints", "3")
  assert STEP_ITEMS == sorted(n for n in os.listdir(step_dir) if not n.startswith(("_", "commit")))
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    assert json.load(f) == {"step": 3, "stage": "lora", "lora": {"r": 2, "alpha": 16.0}}


def test_layer_forms_convert_on_resume(tmp_path):
  """The old (per-layer) workdir resumes in a scanned run, whose state holds the layers stacked; that run's
  stacked step resumes in an unscanned run. Two steps taken that way equal two steps taken without scanning."""
  plain, mixed = str(tmp_path / "plain"), str(tmp_path / "mixed")
  for workdir in (plain, mixed):
    shutil.copytree(os.path.join(OLD, "lora"), workdir)

  scanned = lora_config(total_steps=4, batch_size=8, scan_layers=True)
  trainer = Trainer(run_config.model_config(scanned), "lora", run_config.optim_config(scanned), 4,
                    train_util.mesh_of((1, 1, 1)), options=run_config.model_options(scanned),
                    lora=run_config.lora_config(scanned))
  data = batches.SyntheticIterator(scanned.batch_size, scanned.data.seq_len, trainer.model_cfg)
  manager = checkpointing.make_manager(mixed)
  state = checkpointing.restore(manager, trainer.abstract_state, data,
                                checkpointing.run_meta("lora", run_config.lora_config(scanned)),
                                layer_counts=trainer.model_cfg.layer_counts)
  manager.close()
  layers = state["params"]["model"]["language_model"]["layers"]
  assert layers["mlp"]["up_proj"]["kernel"].shape[0] == trainer.model_cfg.text.num_hidden_layers
  assert state["params"]["lora"]["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"].ndim == 3
  assert_params_match(trainer.export_params(state), expected("lora"))

  assert loop.train(lora_config(total_steps=3, batch_size=8, scan_layers=True), mixed)["step"] == 3
  assert is_stacked(keys_to_int(stored_tree(os.path.join(mixed, "checkpoints", "3", "params"))))
  assert loop.train(lora_config(total_steps=4, batch_size=8), mixed)["start_step"] == 3
  assert not is_stacked(keys_to_int(stored_tree(os.path.join(mixed, "checkpoints", "4", "params"))))
  for steps in (3, 4):  # the same runs (and learning-rate schedules) without scanning
    assert loop.train(lora_config(total_steps=steps, batch_size=8), plain)["step"] == steps

  want, got = (train_util.flat(params_of(load_checkpoint(w))) for w in (plain, mixed))
  assert sorted(want) == sorted(got)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
