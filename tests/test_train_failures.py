"""Trainer failures: config mistakes, non-finite steps, damaged or mismatched workdirs and signals fail
loudly (a named error, exit 2 / 3, no traceback) and lose nothing (no write before a failed resume, no non-finite
checkpoint, a save in flight completes)."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from flax import nnx

import train_util
from llava_jax import load_checkpoint
from llava_jax.checkpoint_files import CONFIG_NAME, CheckpointError, read_config
from llava_jax.train import batches, checkpointing, cli, loop, run_config
from llava_jax.train.metrics import NONFINITE_EXIT_CODE, NonfiniteGuard, NonfiniteLossError
from llava_jax.train.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preemption


def quiet(**overrides):
  return {"log.progress": False, "log.tensorboard": False, **overrides}


def snapshot(directory) -> dict[str, bytes]:
  """Every file under `directory` with its bytes: "untouched" means this is unchanged."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


# -- config validation: each mistake names its flag, exit 2, before anything is compiled or written ------------


@pytest.mark.parametrize("args, message", [
    (["--config.optimizer.lr=nan"], "config.optimizer.lr=nan"),
    (["--config.optimizer.lr=inf"], "config.optimizer.lr=inf"),
    (["--config.optimizer.projector_lr=-1.0"], "config.optimizer.projector_lr=-1.0"),
    (["--config.optimizer.b1=1.0"], "config.optimizer.b1=1.0"),
    (["--config.optimizer.b2=nan"], "config.optimizer.b2=nan"),
    (["--config.optimizer.eps=0.0"], "config.optimizer.eps=0.0"),
    (["--config.optimizer.weight_decay=-0.1"], "config.optimizer.weight_decay=-0.1"),
    (["--config.optimizer.clip_norm=-1.0"], "config.optimizer.clip_norm=-1.0"),
    (["--config.optimizer.warmup_ratio=nan"], "config.optimizer.warmup_ratio=nan"),
    (["--config.checkpoint.keep=0"], "config.checkpoint.keep=0"),
    (["--config.batch_size=0"], "config.batch_size=0"),
    (["--config.dtype=float8"], "config.dtype='float8'"),
    (["--config.param_dtype=float8_e4m3fn"], "config.param_dtype='float8_e4m3fn'"),
    (["--config.nonfinite.max_consecutive=0"], "config.nonfinite.max_consecutive=0"),
    (["--config.seq_chunk=-1"], "config.seq_chunk=-1 is negative"),
    (["--config.attention_impl=flash"], "config.attention_impl='flash' is not one of"),
    (["--config.data.json_path=train.json", "--config.data.image_dir=images"],
     "--config.data.json_path, --config.data.image_dir: not used by data.kind='synthetic'"),
    (["--config.data.tfds_name=llava_pretrain"], "--config.data.tfds_name: not used by data.kind='synthetic'"),
    (["--config.data.kind=llava"], "set exactly one of --config.data.json_path"),
    (["--config.data.kind=llava", "--config.data.json_path=a.json", "--config.data.num_distinct_batches=2"],
     "--config.data.num_distinct_batches: only used by data.kind='synthetic'"),
])
def test_config_mistakes_exit_2_naming_the_flag(tmp_path, capsys, args, message):
  workdir = tmp_path / "w"
  code = cli.main(["--config", train_util.TINY + ":stage2", "--workdir", str(workdir)] + args)
  err = capsys.readouterr().err
  assert code == 2, err
  assert message in err and "Traceback" not in err
  assert not workdir.exists()


def test_a_missing_config_file_exits_2_naming_it(tmp_path, capsys):
  assert cli.main(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert f"--config {tmp_path / 'nope.py'}: cannot read the config file" in err and "Traceback" not in err


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    (None, "unknown field(s) colour, text.flash_attention"),
])
def test_a_bad_llava_config_json_is_a_named_checkpoint_error(tmp_path, text, message):
  cfg = run_config.model_config(train_util.tiny_config("stage2"))
  raw = cfg.to_dict()
  raw["text"]["flash_attention"] = True
  raw["colour"] = "blue"
  (tmp_path / CONFIG_NAME).write_text(text if text is not None else json.dumps(raw))
  with pytest.raises(CheckpointError, match="unknown|JSON") as e:
    read_config(str(tmp_path))
  assert str(tmp_path / CONFIG_NAME) in str(e.value) and message in str(e.value)
  with pytest.raises(CheckpointError):
    load_checkpoint(str(tmp_path))


# -- non-finite steps -------------------------------------------------------------------------------------------


def test_guard_stops_after_max_consecutive_nonfinite_steps_in_a_row():
  lines = []
  guard = NonfiniteGuard(3, write=lines.append)
  for step, bad in enumerate([0, 1, 1, 0, 1, 1], start=1):  # never 3 in a row
    guard({"step": step, "nonfinite": bad, "loss": float("nan") if bad else 1.0})
  assert guard.total == 4 and guard.in_a_row == 2 and len(lines) == 4
  with pytest.raises(NonfiniteLossError, match=r"3 steps in a row \(up to step 7\).*max_consecutive=3"):
    guard({"step": 7, "nonfinite": 1, "loss": float("inf")})


@pytest.mark.slow  # its own compile (~1 min on 2 busy cores); the run below checks the same through the loop
def test_a_nonfinite_step_keeps_params_and_optimizer_state_and_advances_the_step():
  config = train_util.tiny_config("stage2", **{"optimizer.warmup_ratio": 0.0})
  trainer = train_util.make_trainer(config)
  good, bad = train_util.batches(config, 2)
  bad = dict(bad, pixel_values=np.full_like(bad["pixel_values"], np.nan))  # NaN image features -> NaN loss
  state = trainer.init_state(train_util.initial_params())
  state, first = trainer.step(state, good)
  before = train_util.flat({"params": state["params"], "opt_state": state["opt_state"]})
  state, second = trainer.step(state, bad)
  after = train_util.flat({"params": state["params"], "opt_state": state["opt_state"]})
  assert int(first["nonfinite"]) == 0 and int(second["nonfinite"]) == 1 and np.isnan(float(second["loss"]))
  assert int(state["step"]) == 2
  assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
  assert trainer.params_finite(state)


class _NanAfter(batches.SyntheticIterator):
  """Synthetic rows whose images turn to NaN from batch `start` on (a diverging run, reproducibly)."""

  start = 3

  def __next__(self):
    batch = super().__next__()
    if self.index > self.start:
      batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
    return batch


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_good_checkpoints(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(batches, "SyntheticIterator", _NanAfter)
  workdir = tmp_path / "run"
  args = ["--config", train_util.TINY + ":stage2", "--workdir", str(workdir), "--config.log.progress=False",
          "--config.total_steps=12", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2",
          "--config.nonfinite.max_consecutive=3"]
  assert cli.main(args) == NONFINITE_EXIT_CODE
  captured = capsys.readouterr()
  assert "3 steps in a row (up to step 6)" in captured.err and "Traceback" not in captured.err
  # Steps 4 and 5 were skipped updates; only finite checkpoints were written, the last good ones kept.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "5"]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["nonfinite"] for r in records] == [0, 0, 0, 1, 1, 1]
  assert [r["nonfinite_steps"] for r in records] == [0, 0, 0, 1, 2, 3]
  # Step 5's update was skipped: its checkpoint holds exactly step 4's params and optimizer state.
  saved = {}
  for step in ("4", "5"):
    manager = checkpointing.make_manager(str(workdir), 1, 2)
    restore_args = checkpointing.ocp.args.StandardRestore
    items = {"params": restore_args(), "opt_state": restore_args()}
    restored = manager.restore(int(step), args=checkpointing.ocp.args.Composite(**items))
    saved[step] = train_util.flat({k: restored[k] for k in items})
    manager.close()
  assert saved["4"].keys() == saved["5"].keys()
  assert all(np.array_equal(saved["4"][k], saved["5"][k]) for k in saved["4"] if k != "opt_state.step")
  model = load_checkpoint(str(workdir))
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


# -- resume: validated before writing, falls back past damaged steps ---------------------------------------------


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
  """A tiny run with checkpoints at 2, 4 and 6, stopped by SIGTERM while reading batch 6, with a second signal
  (SIGINT) arriving while its last save is still being written."""
  workdir = str(tmp_path_factory.mktemp("preempted") / "run")
  config = train_util.tiny_config("stage2", **quiet(total_steps=20, **{"checkpoint.every_steps": 2}))
  original_next = batches.SyntheticIterator.__next__
  original_wait = checkpointing.ocp.CheckpointManager.wait_until_finished
  seen = {"term": False, "second": 0, "handler": signal.getsignal(signal.SIGINT)}

  def next_with_signal(self):
    if self.index == 5:
      seen["term"] = True
      os.kill(os.getpid(), signal.SIGTERM)
    return original_next(self)

  def wait_with_signal(manager):
    if seen["term"] and not seen["second"]:
      seen["second"] += 1
      os.kill(os.getpid(), signal.SIGINT)  # the old loop: KeyboardInterrupt here, mid-save
    return original_wait(manager)

  batches.SyntheticIterator.__next__ = next_with_signal
  checkpointing.ocp.CheckpointManager.wait_until_finished = wait_with_signal
  try:
    result = loop.train(config, workdir)
  finally:
    batches.SyntheticIterator.__next__ = original_next
    checkpointing.ocp.CheckpointManager.wait_until_finished = original_wait
  assert seen["second"] == 1
  assert signal.getsignal(signal.SIGINT) is seen["handler"]  # handlers restored afterwards
  return workdir, result


def test_sigterm_then_sigint_saves_the_step_and_exits_143(preempted_run):
  workdir, result = preempted_run
  assert result["preempted"] and result["exit_code"] == PREEMPTED_EXIT_CODE and result["step"] == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4", "6"]


def test_sigint_alone_saves_too_and_means_exit_130():
  class Manager:
    pass

  with Preemption(Manager()) as preemption:
    os.kill(os.getpid(), signal.SIGINT)  # the old loop: KeyboardInterrupt, nothing saved
    os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not change the verdict or abort anything
    assert preemption.reached(1) and preemption.extra_signals == 1
  assert preemption.exit_code == INTERRUPTED_EXIT_CODE == 130


def _copy(workdir, tmp_path) -> str:
  dst = str(tmp_path / "run")
  shutil.copytree(workdir, dst)
  return dst


def _restore(workdir):
  config = train_util.tiny_config("stage2")
  trainer = train_util.make_trainer(config)
  manager = checkpointing.make_manager(workdir, 2, 3)
  data = batches.SyntheticIterator(8, config.data.seq_len, run_config.model_config(config))
  skipped = []
  try:
    state = checkpointing.restore(manager, trainer.abstract_state, data, checkpointing.run_meta("stage2", None),
                                  skipped)
    moved = checkpointing.set_aside(manager, [s for s, _ in skipped]) if state is not None else []
    return state, skipped, moved, data, manager.all_steps()
  finally:
    manager.close()


def _delete_a_params_file(step_dir):
  params = os.path.join(step_dir, "params")
  victims = [os.path.join(root, n) for root, _, names in os.walk(params) for n in names if "ocdbt" in root or
             n == "manifest.ocdbt"]
  os.remove(sorted(victims)[0])


def _truncate_the_array_files(step_dir):
  for root, _, names in os.walk(os.path.join(step_dir, "params")):
    for name in names:
      if "ocdbt.process" in root or name.startswith("d"):
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
    f.write("\x00garbage{")


def _garbage_meta_item(step_dir):
  for root, _, names in os.walk(os.path.join(step_dir, "meta")):
    for name in names:
      with open(os.path.join(root, name), "w") as f:
        f.write("[1, 2")


def test_a_garbage_step_metadata_file_alone_still_restores(preempted_run, tmp_path):
  """Orbax's _CHECKPOINT_METADATA only describes the step: with the items intact the step restores as it is."""
  workdir = _copy(preempted_run[0], tmp_path)
  _garbage_metadata(os.path.join(workdir, "checkpoints", "6"))
  state, skipped, _, data, _ = _restore(workdir)
  assert int(state["step"]) == 6 and not skipped and data.get_state() == {"index": 6}


@pytest.mark.parametrize("damage", [_delete_a_params_file, _truncate_the_array_files, _garbage_meta_item])
def test_resume_falls_back_to_the_newest_step_that_restores(preempted_run, tmp_path, damage):
  workdir = _copy(preempted_run[0], tmp_path)
  damage(os.path.join(workdir, "checkpoints", "6"))
  _garbage_metadata(os.path.join(workdir, "checkpoints", "6"))  # as well: no TypeError from Orbax's metadata
  state, skipped, moved, data, steps = _restore(workdir)
  assert int(state["step"]) == 4 and data.get_state() == {"index": 4}
  assert [s for s, _ in skipped] == [6] and skipped[0][1]
  assert len(moved) == 1 and moved[0].startswith(os.path.join(workdir, checkpointing.CORRUPT_DIR, "6-"))
  assert os.path.isdir(moved[0]) and sorted(steps) == [2, 4]  # set aside, not deleted


def test_a_workdir_whose_every_step_is_damaged_exits_2_naming_each_and_is_left_untouched(preempted_run, tmp_path,
                                                                                          capsys):
  workdir = _copy(preempted_run[0], tmp_path)
  for step, damage in (("2", _garbage_meta_item), ("4", _truncate_the_array_files), ("6", _delete_a_params_file)):
    damage(os.path.join(workdir, "checkpoints", step))
  before = snapshot(workdir)
  args = ["--config", train_util.TINY + ":stage2", "--workdir", workdir, "--config.total_steps=20",
          "--config.checkpoint.every_steps=2", "--config.log.progress=False"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f"no checkpoint in {os.path.join(workdir, 'checkpoints')} restores" in err and "Traceback" not in err
  for step in ("2", "4", "6"):
    assert os.path.join(workdir, "checkpoints", step) + ":" in err
  assert snapshot(workdir) == before


def test_a_resume_with_another_model_exits_2_naming_the_fields_and_writes_nothing(preempted_run, tmp_path, capsys):
  workdir = _copy(preempted_run[0], tmp_path)
  before = snapshot(workdir)
  args = ["--config", train_util.TINY + ":stage2", "--workdir", workdir, "--config.total_steps=20",
          "--config.model.text.intermediate_size=256", "--config.log.progress=False"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "model.text.intermediate_size: workdir has 128, this run 256" in err and "Traceback" not in err
  assert snapshot(workdir) == before
  load_checkpoint(workdir)  # still loads


def test_run_files_are_written_atomically(tmp_path, monkeypatch):
  """A writer killed mid-way leaves the previous file whole (the old code truncated it first)."""
  cfg = run_config.model_config(train_util.tiny_config("stage2"))
  checkpointing.write_run_files(str(tmp_path), cfg, '{"run": 1}', None)
  before = snapshot(tmp_path)

  def dies(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "fsync", dies)
  with pytest.raises(KeyboardInterrupt):
    checkpointing.write_run_files(str(tmp_path), cfg.replace(dtype="bfloat16"), '{"run": 2}', None)
  assert snapshot(tmp_path) == before  # no torn file, no temporary left behind


def test_load_checkpoint_of_a_workdir_skips_a_damaged_newest_step(preempted_run, tmp_path):
  workdir = _copy(preempted_run[0], tmp_path)
  _delete_a_params_file(os.path.join(workdir, "checkpoints", "6"))
  model = load_checkpoint(workdir)  # step 4's params, with a warning
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.mark.parametrize("damage", ["metadata", "delete", "truncate"])
def test_a_damaged_converted_checkpoint_is_a_checkpoint_error_naming_the_part(tmp_path, damage):
  from llava_jax.checkpoint import write_checkpoint

  cfg = run_config.model_config(train_util.tiny_config("stage2"))
  ckpt = str(tmp_path / "ckpt")
  write_checkpoint(ckpt, cfg, train_util.initial_params())
  part = os.path.join(ckpt, "params", "part-00000")
  if damage == "metadata":
    for name in ("_METADATA", "_CHECKPOINT_METADATA"):
      with open(os.path.join(part, name), "w") as f:
        f.write("garbage{")
  elif damage == "delete":
    _delete_a_params_file(ckpt)
  else:
    _truncate_the_array_files(ckpt)
  with pytest.raises(CheckpointError, match="part-00000"):
    load_checkpoint(ckpt)


def test_a_data_position_the_iterator_refuses_exits_2_with_its_message(preempted_run, tmp_path, monkeypatch, capsys):
  """E.g. another num_workers: the iterator's named error (not a fallback to older steps, not a KeyError)."""
  from llava_jax.data import DataStateMismatchError

  def refuses(self, state):
    raise DataStateMismatchError("saved with data.num_workers=2, this run has 0: resume with --config.data."
                                 "num_workers=2")

  monkeypatch.setattr(batches.SyntheticIterator, "set_state", refuses)
  workdir = _copy(preempted_run[0], tmp_path)
  before = snapshot(workdir)
  args = ["--config", train_util.TINY + ":stage2", "--workdir", workdir, "--config.total_steps=20",
          "--config.checkpoint.every_steps=2", "--config.log.progress=False"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "resume with --config.data.num_workers=2" in err and "Traceback" not in err
  assert snapshot(workdir) == before
