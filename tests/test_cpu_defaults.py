"""`llava_jax.cpu_defaults`: our XLA:CPU flags reach XLA_FLAGS only on CPU runs, and never over the user's."""

import subprocess
import sys

import pytest

from llava_jax import cpu_defaults

OURS = ("--xla_cpu_a=1", "--xla_cpu_b=true")
REAL_DEFAULTS = cpu_defaults.DEFAULT_FLAGS  # before the fixture below replaces them


@pytest.fixture(autouse=True)
def _our_flags(monkeypatch):
  monkeypatch.setattr(cpu_defaults, "DEFAULT_FLAGS", OURS)


def test_a_cpu_run_gets_our_flags_after_the_users():
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  assert cpu_defaults.apply_cpu_flags(env) == "--xla_dump_to=/tmp/x --xla_cpu_a=1 --xla_cpu_b=true"
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_a=1 --xla_cpu_b=true"
  assert cpu_defaults.apply_cpu_flags(env) == env["XLA_FLAGS"]  # a second call adds nothing


def test_a_flag_the_user_names_keeps_the_users_value():
  for user in ("--xla_cpu_a=7", "-xla_cpu_a=7", "--xla_cpu_a"):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": user}
    assert cpu_defaults.apply_cpu_flags(env) == f"{user} --xla_cpu_b=true"
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_b=false --xla_cpu_a=2"}
  assert cpu_defaults.merged_xla_flags(env) is None
  assert cpu_defaults.apply_cpu_flags(env) == "--xla_cpu_b=false --xla_cpu_a=2"


def test_the_switch_turns_them_off_or_replaces_them():
  for off in ("none", "off", "0"):
    env = {"JAX_PLATFORMS": "cpu", cpu_defaults.SWITCH: off}
    assert cpu_defaults.apply_cpu_flags(env) == "" and "XLA_FLAGS" not in env
  env = {"JAX_PLATFORMS": "cpu", cpu_defaults.SWITCH: "--xla_cpu_c=3 --xla_cpu_a=4", "XLA_FLAGS": "--xla_cpu_a=5"}
  assert cpu_defaults.apply_cpu_flags(env) == "--xla_cpu_a=5 --xla_cpu_c=3"
  assert cpu_defaults.chosen_flags({cpu_defaults.SWITCH: "default"}) == OURS
  with pytest.raises(ValueError, match=cpu_defaults.SWITCH):
    cpu_defaults.chosen_flags({cpu_defaults.SWITCH: "fast"})


def test_runs_that_may_use_an_accelerator_are_untouched():
  for platforms in ({}, {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"}):
    env = dict(platforms, XLA_FLAGS="--xla_dump_to=/tmp/x")
    assert cpu_defaults.merged_xla_flags(env) is None
    assert cpu_defaults.apply_cpu_flags(env) == "--xla_dump_to=/tmp/x"
  env = {}
  assert cpu_defaults.apply_cpu_flags(env, cpu_run=True) == "--xla_cpu_a=1 --xla_cpu_b=true"  # a CPU benchmark


def test_jaxlib_accepts_the_default_flags():
  """An unknown flag in XLA_FLAGS aborts the process when JAX starts, so the real defaults must parse."""
  flags = " ".join(REAL_DEFAULTS)
  code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda a: (a @ a).sum())(jnp.ones((8, 8)))))"
  out = subprocess.run([sys.executable, "-c", code], env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags,
                                                          "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "512.0", out.stderr[-2000:]
