"""`llava-jax train --config configs/tiny.py:stage1 --workdir W [--config.key=value ...]`.

The config is an ml_collections file (`path.py:arg` calls `get_config(arg)`); `--config.a.b=value` overrides a
field, and a key the config does not have is an error. Reruns with the same workdir resume.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

USAGE = ("usage: llava-jax train --config CONFIG.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]\n"
         "  e.g. llava-jax train --config configs/tiny.py:stage1 --workdir runs/tiny --config.total_steps=20")


def parse(argv: list[str]):
  """(config, workdir) from the command line; raises ValueError with what to change."""
  argv = ["llava-jax train"] + list(argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "the training config, PATH.py[:ARG]", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "checkpoints, logs and TensorBoard events; rerun to resume",
                      flag_values=fv)
  try:
    rest = fv(argv)
  except AttributeError as e:  # an override of a key the config lacks
    key = next((a.split("=")[0] for a in argv if a.startswith("--config.") and str(e).strip("'\"") in a), str(e))
    raise ValueError(f"{key}: the config has no such key ({e}); check the spelling against the config file") \
        from None
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):  # an error raised by get_config: keep its last line
      lines = [lines[0].split(":")[0] + ": " + lines[-1]]
    raise ValueError("\n".join(lines + [USAGE])) from None
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]}\n{USAGE}")
  if fv.config is None or not fv.workdir:
    raise ValueError(f"--config and --workdir are required\n{USAGE}")
  if isinstance(fv.config, config_flags.config_flags._ErrorConfig):  # pylint: disable=protected-access
    error = object.__getattribute__(fv.config, "_error")  # the config file could not be read
    spec = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"),
                next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?"))
    raise ValueError(f"--config {spec}: cannot read the config file ({error})\n{USAGE}") from None
  return fv.config, fv.workdir


def load_config(spec: str, overrides: dict | None = None):
  """The config file `PATH.py[:ARG]` exactly as `llava-jax train` reads it, with dotted-key overrides such as
  {"lora.r": 4} (a key the config lacks is an error). Tests, benchmarks and notebooks load configs through this."""
  config, _ = parse(["--config", spec, "--workdir", "-"])
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"{key}: the config has no such key; check the spelling against {spec}")
    node[leaf] = value
  return config


def main(argv: list[str] | None = None, *, own_process: bool | None = None) -> int:
  """Console entry: returns the exit status (docs/FAILURES.md): 0 done; 2 a bad config, checkpoint or data problem
  (the message says what to change, no traceback); 3 training diverged (non-finite steps in a row); 143 / 130
  stopped by SIGTERM / SIGINT after its save completed.

  own_process (default: argv is None): the call is its process's entry point, so it may set the process's malloc
  (host_memory.py); a caller that passes argv from its own process (a notebook, a test) keeps its allocator."""
  # pylint: disable=import-outside-toplevel  (jax is slow to import)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  own_process = argv is None if own_process is None else own_process
  argv = sys.argv[1:] if argv is None else argv
  if "-h" in argv or "--help" in argv:
    print(__doc__.strip() + "\n\n" + USAGE)
    return 0
  try:
    config, workdir = parse(argv)
  except ValueError as e:
    return _error(e)
  from llava_jax import cpu_defaults, host_memory
  if own_process and host_memory.cpu_only_run():  # before JAX starts: each step's temporaries stay mapped
    host_memory.keep_freed_memory()
  if own_process:
    cpu_defaults.apply_cpu_flags()  # before JAX starts; CPU-only runs only
  from llava_jax.train import loop
  from llava_jax.train.metrics import NONFINITE_EXIT_CODE, NonfiniteLossError

  try:
    result = loop.train(config, workdir)
  except NonfiniteLossError as e:
    print(f"llava-jax train: stopped: {e}", file=sys.stderr)
    return NONFINITE_EXIT_CODE
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # config, CheckpointError, data errors
    return _error(e)
  return result["exit_code"]


def _error(e: Exception) -> int:
  print(f"llava-jax train: error: {e}", file=sys.stderr)
  return 2
if __name__ == "__main__":
  sys.exit(main())
