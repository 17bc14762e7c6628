"""Multi-host for real, rehearsed with several JAX processes on this machine (CPU devices, gloo collectives) through
launch/local.py: training on 2 processes x 4 devices equals 1 process x 8 devices, checkpoints restore on another
process count, each sample is read by one host in the single-host order, a killed peer ends the run in bounded
time and the relaunch resumes, SIGTERM gives one coordinated checkpoint, and only process 0 logs.

The 1 x 8 reference runs in this process (conftest's 8 devices); the multi-process runs are subprocesses.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

import train_util
from llava_jax import load_checkpoint
from llava_jax.train import batches, loop, run_config

LAUNCHER = os.path.join(train_util.ROOT, "launch", "local.py")
MESH = (2, 4, 1)  # data x fsdp: both axes split the batch / the weights across the two processes
LOSS_RTOL = 1e-5  # same math, collectives summed in another order


def overrides(**extra) -> dict:
  return {"mesh": MESH, "log.progress": False, "log.every_steps": 1, **extra}


def cli_args(stage: str, workdir, settings: dict) -> list[str]:
  args = ["llava-jax", "train", "--config", f"{train_util.TINY}:{stage}", "--workdir", str(workdir)]
  for key, value in settings.items():
    value = "(" + ",".join(map(str, value)) + ")" if isinstance(value, tuple) else value
    args.append(f"--config.{key}={value}")
  return args


def launcher_command(command: list[str], processes: int = 2, devices: int = 4, *flags) -> list[str]:
  return [sys.executable, LAUNCHER, "--processes", str(processes), "--devices-per-process", str(devices), *flags,
          "--", *command]


def launch(command: list[str], processes: int = 2, devices: int = 4, *flags, timeout: float = 300):
  """(exit status, combined output) of the launcher."""
  result = subprocess.run(launcher_command(command, processes, devices, *flags), capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=train_util.ROOT)
  return result.returncode, result.stdout + result.stderr


def losses_by_step(workdir) -> dict[int, float]:
  """metrics.jsonl's loss per step (a resumed run's records of a step replace the earlier ones)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
  return out


def reference(stage: str, workdir, settings: dict) -> list[float]:
  """The 1 process x 8 devices run, in this process."""
  config = train_util.tiny_config(stage, **settings)
  return loop.train(config, str(workdir))["losses"]


def assert_same_losses(got: dict[int, float], expected: list[float], steps) -> None:
  np.testing.assert_allclose([got[s] for s in steps], [expected[s - 1] for s in steps], rtol=LOSS_RTOL)


def params_of(workdir) -> dict:
  return train_util.flat(nnx.to_pure_dict(nnx.state(load_checkpoint(str(workdir)), nnx.Param)))


def assert_same_params(workdir_a, workdir_b) -> None:
  a, b = params_of(workdir_a), params_of(workdir_b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def saved_steps(workdir) -> list[int]:
  """Committed steps (a save cut short by a kill leaves a STEP.orbax-checkpoint-tmp folder, not counted)."""
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


# -- the global batch: host rows in the single-host order -------------------------------------------------------


def test_synthetic_hosts_rows_assemble_the_single_host_batch():
  cfg = train_util.tiny_config("stage1")
  model_cfg = run_config.model_config(cfg)
  one = batches.SyntheticIterator(8, cfg.data.seq_len, model_cfg, seed=3)
  hosts = [batches.SyntheticIterator(4, cfg.data.seq_len, model_cfg, seed=3, process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(3):
    whole, parts = next(one), [next(h) for h in hosts]
    for key, value in whole.items():
      # shard_batch stacks process 0's rows, then process 1's: the global batch is their concatenation.
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)


def _shapes_data(tmp_path) -> dict:
  from llava_jax.data import build_tokenizer, write_shapes_corpus
  paths = write_shapes_corpus(str(tmp_path / "shapes"), num_train=32, num_eval=2)
  build_tokenizer(str(tmp_path / "tok"))
  return {"data.kind": "llava", "data.json_path": paths["stage1"], "data.image_dir": paths["image_dir"],
          "data.tokenizer": str(tmp_path / "tok"), "data.seq_len": 64, "model.text.vocab_size": 1024,
          "model.image_token_index": 1024}


def test_pipeline_reads_each_sample_once_per_epoch_in_the_single_host_order(tmp_path):
  """Hosts 0 and 1 (4 rows each) together read what one host (8 rows) reads, batch by batch, and an epoch of
  32 samples is 4 global batches in which every sample appears exactly once."""
  import llava_jax.data as data_pkg
  import transformers
  data = _shapes_data(tmp_path)
  cfg = train_util.tiny_config("stage1", **data)
  model_cfg = run_config.model_config(cfg)

  def iterator(batch_size, index, count):
    config = data_pkg.DataConfig(json_path=data["data.json_path"], image_dir=data["data.image_dir"],
                                 template="plain", max_length=64, batch_size=batch_size,
                                 num_image_tokens=model_cfg.num_image_tokens,
                                 image_token_index=model_cfg.image_token_index, seed=5, shuffle=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(data["data.tokenizer"])
    image_processor = batches._image_processor(cfg.data, model_cfg, None)  # pylint: disable=protected-access
    return data_pkg.make_iterator(config, tokenizer, image_processor, process_index=index, process_count=count)

  one = iterator(8, 0, 1)
  hosts = [iterator(4, i, 2) for i in range(2)]
  rows_seen = []
  for _ in range(4):  # one epoch
    whole, parts = next(one), [next(h) for h in hosts]
    for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
    rows_seen += [r.tobytes() + p.tobytes() for r, p in zip(whole["input_ids"], whole["pixel_values"])]
  with open(data["data.json_path"]) as f:
    records = json.load(f)
  assert len(records) == 32
  # Every sample once per epoch: as many distinct rows (text and pixels) as distinct samples in the corpus.
  samples = set()
  for r in records:
    with open(os.path.join(data["data.image_dir"], r["image"]), "rb") as f:
      samples.add((json.dumps(r["conversations"]), f.read()))
  assert len(rows_seen) == 32 and len(set(rows_seen)) == len(samples)
  for it in [one, *hosts]:
    if hasattr(it, "close"):
      it.close()


# -- training: 2 processes x 4 devices == 1 process x 8 devices ---------------------------------------------------


def test_stage1_two_processes_equal_one_and_only_process_0_logs(tmp_path):
  settings = overrides(total_steps=2, **{"checkpoint.every_steps": 0})
  expected = reference("stage1", tmp_path / "one", settings)
  code, out = launch(cli_args("stage1", tmp_path / "two", settings))
  assert code == 0, out[-3000:]
  got = losses_by_step(tmp_path / "two")
  assert_same_losses(got, expected, range(1, 3))
  # metrics.jsonl written once (by process 0): one record per step; one TensorBoard file; the log from p0 only.
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f if l.strip()] == [1, 2]
  assert len(glob.glob(str(tmp_path / "two" / "events.out.tfevents.*"))) == 1
  step_lines = [l for l in out.splitlines() if " loss " in l and "step " in l]
  assert len(step_lines) == 2 and all(l.startswith("[p0] ") for l in step_lines), out[-3000:]
  assert "[launch] all 2 processes exited with status 0" in out
  assert_same_params(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_stage2_two_processes_equal_one(tmp_path):
  settings = overrides(total_steps=3, **{"checkpoint.every_steps": 0})
  expected = reference("stage2", tmp_path / "one", settings)
  code, out = launch(cli_args("stage2", tmp_path / "two", settings))
  assert code == 0, out[-3000:]
  assert_same_losses(losses_by_step(tmp_path / "two"), expected, range(1, 4))
  assert_same_params(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_grain_pipeline_two_processes_equal_one(tmp_path):
  settings = overrides(total_steps=4, **{"checkpoint.every_steps": 0}, **_shapes_data(tmp_path))
  expected = reference("stage1", tmp_path / "one", settings)
  code, out = launch(cli_args("stage1", tmp_path / "two", settings))
  assert code == 0, out[-3000:]
  assert_same_losses(losses_by_step(tmp_path / "two"), expected, range(1, 5))


# -- checkpoints across process counts ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_checkpoint_restores_on_another_process_count(tmp_path, first, then):
  """A run of 6 steps saved at 3 and 6; step 6 removed; the rest on the other process count gives the same
  losses for steps 4-6 and the same final parameters: the parameters and the data position were restored."""
  settings = overrides(total_steps=6, **{"checkpoint.every_steps": 3})
  workdir = tmp_path / "run"
  code, out = launch(cli_args("stage1", workdir, settings), first, 8 // first)
  assert code == 0, out[-3000:]
  assert saved_steps(workdir) == [3, 6]
  whole = losses_by_step(workdir)
  shutil.copytree(workdir, tmp_path / "whole")
  shutil.rmtree(workdir / "checkpoints" / "6")
  code, out = launch(cli_args("stage1", workdir, settings), then, 8 // then)
  assert code == 0, out[-3000:]
  assert "resumed from" in out and "at step 3" in out
  rest = losses_by_step(workdir)
  np.testing.assert_allclose([rest[s] for s in (4, 5, 6)], [whole[s] for s in (4, 5, 6)], rtol=LOSS_RTOL)
  assert_same_params(tmp_path / "whole", workdir)


# -- faults -------------------------------------------------------------------------------------------------------


def _start(command, *flags, processes=2):
  return subprocess.Popen(launcher_command(command, processes, 8 // processes, *flags), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=train_util.ROOT)


def _read_until(proc, pattern: str, lines: list[str], timeout: float = 240) -> None:
  deadline = time.monotonic() + timeout
  for line in proc.stdout:
    lines.append(line)
    if pattern in line:
      return
    assert time.monotonic() < deadline, "".join(lines[-50:])
  raise AssertionError(f"the run ended before {pattern!r}:\n" + "".join(lines[-50:]))


def _child_pids(lines: list[str]) -> list[int]:
  started = next(l for l in lines if l.startswith("[launch] started"))
  return json.loads(started.split("(pids ")[1].split(")")[0])


@pytest.mark.slow
def test_kill_9_of_one_process_ends_the_others_in_bounded_time_and_the_relaunch_resumes(tmp_path):
  # The launcher's default: 5 s once declared both live processes dead before step 7 on a loaded 2-core CI
  # machine; 10 s + slack still ends well before JAX's 100 s default.
  heartbeat_s = 10
  settings = overrides(total_steps=20, **{"checkpoint.every_steps": 3})
  command = cli_args("stage1", tmp_path / "run", settings)
  # --keep-going: the launcher does not stop process 0, which must end on its own, as on a pod.
  proc = _start(command, "--keep-going", "--heartbeat-timeout", str(heartbeat_s))
  lines: list[str] = []
  _read_until(proc, "step 7/20", lines)
  # Step 6's save is asynchronous: on a busy machine it may still be in flight at step 7. Kill once it committed.
  while not any(s >= 6 for s in saved_steps(tmp_path / "run")):
    _read_until(proc, "\n", lines)
  os.kill(_child_pids(lines)[1], signal.SIGKILL)
  killed_at = time.monotonic()
  rest, _ = proc.communicate(timeout=120)
  ended_after = time.monotonic() - killed_at
  out = "".join(lines) + rest
  assert proc.returncode != 0
  assert "[launch] process 1 was killed by SIGKILL" in out
  # Process 0 ended by itself, with the coordination service's diagnosis, within the heartbeat bound (+ slack
  # for a busy machine), not after JAX's defaults (100 s heartbeat, 300 s shutdown) or never.
  assert "heartbeat" in out and "[p0]" in out
  assert ended_after < heartbeat_s + 40, ended_after
  print(f"process 0 ended {ended_after:.1f}s after the kill (heartbeat timeout {heartbeat_s}s)")
  last = max(saved_steps(tmp_path / "run"))
  assert last >= 6 and last % 3 == 0
  code, out = launch(command[:], 2, 4, "--heartbeat-timeout", str(heartbeat_s))
  assert code == 0, out[-3000:]
  assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step {last}" in out
  expected = reference("stage1", tmp_path / "one", settings)
  assert_same_losses(losses_by_step(tmp_path / "run"), expected, range(1, 21))


@pytest.mark.slow
def test_sigterm_gives_one_coordinated_checkpoint_then_the_relaunch_resumes(tmp_path):
  settings = overrides(total_steps=30, **{"checkpoint.every_steps": 0})
  command = cli_args("stage1", tmp_path / "run", settings)
  proc = _start(command)
  lines: list[str] = []
  _read_until(proc, "step 4/30", lines)
  proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
  rest, _ = proc.communicate(timeout=180)
  out = "".join(lines) + rest
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  steps = saved_steps(tmp_path / "run")
  assert len(steps) == 1 and 4 <= steps[0] < 30, (steps, out[-3000:])  # one checkpoint, both hosts' shards
  data_files = sorted(os.listdir(tmp_path / "run" / "checkpoints" / str(steps[0]) / "data"))
  assert data_files == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"] or \
      data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  assert out.count("preempted: saved step") == 1
  code, out = launch(command)
  assert code == 0, out[-3000:]
  assert f"at step {steps[0]}" in out
  expected = reference("stage1", tmp_path / "one", settings)
  assert_same_losses(losses_by_step(tmp_path / "run"), expected, range(1, 31))


# -- the launcher itself -----------------------------------------------------------------------------------------


def test_launcher_stops_the_rest_when_one_process_fails(tmp_path):
  """Process 1 fails at once, process 0 would sleep for minutes: the launcher stops it and exits with 1's status."""
  script = tmp_path / "worker.py"
  script.write_text("import os, sys, time\n"
                    "print('id', os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
                    "os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'], flush=True)\n"
                    "if os.environ['JAX_PROCESS_ID'] == '1':\n"
                    "  print('boom', file=sys.stderr, flush=True); sys.exit(3)\n"
                    "time.sleep(300)\n")
  t0 = time.monotonic()
  code, out = launch([sys.executable, str(script)], 2, 3, "--grace", "5", timeout=60)
  assert code == 3, out
  assert time.monotonic() - t0 < 30, out
  assert "[p1] boom" in out and "[launch] process 1 exited with status 3" in out
  assert "[launch] stopping the other processes" in out
  for i in range(2):
    line = next(l for l in out.splitlines() if l.startswith(f"[p{i}] id"))
    _, _, index, count, address, *flags = line.split()
    assert (index, count) == (str(i), "2") and address.startswith("127.0.0.1:")
    assert flags.count("--xla_force_host_platform_device_count=3") == 1
    assert not any(f.startswith("--xla_force_host_platform_device_count=8") for f in flags)


@pytest.mark.slow
def test_eval_on_two_processes_gives_the_answers_of_one_written_once(tmp_path):
  """`llava-jax eval` splits the questions across the processes and process 0 writes every answer once."""
  from eval_tiny_data import write_task_data
  from llava_jax.cli import main as cli
  from llava_jax.convert import convert_checkpoint
  from llava_jax.data.synthetic import build_tokenizer
  from llava_jax.demo import write_tiny_hf_parts
  from llava_jax.eval.runner import read_answers

  tokenizer = build_tokenizer(str(tmp_path / "tokenizer"))
  clip, llm = write_tiny_hf_parts(str(tmp_path / "hf"), tokenizer, seed=0)
  ckpt = str(tmp_path / "ckpt")
  convert_checkpoint(ckpt, clip=clip, llm=llm, progress=False)
  data = write_task_data("pope", str(tmp_path / "data"))
  args = ["eval", "--task", "pope", "--data", data, "--ckpt", ckpt, "--max-new-tokens", "4", "--quiet"]
  assert cli(args + ["--out", str(tmp_path / "one")]) == 0
  code, output = launch(["llava-jax", *args, "--out", str(tmp_path / "two")])
  assert code == 0, output[-3000:]
  one = read_answers(os.path.join(tmp_path, "one", "answers.jsonl"))
  two = read_answers(os.path.join(tmp_path, "two", "answers.jsonl"))
  strip = lambda records: [(r["question_id"], r["prompt"], r["text"]) for r in records]
  assert strip(two) == strip(one) and len({r["question_id"] for r in two}) == len(two)
  with open(os.path.join(tmp_path, "one", "metrics.json")) as f, open(os.path.join(tmp_path, "two",
                                                                                    "metrics.json")) as g:
    assert json.load(f) == json.load(g)
