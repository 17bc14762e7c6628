#!/usr/bin/env python3
"""Multi-node GPU training under SLURM: writes an sbatch script (one JAX process per node, all its GPUs) and
submits it.

  launch/gpu_slurm.py --nodes 2 --config configs/llava_v1_5_7b.py:stage2 --workdir /shared/runs/stage2 \
      [--partition gpu] [--time 24:00:00] [--override key=value ...] [--dry-run]

`jax.distributed.initialize()` reads SLURM's environment (SLURM_JOB_NODELIST, SLURM_PROCID, ...) to find the
coordinator and its peers, so the script only has to start one task per node. The workdir must be on a file
system every node sees. --dry-run prints the script and the sbatch command without submitting.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sbatch_script(args) -> str:
  overrides = " ".join(shlex.quote(f"--config.{o}") for o in args.override)
  train = (f"{shlex.quote(os.path.join(args.venv, 'bin', 'llava-jax'))} train --config {shlex.quote(args.config)} "
           f"--workdir {shlex.quote(args.workdir)} --config.distributed=yes {overrides}").strip()
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --cpus-per-task={args.cpus_per_task}",
      f"#SBATCH --time={args.time}",
      f"#SBATCH --output={args.job_name}-%j.log",
  ]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  lines += [
      "set -euo pipefail",
      f"cd {shlex.quote(args.repo_dir)}",
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
      "# One task per node; JAX finds the coordinator and its peers from SLURM's environment.",
      f"srun --kill-on-bad-exit=1 {train}",
  ]
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus-per-node", type=int, default=8)
  parser.add_argument("--cpus-per-task", type=int, default=32)
  parser.add_argument("--partition")
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--job-name", default="llava-jax")
  parser.add_argument("--repo-dir", default=ROOT, help="checkout on the shared file system")
  parser.add_argument("--venv", default=os.path.join(ROOT, ".venv"), help="virtual env with llava-jax and "
                      "jax[cuda12] installed")
  parser.add_argument("--override", action="append", default=[], help="config override key=value (repeatable)")
  parser.add_argument("--dry-run", action="store_true")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  script = sbatch_script(args)
  if args.dry_run:
    print(script, end="")
    print(shlex.join(["sbatch", f"{args.job_name}.sbatch"]))
    return 0
  with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False, dir=".") as f:
    f.write(script)
  print(shlex.join(["sbatch", f.name]), flush=True)
  return subprocess.run(["sbatch", f.name], check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
