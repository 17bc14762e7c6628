"""The benchmark scripts start and their smallest settings run (their numbers are not checked: performance is
measured by running them, see docs/PERFORMANCE.md)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import flops  # noqa: E402  (benchmarks/flops.py)


def _run(*args, timeout=120):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the scripts set their own device counts
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env=env, check=True).stdout


@pytest.mark.parametrize("script", ["compare_torch.py", "aot_scale.py", "data_pipeline.py"])
def test_help(script):
  assert "usage" in _run(os.path.join(BENCH, script), "--help")


def test_aot_scale_tiny_compiles_and_prints_tables():
  out = _run(os.path.join(BENCH, "aot_scale.py"), "--sizes", "tiny", "--devices", "8", "--stages", "stage2",
             "--flops-on", "none")
  rows = [line for line in out.splitlines() if line.startswith("| tiny | stage2 | 8 |")]
  assert len(rows) == 2, out  # the memory table and the FLOP table


def test_train_flops_follow_the_stage():
  from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
  cfg = LlavaConfig(vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=56, patch_size=14),
                    text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16))
  fwd = flops.forward(cfg, 2, 64, 2)
  s1, s2 = (flops.train_step(cfg, s, 2, 64, 2) for s in ("stage1", "stage2"))
  lora = flops.train_step(cfg, "lora", 2, 64, 2, lora_r=4)
  assert s1.vision == s2.vision == fwd.vision  # frozen tower: forward only
  assert s2.llm == pytest.approx(3 * fwd.llm) and s1.llm == pytest.approx(2 * fwd.llm)
  assert s1.llm < lora.llm < s2.llm
  hardware = flops.train_step(cfg, "stage2", 2, 64, 2, remat=True, hardware=True)
  assert hardware.total > s2.total
