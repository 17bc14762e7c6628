"""Stages as masks (what moves, what keeps optimizer buffers), LoRA, accumulation, remat / scan, bf16, and that
stage 2 can fit a small batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_util
from llava_jax.checkpoint import model_from_params
from llava_jax import lora as lora_lib


def moved(before: dict, after: dict, prefix: str) -> dict[str, bool]:
  return {n: not np.array_equal(before[n], after[n]) for n in before if n.startswith(prefix)}


def buffer_owners(opt_state) -> set[str]:
  """Top-level model parts (or "lora") that own a moment buffer in the optimizer state."""
  owners = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if "lora" in keys:
      owners.add("lora")
    elif "model" in keys:
      owners.add(keys[keys.index("model") + 1])
  return owners


STAGE_KW = {"optimizer.lr": 1e-2, "optimizer.projector_lr": 1e-2, "total_steps": 20}
STAGE_OVERRIDES = {"stage1": {}, "stage2": {}, "lora": {"lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.1}}


@pytest.fixture(scope="module")
def stage_runs():
  """Four steps of each stage from the same start: (trainer, final state, params before, params after)."""
  runs = {}
  for stage, overrides in STAGE_OVERRIDES.items():
    config = train_util.tiny_config(stage, **STAGE_KW, **overrides)
    trainer = train_util.make_trainer(config)
    state = trainer.init_state(train_util.initial_params())
    before = train_util.flat(state["params"])
    for batch in train_util.batches(config, 4):
      state, _ = trainer.step(state, batch)
    runs[stage] = (trainer, state, before, train_util.flat(state["params"]))
  return runs


def test_stage1_trains_only_the_projector(stage_runs):
  _, state, before, after = stage_runs["stage1"]
  assert not any(moved(before, after, "model.vision_tower").values())
  assert not any(moved(before, after, "model.language_model").values())
  assert not any(moved(before, after, "model.lm_head").values())
  assert all(moved(before, after, "model.multi_modal_projector").values())
  assert buffer_owners(state["opt_state"]) == {"multi_modal_projector"}
  n_buffers = len([x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0])
  assert n_buffers == 2 * len(moved(before, after, "model.multi_modal_projector"))  # mu and nu, nothing else


def test_stage2_trains_llm_and_projector_not_vision(stage_runs):
  _, state, before, after = stage_runs["stage2"]
  assert not any(moved(before, after, "model.vision_tower").values())
  assert all(moved(before, after, "model.language_model").values())
  assert all(moved(before, after, "model.lm_head").values())
  assert all(moved(before, after, "model.multi_modal_projector").values())
  assert buffer_owners(state["opt_state"]) == {"multi_modal_projector", "language_model", "lm_head"}


def test_lora_trains_adapters_and_projector_and_merges(stage_runs):
  trainer, state, before, after = stage_runs["lora"]
  assert not any(moved(before, after, "model.vision_tower").values())
  assert not any(moved(before, after, "model.language_model").values())
  assert not any(moved(before, after, "model.lm_head").values())
  assert all(moved(before, after, "model.multi_modal_projector").values())
  adapters = moved(before, after, "lora.")
  assert len(adapters) == 2 * 7 * 2 and all(adapters.values())  # A and B of 7 linears in each of 2 layers
  assert buffer_owners(state["opt_state"]) == {"multi_modal_projector", "lora"}

  # Merged kernels give what the base model with the adapters attached gives (no dropout at inference).
  cfg = trainer.model_cfg
  batch = train_util.batches(train_util.tiny_config("lora"), 1, batch_size=2)[0]
  inputs = [jnp.asarray(batch[k]) for k in ("input_ids", "pixel_values", "attention_mask", "image_mask")]

  @jax.jit
  def outputs(params, adapters, merged_params, ids, pixels, mask, image_mask):
    plain, with_adapters, merged = (model_from_params(cfg, p) for p in (params, params, merged_params))
    lora_lib.attach(with_adapters, adapters, trainer.lora.scale)
    return [m(ids, pixels, mask, image_mask=image_mask) for m in (plain, with_adapters, merged)]

  plain, expected, merged = map(np.asarray, outputs(state["params"]["model"], state["params"]["lora"],
                                                    trainer.export_params(state), *inputs))
  np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-5)
  assert np.abs(plain - expected).max() > 1e-3  # the adapters do change the output


def test_frozen_towers_cost_no_weight_gradients(stage_runs):
  """Stage 1's compiled step skips the LLM's weight gradients: far fewer FLOPs than stage 2's."""
  flops = {stage: run[0].flops_per_step for stage, run in stage_runs.items()}
  assert flops["stage1"] < 0.85 * flops["stage2"], flops


@pytest.fixture(scope="module")
def reference():
  config = train_util.tiny_config("stage2", **{"optimizer.lr": 1e-3, "total_steps": 10})
  batch_list = train_util.batches(config, 2)
  losses, state = train_util.run(train_util.make_trainer(config), batch_list)
  return batch_list, losses, train_util.flat(state["params"])


@pytest.mark.parametrize("knobs", [dict(grad_accum_steps=2), dict(remat="full"), dict(remat="dots_saveable"),
                                   dict(scan_layers=True), dict(scan_layers=True, remat="full")],
                         ids=["accum2", "remat_full", "remat_dots", "scan", "scan_remat"])
def test_memory_knobs_do_not_change_the_result(reference, knobs):
  batch_list, ref_losses, ref = reference
  config = train_util.tiny_config("stage2", **{"optimizer.lr": 1e-3, "total_steps": 10, **knobs})
  losses, state = train_util.run(train_util.make_trainer(config), batch_list)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  got = train_util.flat(state["params"])
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-3 * config.optimizer.lr, err_msg=name)


def test_bf16_compute_keeps_fp32_master_weights(reference):
  batch_list, ref_losses, _ = reference
  config = train_util.tiny_config("stage2", dtype="bfloat16", **{"optimizer.lr": 1e-3, "total_steps": 10})
  losses, state = train_util.run(train_util.make_trainer(config), batch_list)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)


def test_lora_dropout_with_scan_and_remat_matches_the_plain_loop(stage_runs):
  *_, ref = stage_runs["lora"]
  config = train_util.tiny_config("lora", **STAGE_KW, **STAGE_OVERRIDES["lora"], scan_layers=True, remat="full")
  _, state = train_util.run(train_util.make_trainer(config), train_util.batches(config, 4))
  got = train_util.flat(state["params"])
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-3 * config.optimizer.lr, err_msg=name)


def test_loss_is_the_mean_over_supervised_tokens_of_the_batch():
  from llava_jax.train.step import cross_entropy_sum

  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  labels = jnp.asarray([[-100, 1, 2, -100, -100], [-100, -100, -100, -100, 3]])
  total, count = cross_entropy_sum(logits, labels)
  logp = jax.nn.log_softmax(logits, -1)
  expected = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 3, 3])  # logits at t predict labels at t + 1
  assert int(count) == 3
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


@pytest.mark.parametrize("chunk", [16, 20])  # 48 positions: 3 pieces, or 3 with the last one padded
def test_chunked_loss_matches_the_whole_row(chunk):
  from llava_jax.train.step import chunked_cross_entropy_sum, cross_entropy_sum

  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(k1, (2, 48, 8))
  weight = jax.random.normal(k2, (8, 11))
  labels = jnp.where(jax.random.uniform(k3, (2, 48)) < 0.3, -100, jax.random.randint(k3, (2, 48), 0, 11))

  def loss(fn, hidden, weight):
    total, count = fn(hidden, weight)
    return total / count, count

  whole = lambda h, w: cross_entropy_sum(h @ w, labels)
  pieces = lambda h, w: chunked_cross_entropy_sum(h, lambda x: x @ w, labels, chunk)
  (ref, ref_count), ref_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(whole, hidden, weight)
  (got, got_count), got_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(pieces, hidden, weight)
  assert int(got_count) == int(ref_count) > 0
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  for g, r in zip(got_grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)


def test_position_pieces_train_like_whole_rows(stage_runs):
  *_, ref = stage_runs["stage2"]
  config = train_util.tiny_config("stage2", **STAGE_KW, **STAGE_OVERRIDES["stage2"], seq_chunk=20)
  _, state = train_util.run(train_util.make_trainer(config), train_util.batches(config, 4))
  got = train_util.flat(state["params"])
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-3 * config.optimizer.lr, err_msg=name)


def test_stage2_fits_a_small_fixed_batch():
  config = train_util.tiny_config("stage2", **{"optimizer.lr": 1e-3, "total_steps": 200, "batch_size": 4})
  trainer = train_util.make_trainer(config)
  batch = train_util.batches(config, 1)[0]
  state = trainer.init_state(train_util.initial_params())
  losses = []
  for _ in range(200):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


def test_params_reach_the_layer_of_their_path():
  """The step rebuilds the model from a params dict by path: layer 10 must not land on layer 2 (string order)."""
  import dataclasses

  from flax import nnx

  from llava_jax.models.llava import Llava
  from llava_jax.train import run_config

  config = train_util.tiny_config("stage2")
  cfg = run_config.model_config(config)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=12))
  trainer = train_util.Trainer(cfg, "stage2", run_config.optim_config(config), 10, train_util.mesh_of((1, 1, 1)))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llava(cfg)), nnx.Param))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  for i in range(12):
    params["language_model"]["layers"][i]["mlp"]["up_proj"]["kernel"][:] = i
  model = trainer.build_model(params)
  assert [float(model.language_model.layers[i].mlp.up_proj.kernel[...][0, 0]) for i in range(12)] == \
      list(range(12))


def test_make_trainer_runs_the_configs_attention_impl_and_rules(monkeypatch):
  """The helper builds the Trainer the loop builds: a config's attention_impl reaches the layers inside the step
  (they call that kernel), and its sharding rules reach the Trainer."""
  from llava_jax.models import attention
  from llava_jax.sharding import rules_from_config

  rules = tuple((name, None if name == "mlp" else axes) for name, axes in train_util.tiny_config().sharding_rules)
  config = train_util.tiny_config("stage2", attention_impl="blockwise", sharding_rules=rules)
  trainer = train_util.make_trainer(config)
  assert trainer.options.attention_impl == "blockwise"
  assert trainer.rules == rules_from_config(rules) != rules_from_config(train_util.tiny_config().sharding_rules)
  calls = []
  kernel = attention.blockwise_attention
  monkeypatch.setattr(attention, "blockwise_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  losses, _ = train_util.run(trainer, train_util.batches(config, 1))
  assert calls and np.isfinite(losses).all()
