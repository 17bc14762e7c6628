"""The notebooks run top to bottom on the tiny configuration (offline mode), and are stored with outputs cleared.

Each notebook is copied to a temporary directory and executed there by nbclient in a kernel on this Python (the
venv's ipykernel), with LLAVA_JAX_OFFLINE=1 and one CPU device for JAX.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TIMEOUT_S = 600  # per cell; each notebook takes about a minute on 2 CPU cores

# Lines each notebook must print (regular expressions, searched in the text of all its outputs).
EXPECTED = {
    "inference_demo": [
        r"llava-jax is installed",
        r"mode: tiny local checkpoint \(set by LLAVA_JAX_OFFLINE\)",
        r"wrote a tiny random CLIP to .* and a tiny random LLaMA to ",
        r"converted to .*ckpt",
        r"loaded in [\d.]+s: LLaMA \d+ x \d+ .* on cpu",
        r"USER: What is shown in this image\?\nASSISTANT: ",
        r"USER: What colour is the house, and what is above it\?\nASSISTANT: ",
        r"inference demo: done \(2 turns\)",
    ],
    "finetune_demo": [
        r"llava-jax is installed",
        r"base model: vocabulary \d+ with <image> = \d+, 16 image tokens",
        r"64 training and 8 held-out samples",
        r"started from .*base_ckpt; stage lora",
        r"loss: [\d.]+ \(first 10 steps\) -> [\d.]+ \(last 10\)",
        r"held-out accuracy: \d/8",
        r"max \|logits difference\| llava-jax vs transformers: [\d.]+e[-+]\d+",
        r"reloaded .*finetuned_ckpt: parameters identical: True; same answers: True",
        r"finetune demo: done",
    ],
}


def kernel_env() -> dict:
  """This process's environment for the kernel: offline/tiny mode, the checkout importable, one JAX device (the
  test session's conftest asks for 8 fake ones)."""
  env = dict(os.environ)
  env["LLAVA_JAX_OFFLINE"] = "1"
  env["HF_HUB_OFFLINE"] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env.pop("LLAVA_JAX_CKPT", None)
  return env


def outputs_text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        parts.append(out.get("text", ""))
      elif out.get("output_type") in ("execute_result", "display_data"):
        parts.append(out.get("data", {}).get("text/plain", ""))
      elif out.get("output_type") == "error":
        parts.append("\n".join(out.get("traceback", [])))
  return "".join(parts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stored_with_outputs_cleared(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_runs_top_to_bottom(name, tmp_path):
  path = tmp_path / f"{name}.ipynb"
  shutil.copy(os.path.join(NOTEBOOKS, f"{name}.ipynb"), path)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  t0 = time.perf_counter()
  try:
    client.execute(env=kernel_env())
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name} failed:\n{e}")
  elapsed = time.perf_counter() - t0
  text = outputs_text(nb)
  missing = [p for p in EXPECTED[name] if not re.search(p, text)]
  assert not missing, f"{name} did not print {missing}; its output:\n{text}"
  print(f"{name}: ran in {elapsed:.0f}s")
