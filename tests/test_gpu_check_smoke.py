"""benchmarks/gpu_check.py in its CPU smoke mode: every section's code path runs, parity holds at the stated
tolerances, each timing row has both sides; and the budget and a failing section are reported, not hidden.
(Its numbers are not checked: performance is measured on a GPU, docs/PERFORMANCE.md.)"""

import json
import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402  (benchmarks/gpu_check.py; imports neither jax nor torch)


def test_smoke_runs_every_section_with_parity_in_tolerance(tmp_path):
  env = dict(os.environ)
  # Compiling dominates at these shapes: XLA:CPU's backend at -O0 halves the run (the same programs, unoptimised).
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p))
  proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--smoke", "--peak-tflops", "1",
                         "--peak-tbps", "0.01", "--out", str(tmp_path / "check")], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env=env, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "check.json").read_text())
  rows = result["rows"]
  assert result["failures"] == [] and result["checks_failed"] == []
  for key in ("parity fp32", "parity bf16", "greedy fp32", "attention xla"):
    assert rows[key]["ok"] is True, rows[key]
  assert rows["parity fp32"]["check"] == "<= 1e-04"
  assert rows["attention cudnn"]["reason"] == "skipped: no GPU (cuDNN is GPU only)"
  for key in ("attention xla", "stage2", "prefill", "decode b1", "decode b4"):
    assert rows[key]["ours_s"] > 0 and rows[key]["torch_s"] > 0, rows[key]
  table = (tmp_path / "check.md").read_text()
  lines = {line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")}
  for label in ("| parity fp32: logits, tiny model", "| stage-2 step, 7B-shaped, 2 layers, 1 x 64",
                "| greedy decode, batch 4, 24-token prompt, 4 new"):
    assert label in lines, table
  assert "% MFU" in table and "% of HBM bw" in table and table in proc.stdout


def _args(**kw):
  return types.SimpleNamespace(**{"sections": ["parity", "attention", "stage2", "inference"], "budget": 450.0,
                                  "smoke": False, "isolate": False, "attention": "auto", **kw})


def test_sections_past_the_budget_are_reported_skipped():
  shape = gpu_check.SHAPES["full"]
  table, notes, failures = gpu_check.run_jobs(_args(budget=30.0), shape)
  assert failures == [] and notes == []
  assert table["parity fp32"] == {"label": "parity fp32", "kind": "skip", "reason": "skipped: budget"}
  assert table["stage2"]["ours_note"] == table["stage2"]["torch_note"] == "skipped: budget"
  assert gpu_check.cells(table["decode b32"], 1e15, 1e12)[1:3] == ["skipped: budget", "skipped: budget"]


def test_a_failing_section_is_reported_and_the_others_still_run(monkeypatch):
  def broken(shape, args):
    raise RuntimeError("out of memory")

  def torch_side(shape, args):
    return {"rows": {"stage2": {"label": "stage2", "kind": "time", "torch_s": 2.0, "work": 1e15}}, "notes": []}

  monkeypatch.setitem(gpu_check.JOB_FNS, ("stage2", "jax"), broken)
  monkeypatch.setitem(gpu_check.JOB_FNS, ("stage2", "torch"), torch_side)
  args = _args(sections=["stage2"])
  table, _, failures = gpu_check.run_jobs(args, gpu_check.SHAPES["full"])
  assert args.attention == "xla"  # no attention check ran: the recipe's default
  assert failures == ["stage2 / jax: out of memory"]
  ours, torch_, speed, ours_pct, torch_pct = gpu_check.cells(table["stage2"], 1e15, 1e12)[1:6]
  assert ours == "failed: RuntimeError: out of memory" and torch_ == "2000.0 ms" and torch_pct == "50.0% MFU"
  assert speed == ours_pct == ""


def test_a_cudnn_failure_falls_back_to_xla_with_a_note():
  import gpu_check_jobs

  def attempt(impl):
    if impl == "cudnn":
      raise RuntimeError("cuDNN is not detected.")
    return impl

  assert gpu_check_jobs.with_xla_fallback(attempt, "xla", "row") == ("xla", [])
  result, notes = gpu_check_jobs.with_xla_fallback(attempt, "cudnn", "stage2")
  assert result == "xla"
  assert notes == ["stage2: cudnn attention failed (RuntimeError: cuDNN is not detected.); measured with xla instead"]


def test_the_checked_paths_need_no_grain_or_orbax():
  """What the GPU machine lacks stays unimported: the model (its image layout imports llava_jax.data), the train
  step and generation; `llava_jax.data`'s pipeline names still load on use."""
  code = ("import sys, llava_jax, llava_jax.train.step, llava_jax.decoding, llava_jax.data.layout\n"
          "print(sorted(m for m in ('grain', 'orbax', 'tensorboardX') if m in sys.modules))\n"
          "from llava_jax.data import make_iterator\n"
          "print(make_iterator.__module__)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       check=True, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")).stdout.split()
  assert out == ["[]", "llava_jax.data.pipeline"]
  assert gpu_check.missing_modules() == []


def test_carried_wheels_are_unpacked_onto_the_path(tmp_path, monkeypatch):
  import zipfile
  monkeypatch.setattr(sys, "path", list(sys.path))
  with zipfile.ZipFile(tmp_path / "carried_pkg-1.0-py3-none-any.whl", "w") as z:
    z.writestr("carried_pkg/__init__.py", "VALUE = 7\n")
  folders = gpu_check.use_wheels(str(tmp_path))
  assert folders == [str(tmp_path / ".unpacked" / "carried_pkg-1.0-py3-none-any")] and sys.path[0] == folders[0]
  assert gpu_check.use_wheels(str(tmp_path)) == folders  # unpacked once
  import carried_pkg  # pylint: disable=import-outside-toplevel
  assert carried_pkg.VALUE == 7
  sys.modules.pop("carried_pkg")


def test_a_missing_package_stops_the_check_before_anything_runs(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(gpu_check.NEEDED, "not_installed_anywhere", "some-wheel")
  assert gpu_check.main(["--smoke", "--wheels", str(tmp_path)]) == 2
  assert "missing: not_installed_anywhere (some-wheel)" in capsys.readouterr().err
