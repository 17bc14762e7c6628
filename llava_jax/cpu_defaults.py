"""The XLA:CPU options this project runs with on a CPU, in one place: added to XLA_FLAGS before JAX starts.

XLA reads XLA_FLAGS once, when JAX creates its CPU client, so the flags must be in the environment before the first
JAX computation; an unknown flag aborts the process, so only flags jaxlib 0.10 accepts are listed. Which flags,
and why (measured by `benchmarks/cpu_flags.py`): docs/PERFORMANCE.md, "XLA:CPU settings".

Overriding: a flag the user's XLA_FLAGS already names keeps the user's value; LLAVA_JAX_CPU_FLAGS=none adds
nothing; LLAVA_JAX_CPU_FLAGS="--flag=value ..." adds those flags instead of ours. Runs that are not CPU-only
(JAX_PLATFORMS other than cpu, or unset, where an accelerator may be found) are left alone.
"""

from __future__ import annotations

import os

from llava_jax.host_memory import cpu_only_run

SWITCH = "LLAVA_JAX_CPU_FLAGS"
# Empty: on the AMD EPYC machines (cpu families 25 and 26) no option of jaxlib 0.10.2 beat XLA's own defaults
# (YNNPACK dots, 256-bit vectors, the concurrency scheduler) on the train step by more than the noise. A
# flag that wins on another CPU kind goes here (chosen by the CPU's vendor, if the kinds disagree), with its
# `benchmarks/cpu_flags.py` table in the docs.
DEFAULT_FLAGS: tuple[str, ...] = ()


def _flag_name(token: str) -> str:
  return token.lstrip("-").split("=", 1)[0]


def chosen_flags(env=None) -> tuple[str, ...]:
  """The flags to add: ours, none (LLAVA_JAX_CPU_FLAGS=none) or the switch's own list."""
  env = os.environ if env is None else env
  value = env.get(SWITCH, "").strip()
  if not value or value == "default":
    return DEFAULT_FLAGS
  if value.lower() in ("none", "off", "0"):
    return ()
  tokens = tuple(value.split())
  bad = [t for t in tokens if not t.startswith("--xla_")]
  if bad:
    raise ValueError(f"{SWITCH}: {bad} are not XLA flags (--xla_...=value); use 'none' to add no flags")
  return tokens


def merged_xla_flags(env=None, *, cpu_run: bool | None = None) -> str | None:
  """XLA_FLAGS with the chosen flags appended, each only where XLA_FLAGS does not already name it; None when
  nothing is to change (not a CPU run, switched off, or every flag already named)."""
  env = os.environ if env is None else env
  if not (cpu_only_run(env) if cpu_run is None else cpu_run):
    return None
  user = env.get("XLA_FLAGS", "").split()
  named = {_flag_name(t) for t in user}
  added = [f for f in chosen_flags(env) if _flag_name(f) not in named]
  return " ".join(user + added) if added else None


def apply_cpu_flags(env=None, *, cpu_run: bool | None = None) -> str:
  """Set XLA_FLAGS in `env` (default: os.environ) for a CPU run, before JAX starts; returns XLA_FLAGS as it is."""
  env = os.environ if env is None else env
  merged = merged_xla_flags(env, cpu_run=cpu_run)
  if merged is not None:
    env["XLA_FLAGS"] = merged
  return env.get("XLA_FLAGS", "")
