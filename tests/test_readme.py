"""README.md: the two set-up commands come first and CI runs the second one exactly; every command marked
`# (tested)` runs as written."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def commands_in_bash_blocks(text: str) -> list[str]:
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  return [line.strip() for block in blocks for line in block.splitlines()
          if line.strip() and not line.strip().startswith("#")]


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
  first = commands_in_bash_blocks(readme())[:2]
  assert "llava-jax demo" in first[0] and "pytest" in first[1]
  assert readme().lstrip().startswith("# llava-jax\n\n```bash\n")
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert first[1] in ci


TESTED = [line for line in commands_in_bash_blocks(readme()) if line.endswith("# (tested)")]


def test_there_are_tested_commands():
  assert len(TESTED) >= 6


@pytest.mark.parametrize("line", TESTED, ids=[" ".join(shlex.split(line)[:3]) for line in TESTED])
def test_command_runs_as_written(line, tmp_path):
  argv = shlex.split(line.rsplit("#", 1)[0])
  if argv[0] == "llava-jax":
    argv = [sys.executable, "-m", "llava_jax.cli"] + argv[1:]
  elif argv[0] == "python":
    argv[0] = sys.executable
  # Outputs the command would write under runs/ go to a temporary directory instead.
  argv = [a.replace("runs/", str(tmp_path) + "/") for a in argv]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
