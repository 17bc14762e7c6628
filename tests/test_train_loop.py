"""The loop and CLI: config errors fail at start, logs and TensorBoard files, init from a converted checkpoint,
load_checkpoint(WORKDIR), the grain pipeline, and resuming after kill -9 / SIGTERM with the same losses."""

import json
import os
import random
import signal
import struct
import time

import numpy as np
import pytest
from flax import nnx

import train_util
from llava_jax import load_checkpoint
from llava_jax.checkpoint import write_checkpoint
from llava_jax.train import cli, loop, run_config


def quiet(**overrides):
  return {"log.progress": False, **overrides}


@pytest.mark.parametrize("args, message", [
    (["--config", train_util.TINY + ":stage3"], "unknown stage 'stage3'"),
    (["--config.stage=bogus"], "stage 'bogus' is not one of"),
    (["--config.mesh=(3,1,1)"], "change --config.mesh so that the sizes multiply to 8"),
    (["--config.mesh=(3,-1,1)"], "do not divide the 8 devices"),
    (["--config.batch_size=12"], "set --config.batch_size to a multiple of 8"),
    (["--config.grad_accum_steps=2"], "set --config.batch_size to a multiple of 16"),
    (["--config.nope=1"], "--config.nope: the config has no such key"),
    (["--config.optimizer.lr=abc"], "--config.optimizer.lr"),
    (["--config.remat=most"], "config.remat='most' is not one of"),
    (["--config.data.kind=webdataset"], "config.data.kind='webdataset' is not one of"),
])
def test_bad_config_fails_at_start_saying_what_to_change(tmp_path, capsys, args, message):
  if not args[0].startswith("--config="):
    args = ["--config", train_util.TINY + ":stage1"] + args if args[0] != "--config" else args
  start = time.time()
  assert cli.main(args + ["--workdir", str(tmp_path / "w")]) == 2
  assert message in capsys.readouterr().err
  assert time.time() - start < 5  # before any compilation
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def read_events(workdir) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the TensorBoard event files in `workdir` (TFRecord framing around Event protos)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(workdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_logs_checkpoints_resume_and_load_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = train_util.tiny_config("stage2", **quiet(total_steps=4, **{"checkpoint.every_steps": 2,
                                                                   "log.peak_tflops": 0.001}))
  first = loop.train(config, workdir)
  assert first["start_step"] == 0 and first["step"] == 4 and not first["preempted"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "supervised_tokens", "mfu"} <= records[0].keys()
  assert all(0 < r["mfu"] for r in records)  # an estimate against the given peak (1 GFLOP/s here)
  assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # linear warm-up from 0, as HF's scheduler
  events = read_events(workdir)
  assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in events["train/loss"]], [r["loss"] for r in records], rtol=1e-6)
  assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time"} <= events.keys()

  # The workdir loads as a checkpoint: the params of its latest step.
  loaded = train_util.flat(nnx.to_pure_dict(nnx.state(load_checkpoint(workdir), nnx.Param)))
  expected = train_util.flat(first["trainer"].export_params(first["state"]))
  assert loaded.keys() == expected.keys()
  assert all(np.array_equal(loaded[k], expected[k]) for k in expected)

  # The same command with more steps resumes at step 4.
  config = train_util.tiny_config("stage2", **quiet(total_steps=6, **{"checkpoint.every_steps": 2}))
  second = loop.train(config, workdir)
  assert second["start_step"] == 4 and second["step"] == 6


def test_init_checkpoint_starts_at_step_0_from_its_weights(tmp_path):
  config = train_util.tiny_config("stage2")
  params = train_util.initial_params()
  write_checkpoint(str(tmp_path / "ckpt"), run_config.model_config(config), params)
  config = train_util.tiny_config("stage2", **quiet(total_steps=1, init_checkpoint=str(tmp_path / "ckpt")))
  result = loop.train(config, str(tmp_path / "run"))
  assert result["start_step"] == 0
  # The first update has learning rate 0 (warm-up), so the weights are still exactly the checkpoint's.
  loaded = train_util.flat(nnx.to_pure_dict(nnx.state(load_checkpoint(str(tmp_path / "run")), nnx.Param)))
  expected = train_util.flat(params)
  assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


def test_trains_on_the_grain_pipeline_and_resumes_its_position(tmp_path):
  from llava_jax.data import build_tokenizer, write_shapes_corpus

  paths = write_shapes_corpus(str(tmp_path / "shapes"), num_train=24, num_eval=2)
  build_tokenizer(str(tmp_path / "tok"))
  data = {"data.kind": "llava", "data.json_path": paths["stage1"], "data.image_dir": paths["image_dir"],
          "data.tokenizer": str(tmp_path / "tok"), "data.seq_len": 64, "model.text.vocab_size": 1024,
          "model.image_token_index": 1024, "checkpoint.every_steps": 2}
  config = train_util.tiny_config("stage1", **quiet(total_steps=4, **data))
  whole = loop.train(config, str(tmp_path / "whole"))
  config = train_util.tiny_config("stage1", **quiet(total_steps=2, **data))
  loop.train(config, str(tmp_path / "split"))
  config = train_util.tiny_config("stage1", **quiet(total_steps=4, **data))
  rest = loop.train(config, str(tmp_path / "split"))
  assert rest["start_step"] == 2
  assert whole["losses"][2:] == rest["losses"]  # same batches after the restore, hence the same losses


# -- preemption: kill -9 and SIGTERM in a subprocess -------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_and_sigterm_resume_with_the_loss_sequence_of_an_uninterrupted_run(tmp_path):
  total = 14
  overrides = {"total_steps": total, "checkpoint.every_steps": 3, "data.num_distinct_batches": 0}
  args = ["--config", train_util.TINY + ":stage2", "--workdir", str(tmp_path / "run"),
          "--config.log.progress=False"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  reference = loop.train(train_util.tiny_config("stage2", **quiet(**overrides)), str(tmp_path / "reference"))

  kill_at = random.randint(4, 8)
  proc = train_util.start_training(args)
  train_util.wait_for_step(proc, str(tmp_path / "run"), kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(train_util.logged_losses(str(tmp_path / "run")))

  proc = train_util.start_training(args)  # resumes from the last finished checkpoint, then is preempted by SIGTERM
  train_util.wait_for_step(proc, str(tmp_path / "run"), killed_at + 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out
  assert "resumed from" in out and "preempted: saved step" in out, out
  saved = int(out.split("preempted: saved step ")[1].split()[0])
  assert str(saved) in os.listdir(tmp_path / "run" / "checkpoints")

  proc = train_util.start_training(args)  # finishes
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step {saved}" in out

  losses = train_util.logged_losses(str(tmp_path / "run"))
  assert sorted(losses) == list(range(1, total + 1))
  assert [losses[s] for s in range(1, total + 1)] == reference["losses"]  # exactly
