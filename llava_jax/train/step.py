"""The loss and the jitted, sharded train step.

The train state is a plain pytree, `{"step": int32, "params": {"model": ..., "lora": ...}, "opt_state": ...}`,
with `params["model"]` the model's nested params dict (`nnx.to_pure_dict`): with scanned layers each layer stack is
one [layers, ...] array per weight, stacked once when the state is made (`tree.relayout`), else one subtree per
layer (int keys). Inside the
step the model is rebuilt with `nnx.merge` (and LoRA adapters attached); gradients are taken only with respect to
the trainable leaves of the stage, so frozen towers cost no weight gradients and keep no optimizer buffers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax import lora as lora_lib
from llava_jax.config import IGNORE_INDEX, LlavaConfig
from llava_jax.models.layers import over_position_pieces
from llava_jax.models.llava import Llava
from llava_jax.models.options import ModelOptions, options_with
from llava_jax.lora import LoraConfig
from llava_jax.sharding import DEFAULT_RULES, batch_sharding, logical_axes_tree, param_shardings, shard_batch
from llava_jax.tree import get_path, is_stacked, relayout
from llava_jax.train.optim import FROZEN, OptimConfig, group_labels, make_optimizer
from llava_jax.train.recipes import optim_groups

# LLaVA-NeXT batches add `image_feature_rows` (host-computed tile-feature rows: data/pipeline.py's contract),
# OneVision's their taps ([B, L, 4]) and `image_feature_weights` beside them, and with videos (data.max_frames)
# `pixel_values_videos` [B, F, H, W, 3] with `video_feature_rows` / `video_feature_weights` [B, L, 4].
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_mask", "segment_ids", "positions",
              "image_feature_rows", "image_feature_weights", "pixel_values_videos", "video_feature_rows",
              "video_feature_weights")


def next_token_targets(labels):
  """The label each position predicts: `labels` sit at the inputs' positions (HF's convention), so logits at t
  predict labels at t + 1; the last position predicts nothing (IGNORE_INDEX)."""
  return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def _cross_entropy_on_targets(logits, targets):
  """(sum of -log p(target), count) over positions whose target is not IGNORE_INDEX, in fp32.

  The target logit is picked by comparing with the vocabulary index, not by `take_along_axis`, whose gradient is a
  scatter into a fresh [B, T, vocab] buffer; the comparison fuses into the softmax's gradient."""
  logits = logits.astype(jnp.float32)
  mask = targets != IGNORE_INDEX
  log_z = jax.nn.logsumexp(logits, axis=-1)
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  return jnp.sum(jnp.where(mask, log_z - picked, 0.0)), jnp.sum(mask, dtype=jnp.int32)


def cross_entropy_sum(logits, labels):
  """Next-token cross-entropy summed over supervised positions, and their count (fp32 whatever the logits' dtype).
  The labels are shifted, not the logits: slicing [B, T, vocab] costs a copy forward and a padded copy backward."""
  return _cross_entropy_on_targets(logits, next_token_targets(labels))


def chunked_cross_entropy_sum(hidden, head, labels, chunk: int):
  """`cross_entropy_sum(head(hidden), labels)` with the head and the loss applied `chunk` positions at a time,
  each chunk's logits recomputed in the backward pass: the fp32 [B, T, vocab] logits and their gradient (2 GB per
  chip at 7B, 4 rows of 2048) never exist, for one more forward of the head (+1/3 of its FLOPs). `chunk` 0 (or
  >= T): one piece, nothing recomputed."""
  targets = next_token_targets(labels)
  if not 0 < chunk < hidden.shape[1]:
    return _cross_entropy_on_targets(head(hidden), targets)
  ce, count = over_position_pieces(lambda h, tg: _cross_entropy_on_targets(head(h), tg), (hidden, targets), chunk,
                                   (0, IGNORE_INDEX))
  return ce.sum(), count.sum()


def count_supervised(labels):
  return jnp.sum(labels[:, 1:] != IGNORE_INDEX, dtype=jnp.int32)


def all_finite(tree):
  """A scalar bool: every element of every leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def step_feature_rows(rows, pixel_values, model_cfg: LlavaConfig, host_rows: int):
  """LLaVA-NeXT `image_feature_rows` [B, T] (OneVision's [B, T, taps]) as the step's model takes them
  (`images_by_row`): each host's pipeline numbers its block of `host_rows` rows from 0; the model's image layout
  renumbers them within each row (`ImageLayout.row_local_rows`), a row's tile slots (images x tiles) read from
  pixel_values. OneVision's weights need no renumbering."""
  from llava_jax.models.llava import image_layout  # pylint: disable=import-outside-toplevel

  tiles_per_row = pixel_values.size // rows.shape[0] // math.prod(pixel_values.shape[-3:])
  return image_layout(model_cfg).row_local_rows(rows, tiles_per_row, host_rows, xp=jnp)


def partition(tree, labels):
  """(trainable, frozen): two trees like `tree`, each with None where the other has the leaf."""
  trainable = jax.tree.map(lambda x, l: None if l == FROZEN else x, tree, labels)
  frozen = jax.tree.map(lambda x, l: x if l == FROZEN else None, tree, labels)
  return trainable, frozen


def combine(a, b):
  """Inverse of `partition`."""
  return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


class Trainer:
  """Everything static about a run: model graph, stage labels, optimizer, shardings, the jitted step.

  `init_state` places a fresh state on the mesh; `step(state, batch)` takes a host-local numpy batch (this host's
  rows) and returns the new state and metrics (replicated scalars).

  `options` say how the model runs (attention, scan, remat, seq_chunk; `train/run_config.py:model_options` makes
  them from a run config); the Trainer adds fp32 logits and the batch-split hidden state where they are unset.
  `remat`, `scan_layers`, `attention_impl` and `seq_chunk` are the older spelling of those options.
  """

  def __init__(self, model_cfg: LlavaConfig, stage: str, optim: OptimConfig, total_steps: int,
               mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, *, options: ModelOptions | None = None,
               grad_accum_steps: int = 1, lora: LoraConfig | None = None, seed: int = 0,
               remat: str | None = None, scan_layers: bool | None = None, attention_impl: str | None = None,
               seq_chunk: int | None = None):
    self.model_cfg, self.stage, self.mesh, self.rules = model_cfg, stage, mesh, rules
    options = options_with(options, remat=remat, scan_layers=scan_layers, attention_impl=attention_impl,
                           seq_chunk=seq_chunk)
    # Logits (and so the softmax) in fp32 under bf16 compute; hidden states pinned to the batch split.
    pinned = options.activation_sharding
    self.options = options.replace(logits_dtype=options.logits_dtype or "float32",
                                   activation_sharding=batch_sharding(mesh, 3, rules) if pinned is None else pinned)
    self.stacked = self.options.scan_layers  # the layer form of the state's params (models/stack.py)
    self.grad_accum_steps, self.seed = grad_accum_steps, seed
    self.lora = (lora or LoraConfig()) if stage == "lora" else None

    model = nnx.eval_shape(lambda: Llava(model_cfg, options=self.options))
    self.graphdef, abstract = nnx.split(model, nnx.Param)
    self._abstract_vars = list(nnx.to_flat_state(abstract))
    abstract_model = nnx.to_pure_dict(abstract)
    model_shardings = nnx.to_pure_dict(param_shardings(abstract, mesh, rules))
    lora_abstract, lora_shardings = {}, {}
    if self.lora is not None:
      lora_abstract = jax.eval_shape(lambda: lora_lib.init(abstract_model, self.lora.r, jax.random.key(0),
                                                           jnp.dtype(model_cfg.param_dtype)))
      kernel_axes = logical_axes_tree(abstract)
      lora_shardings = lora_lib.shardings(lora_abstract, kernel_axes, mesh, rules)

    params_abstract = {"model": abstract_model, "lora": lora_abstract}
    self.groups = optim_groups(optim, stage)  # optim.groups, else the stage's (recipes.STAGE_GROUPS)
    self.labels = group_labels(params_abstract, self.groups)
    self.tx, self.lr_schedule = make_optimizer(optim, self.groups, self.labels, total_steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = {"model": model_shardings, "lora": lora_shardings}
    opt_abstract = jax.eval_shape(self.tx.init, params_abstract)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen leaves' (absent) buffers
    opt_sh = optax.tree_utils.tree_map_params(self.tx, lambda v, s: v if masked(v) else s, opt_abstract, param_sh,
                                              transform_non_params=lambda _: replicated, is_leaf=masked)
    self.state_shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_abstract,
                      "opt_state": opt_abstract}
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_state, self.state_shardings)
    self._compiled: dict[Any, Any] = {}
    self.flops_per_step: float | None = None
    self.compile_seconds: float | None = None
    self._all_finite = None

  # -- state -------------------------------------------------------------------------------------------------

  def init_state(self, model_params: dict | None = None):
    """A step-0 state on the mesh: from `model_params` (nested dict, layers in either form) or freshly
    initialised (the same weights whatever the form)."""
    dtype = jnp.dtype(self.model_cfg.param_dtype)

    def init(model_params):
      if model_params is None:
        model = Llava(self.model_cfg, rngs=nnx.Rngs(self.seed), options=ModelOptions(scan_layers=self.stacked))
        model_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      model_params = jax.tree.map(lambda x: x.astype(dtype), relayout(model_params, self.stacked))
      adapters = ({} if self.lora is None else
                  lora_lib.init(model_params, self.lora.r, jax.random.key(self.seed + 1), dtype))
      params = {"model": model_params, "lora": adapters}
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    with jax.set_mesh(self.mesh):
      if model_params is None:
        return jax.jit(lambda: init(None), out_shardings=self.state_shardings)()
      given_form = is_stacked(model_params)
      shardings = self.state_shardings["params"]["model"]
      if given_form is not None:
        shardings = relayout(shardings, given_form, self.model_cfg.layer_counts)
      model_params = jax.device_put(model_params, shardings)
      return jax.jit(init, out_shardings=self.state_shardings)(model_params)

  def export_params(self, state) -> dict:
    """The model's params with LoRA merged in, one subtree per layer (what a checkpoint for inference holds)."""
    params = state["params"]
    if self.lora is not None and params["lora"]:
      return relayout(lora_lib.merge(params["model"], params["lora"], self.lora.scale), stacked=False)
    return relayout(params["model"], stacked=False)

  # -- the step ----------------------------------------------------------------------------------------------

  def build_model(self, model_params: dict) -> Llava:
    """The model around a params dict, matched by path (inside the step; the graph carries the run's knobs)."""
    model_params = relayout(model_params, self.stacked)
    state = nnx.from_flat_state([(path, var.replace(get_path(model_params, path)))
                                 for path, var in self._abstract_vars])
    return nnx.merge(self.graphdef, state)

  def _loss_sum(self, params, batch, key):
    model = self.build_model(params["model"])
    if self.lora is not None:
      lora_lib.attach(model, params["lora"], self.lora.scale, self.lora.dropout, key)
    hidden = model(batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"],
                   image_mask=batch.get("image_mask"), positions=batch.get("positions"),
                   segment_ids=batch.get("segment_ids"), image_feature_rows=batch.get("image_feature_rows"),
                   image_feature_weights=batch.get("image_feature_weights"),
                   pixel_values_videos=batch.get("pixel_values_videos"),
                   video_feature_rows=batch.get("video_feature_rows"),
                   video_feature_weights=batch.get("video_feature_weights"),
                   head=False, images_by_row=True)  # check_batch: pixel_values[b] are row b's image slots
    return chunked_cross_entropy_sum(hidden, model.logits_from_hidden, batch["labels"], self.options.seq_chunk)

  def _train_step(self, state, batch, batch_shardings):
    params = state["params"]
    trainable, frozen = partition(params, self.labels)
    frozen_const = jax.lax.stop_gradient(frozen)  # the vision tower (and any frozen LLM) under stop_gradient
    step_key = jax.random.fold_in(jax.random.key(self.seed + 2), state["step"])
    total = count_supervised(batch["labels"])
    denom = jnp.maximum(total, 1).astype(jnp.float32)  # mean over the global batch's supervised tokens

    def loss_fn(trainable, micro, key):
      ce_sum, _ = self._loss_sum(combine(trainable, frozen_const), micro, key)
      return ce_sum / denom

    grad_fn = jax.value_and_grad(loss_fn)
    n = self.grad_accum_steps
    if "image_feature_rows" in batch:  # host-local slot numbers -> counted within each row
      host_rows = batch["input_ids"].shape[0] // jax.process_count()
      batch = dict(batch, image_feature_rows=step_feature_rows(
          batch["image_feature_rows"], batch["pixel_values"], self.model_cfg, host_rows))
    if "video_feature_rows" in batch:  # the same for each row's video slot of F frame tiles
      host_rows = batch["input_ids"].shape[0] // jax.process_count()
      batch = dict(batch, video_feature_rows=step_feature_rows(
          batch["video_feature_rows"], batch["pixel_values_videos"], self.model_cfg, host_rows))
    if n == 1:
      loss, grads = grad_fn(trainable, batch, step_key)
    else:
      # Micro-batch k holds rows k, k + n, ...: every micro-batch stays spread over all batch shards.
      micro = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0), batch)

      def body(carry, xs):
        grads_acc, loss_acc = carry
        mb, i = xs
        mb = jax.lax.with_sharding_constraint(mb, batch_shardings)
        loss, grads = grad_fn(trainable, mb, jax.random.fold_in(step_key, i))
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(n)))

    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update: params and optimizer state (its count too, as
    # optax.apply_if_finite) stay as they were, the step still advances, and the loop counts it. A branch, not a
    # select of new against old: the update then runs in place in the donated buffers (docs/PERFORMANCE.md).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(trainable_and_opt_state):
      trainable, opt_state = trainable_and_opt_state
      full_grads = combine(grads, jax.tree.map(jnp.zeros_like, frozen))
      updates, opt_state = self.tx.update(full_grads, opt_state, combine(trainable, frozen))
      return optax.apply_updates(trainable, partition(updates, self.labels)[0]), opt_state

    new_trainable, opt_state = jax.lax.cond(finite, update, lambda unchanged: unchanged,
                                            (trainable, state["opt_state"]))
    new_state = {"step": state["step"] + 1, "params": combine(new_trainable, frozen), "opt_state": opt_state}
    metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": total,
               "lr": jnp.asarray(self.lr_schedule(state["step"]), jnp.float32),
               "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
    return new_state, metrics

  def params_finite(self, state) -> bool:
    """Whether every parameter of `state` is finite (checked before a checkpoint is written)."""
    if self._all_finite is None:
      self._all_finite = jax.jit(all_finite)
    with jax.set_mesh(self.mesh):
      return bool(self._all_finite(state["params"]).addressable_data(0))

  def check_batch(self, batch: dict) -> None:
    missing = [k for k in ("input_ids", "labels", "attention_mask") if k not in batch]
    if missing:
      raise ValueError(f"batch lacks {missing}")
    rows = batch["input_ids"].shape[0]
    if "pixel_values" in batch and batch["pixel_values"].shape[0] != rows:
      raise ValueError(f"pixel_values has {batch['pixel_values'].shape[0]} images for {rows} rows; the train step "
                       "needs one image slot per row ([B, H, W, 3] with image_mask [B]) or [B, M, H, W, 3]")
    if "pixel_values_videos" in batch and batch["pixel_values_videos"].shape[0] != rows:
      raise ValueError(f"pixel_values_videos has {batch['pixel_values_videos'].shape[0]} videos for {rows} rows; the "
                       "train step needs one video slot per row ([B, F, H, W, 3], zero frames where none)")

  def compile(self, state, batch: dict):
    """The compiled step for this batch layout (AOT, so its FLOP count is known for the MFU estimate)."""
    key = tuple((k, batch[k].shape, str(batch[k].dtype)) for k in sorted(batch))
    if key not in self._compiled:
      batch_sh = {k: batch_sharding(self.mesh, batch[k].ndim, self.rules) for k in batch}
      replicated = NamedSharding(self.mesh, PartitionSpec())
      fn = jax.jit(lambda s, b: self._train_step(s, b, batch_sh), in_shardings=(self.state_shardings, batch_sh),
                   out_shardings=(self.state_shardings, replicated), donate_argnums=0)
      t0 = time.perf_counter()
      with jax.set_mesh(self.mesh):
        compiled = fn.lower(state, batch).compile()
      self.compile_seconds = time.perf_counter() - t0
      self.flops_per_step = _flops(compiled)
      self._compiled[key] = compiled
    return self._compiled[key]

  def step(self, state, host_batch: dict):
    """One optimizer step on this host's rows of the global batch (numpy); returns (state, metrics)."""
    host_batch = {k: v for k, v in host_batch.items() if k in BATCH_KEYS}
    self.check_batch(host_batch)
    batch = shard_batch(host_batch, self.mesh, self.rules)
    compiled = self.compile(state, batch)
    with jax.set_mesh(self.mesh):
      return compiled(state, batch)


def _flops(compiled) -> float | None:
  """FLOPs of one step per device, from XLA's cost analysis (None where the backend has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None
