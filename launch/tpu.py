#!/usr/bin/env python3
"""Cloud TPU VM lifecycle for llava-jax training, one gcloud command per step.

  launch/tpu.py create  --name llava --zone us-east5-a --preset v5p-64 [--queued] [--spot]
  launch/tpu.py install --name llava --zone us-east5-a [--repo GIT_URL --ref main]   (default: this checkout)
  launch/tpu.py train   --name llava --zone us-east5-a --config configs/llava_v1_5_7b.py:stage2 \
                        --workdir gs://BUCKET/runs/stage2 [--override key=value ...]
  launch/tpu.py logs    --name llava --zone us-east5-a
  launch/tpu.py copy    --name llava --zone us-east5-a --src gs://BUCKET/ckpt --dst /tmp/ckpt   (on every worker)
  launch/tpu.py delete  --name llava --zone us-east5-a

Every command takes --dry-run (print what would run, run nothing). Training runs on all workers at once (one JAX
process per host; `jax.distributed.initialize()` finds its peers from the TPU metadata). On multi-host slices the
workdir must be on storage every host sees (a gs:// bucket): Orbax writes one checkpoint from all hosts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "/tmp/llava-jax.tar.gz"
SETUP = ("python3 -m venv .venv && .venv/bin/pip install -q -U pip && "
         ".venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'")


def hardware_preset(name: str) -> dict:
  from llava_jax.train import recipes  # pylint: disable=import-outside-toplevel  (the installed package)
  return recipes.preset(name)


def _where(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def _ssh(args, remote: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}",
          f"--command={remote}"]


def commands(args) -> list[list[str]]:
  """The gcloud commands for `args.action`, as argument lists."""
  if args.action == "create":
    preset = hardware_preset(args.preset)
    if preset["kind"] != "tpu":
      raise ValueError(f"preset {args.preset!r} is not a TPU; see launch/gpu_slurm.py")
    if args.queued:
      cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr", f"--node-id={args.name}",
             *_where(args), f"--accelerator-type={preset['accelerator_type']}",
             f"--runtime-version={preset['runtime']}"]
    else:
      cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
             f"--accelerator-type={preset['accelerator_type']}", f"--version={preset['runtime']}"]
    return [cmd + (["--spot"] if args.spot else [])]
  if args.action == "install":
    if args.repo:  # every worker clones the repository
      remote = (f"set -e; if [ ! -d llava-jax ]; then git clone {shlex.quote(args.repo)} llava-jax; fi; "
                f"cd llava-jax && git fetch -q && git checkout -q {shlex.quote(args.ref)} && {SETUP}")
      return [_ssh(args, remote)]
    # Default: ship this checkout's committed tree to every worker.
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", ARCHIVE, args.ref],
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.name}:llava-jax.tar.gz", *_where(args),
             "--worker=all"],
            _ssh(args, f"set -e; mkdir -p llava-jax && tar -xzf llava-jax.tar.gz -C llava-jax && cd llava-jax && "
                       f"{SETUP}")]
  if args.action == "train":
    overrides = " ".join(shlex.quote(f"--config.{o}") for o in args.override)
    train = (f".venv/bin/llava-jax train --config {shlex.quote(args.config)} --workdir {shlex.quote(args.workdir)} "
             f"{overrides}").strip()
    remote = f"cd llava-jax && nohup {train} > train.log 2>&1 &"
    return [_ssh(args, remote)]
  if args.action == "logs":
    return [_ssh(args, "tail -n 100 -f llava-jax/train.log", worker="0")]
  if args.action == "copy":
    return [_ssh(args, f"gcloud storage rsync --recursive {shlex.quote(args.src)} {shlex.quote(args.dst)}")]
  if args.action == "delete":
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]
  raise ValueError(f"unknown action {args.action!r}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("action", choices=["create", "install", "train", "logs", "copy", "delete"])
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--preset", default="v5p-64", help="hardware preset (llava_jax.train.recipes.PRESETS)")
  parser.add_argument("--queued", action="store_true", help="create through a queued resource")
  parser.add_argument("--spot", action="store_true")
  parser.add_argument("--repo", help="git URL to clone on the workers (default: ship this checkout)")
  parser.add_argument("--ref", default="HEAD", help="git ref to install")
  parser.add_argument("--config", help="training config, PATH.py:ARG")
  parser.add_argument("--workdir", help="gs://... on multi-host slices")
  parser.add_argument("--override", action="append", default=[], help="config override key=value (repeatable)")
  parser.add_argument("--src")
  parser.add_argument("--dst")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  missing = {"train": ("config", "workdir"), "copy": ("src", "dst")}.get(args.action, ())
  for name in missing:
    if not getattr(args, name):
      print(f"tpu.py {args.action}: --{name} is required", file=sys.stderr)
      return 2
  try:
    cmds = commands(args)
  except ValueError as e:
    print(f"tpu.py: error: {e}", file=sys.stderr)
    return 2
  for cmd in cmds:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      result = subprocess.run(cmd, check=False)
      if result.returncode:
        return result.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
