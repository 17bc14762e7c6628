"""launch/ dry-runs print the gcloud / srun commands for each hardware preset, and run nothing."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from llava_jax.train import recipes  # noqa: E402


def run(script, *args):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args, "--dry-run"],
                          capture_output=True, text=True, check=False, env={**os.environ, "PATH": "/nonexistent"})
  return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("preset", ["v4-32", "v5p-64", "v5e-256"])
def test_tpu_create_per_preset(preset):
  p = recipes.preset(preset)
  code, out, _ = run("tpu.py", "create", "--name", "llava", "--zone", "us-east5-a", "--preset", preset)
  assert code == 0
  assert shlex.split(out) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llava", "--zone=us-east5-a",
                              f"--accelerator-type={p['accelerator_type']}", f"--version={p['runtime']}"]
  code, out, _ = run("tpu.py", "create", "--name", "llava", "--zone", "z", "--preset", preset, "--queued", "--spot")
  assert shlex.split(out)[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "llava-qr"]
  assert f"--runtime-version={p['runtime']}" in out and "--spot" in out


def test_tpu_lifecycle_commands():
  base = ["--name", "llava", "--zone", "z", "--project", "proj"]
  code, out, _ = run("tpu.py", "install", *base)
  lines = out.strip().splitlines()
  assert code == 0 and len(lines) == 3 and lines[0].startswith("git -C ")
  assert "tpu-vm scp" in lines[1] and "--worker=all" in lines[1]
  assert "pip install -q -e ." in lines[2] and "jax[tpu]==0.10.2" in lines[2]

  code, out, _ = run("tpu.py", "train", *base, "--config", "configs/llava_v1_5_7b.py:stage2", "--workdir",
                     "gs://bucket/run", "--override", "total_steps=10", "--override", "batch_size=128")
  cmd = shlex.split(out)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llava"] and "--worker=all" in cmd
  remote = cmd[-1]
  assert remote.startswith("--command=cd llava-jax && nohup .venv/bin/llava-jax train --config "
                           "configs/llava_v1_5_7b.py:stage2 --workdir gs://bucket/run --config.total_steps=10 "
                           "--config.batch_size=128")
  assert "--project=proj" in cmd

  assert "--worker=0" in run("tpu.py", "logs", *base)[1]
  assert "gcloud storage rsync --recursive gs://b/c /tmp/c" in run("tpu.py", "copy", *base, "--src", "gs://b/c",
                                                                    "--dst", "/tmp/c")[1]
  assert shlex.split(run("tpu.py", "delete", *base)[1]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "llava", "--zone=z", "--project=proj", "--quiet"]


def test_tpu_errors():
  code, _, err = run("tpu.py", "create", "--name", "x", "--zone", "z", "--preset", "v9-1")
  assert code == 2 and "unknown hardware preset 'v9-1'" in err
  code, _, err = run("tpu.py", "train", "--name", "x", "--zone", "z", "--workdir", "w")
  assert code == 2 and "--config is required" in err


def test_slurm_gpu_script():
  code, out, _ = run("gpu_slurm.py", "--nodes", "4", "--config", "configs/llava_v1_5_7b.py:stage2", "--workdir",
                     "/shared/run", "--partition", "a100", "--override", "total_steps=5")
  assert code == 0
  assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --gpus-per-node=8" in out
  assert "#SBATCH --partition=a100" in out
  srun = next(line for line in out.splitlines() if line.startswith("srun"))
  assert "llava-jax train --config configs/llava_v1_5_7b.py:stage2 --workdir /shared/run" in srun
  assert "--config.distributed=yes --config.total_steps=5" in srun
  assert out.strip().endswith("sbatch llava-jax.sbatch")


def test_presets_divide_their_device_counts():
  for name, p in recipes.PRESETS.items():
    data, fsdp, tensor = p["mesh"]
    assert data * fsdp * tensor == p["devices"], name
    assert p["devices"] % p["hosts"] == 0, name
