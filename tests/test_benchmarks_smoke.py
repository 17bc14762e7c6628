"""The benchmark scripts start and their smallest settings run (their numbers are not checked: performance is
measured by running them, see docs/PERFORMANCE.md)."""

import dataclasses
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


@pytest.mark.parametrize("script", ["compare_torch.py", "aot_scale.py", "data_pipeline.py", "attention_speed.py",
                                    "serve_load.py"])
def test_help(script):
  assert "usage" in _run(os.path.join(BENCH, script), "--help")


def test_attention_speed_smallest_setting_prints_its_row():
  out = _run(os.path.join(BENCH, "attention_speed.py"), "--lengths", "40", "--heads", "2", "--head-dim", "8",
             "--repeats", "1")
  assert any(line.startswith("| 40 |") for line in out.splitlines()), out


def test_aot_scale_tiny_compiles_and_prints_tables():
  out = _run(os.path.join(BENCH, "aot_scale.py"), "--sizes", "tiny", "--devices", "8", "--stages", "stage2",
             "--flops-on", "none")
  rows = [line for line in out.splitlines() if line.startswith("| tiny | stage2 | 8 |")]
  assert len(rows) == 2, out  # the memory table and the FLOP table


def test_aot_scale_tiny_onevision_compiles_its_own_stages():
  """OneVision's batch ([B, L, 4] feature rows and weights, every tile slot) and stages; stage2 is not its."""
  out = _run(os.path.join(BENCH, "aot_scale.py"), "--sizes", "tiny-ov", "--devices", "8", "--stages", "stage2,si",
             "--flops-on", "none")
  assert len([line for line in out.splitlines() if line.startswith("| tiny-ov | si | 8 |")]) == 2, out
  assert "| tiny-ov | stage2 |" not in out, out


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
  si = flops.train_step(cfg, "si", 2, 64, 2, train_vision=True)  # OneVision: the LLM as stage 2, the tower too
  assert si.llm == s2.llm and si.vision == pytest.approx(3 * fwd.vision)
  splash = flops.train_step(cfg, "stage2", 2, 64, 2, hardware=True, causal_share=flops.causal_block_share(64, 16))
  assert splash.attention == pytest.approx(flops.train_step(cfg, "stage2", 2, 64, 2, hardware=True).attention * 5 / 8)
  siglip = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, model_type="siglip"))
  assert flops.forward(siglip, 2, 64, 2).vision < fwd.vision  # no CLS token


def _dot_flops_and_shapes(jaxpr, trips=1):
  """(2 x multiply-adds of every dot_general, scan bodies times their length; every produced shape)."""
  import numpy as np
  total, shapes = 0, set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      k = np.prod([eqn.invars[0].aval.shape[i] for i in contract])
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(k) * trips
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          f, s = _dot_flops_and_shapes(inner, trips * eqn.params.get("length", 1) if eqn.primitive.name == "scan"
                                       else trips)
          total, shapes = total + f, shapes | s
  return total, shapes


@pytest.mark.parametrize("remat", ["full", "none"])
def test_position_pieces_cost_what_flops_counts(remat):
  """`seq_chunk` as flops.py counts it (the head's forward once more; without remat the MLP's gate and up too),
  checked on the train step's jaxpr, and the point of it: no [B, T, intermediate] or [B, T, vocab] value."""
  import jax

  import train_util
  from llava_jax.train import run_config

  def step_jaxpr(chunk):
    config = train_util.tiny_config("stage2", seq_chunk=chunk, remat=remat, scan_layers=True,
                                    **{"model.text.num_hidden_layers": 3})
    trainer = train_util.make_trainer(config)
    batch = {k: v for k, v in train_util.batches(config, 1)[0].items()
             if k in ("input_ids", "labels", "attention_mask", "pixel_values", "image_mask")}
    step = lambda state, b: trainer._train_step(state, b, {k: None for k in b})  # pylint: disable=protected-access
    return run_config.model_config(config), batch["input_ids"].shape, jax.make_jaxpr(step)(trainer.abstract_state,
                                                                                              batch).jaxpr

  cfg, (rows, seq), whole = step_jaxpr(0)
  _, _, pieces = step_jaxpr(8)
  (whole_flops, whole_shapes), (piece_flops, piece_shapes) = map(_dot_flops_and_shapes, (whole, pieces))
  counted = lambda chunk: flops.train_step(cfg, "stage2", rows, seq, rows, remat=remat == "full", hardware=True,
                                           seq_chunk=chunk).llm
  assert piece_flops - whole_flops == counted(8) - counted(0) > 0
  wide = {(rows, seq, cfg.text.intermediate_size), (rows, seq, cfg.text.vocab_size)}
  assert wide <= whole_shapes and not wide & piece_shapes
