"""The training loop: config -> mesh, trainer, data, checkpoints; steps with metrics, checkpoint cadence and
preemption.

`train(config, workdir)` resumes from the latest checkpoint in WORKDIR if there is one (params, optimizer state,
step and data position), else starts at step 0 from `config.init_checkpoint` (a `llava-jax convert` directory) or
from a freshly initialised `config.model`. SIGTERM (TPU VM preemption) or SIGINT finishes the current step, saves,
and exits with status 143 / 130 once the save is complete; start the same command again to continue. Failure
behaviours and exit codes: docs/FAILURES.md.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from llava_jax import checkpoint_files
from llava_jax.checkpoint import restore_params
from llava_jax.sharding import make_mesh, rules_from_config
from llava_jax.train import batches, checkpointing
from llava_jax.train.metrics import (MetricLogger, NonfiniteGuard, NonfiniteLossError, host_value,
                                     peak_flops_per_device)
from llava_jax.train.preemption import Preemption
from llava_jax.train.run_config import (check_config, lora_config, maybe_initialize_distributed, model_config,
                                        model_options, optim_config)
from llava_jax.train.step import Trainer


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the run `config` describes in `workdir`. Returns a summary dict (its "exit_code": 0, or
  143 / 130 after a SIGTERM / SIGINT whose save completed).

  Raises ConfigValueError / CheckpointError / the data pipeline's errors (the CLI: exit 2) and NonfiniteLossError
  (exit 3); a workdir whose model config differs from this run's is refused before anything is written."""
  maybe_initialize_distributed(config.distributed)
  workdir = os.path.abspath(workdir)
  mesh_shape = check_config(config, jax.device_count(), jax.process_count())
  cfg = model_config(config)
  checkpointing.check_workdir(workdir, cfg)  # before anything is written
  mesh = make_mesh(mesh_shape)
  rules = rules_from_config(config.sharding_rules)
  lora = lora_config(config)
  trainer = Trainer(cfg, config.stage, optim_config(config), config.total_steps, mesh, rules,
                    options=model_options(config), grad_accum_steps=config.grad_accum_steps, lora=lora,
                    seed=config.seed)
  assets = checkpoint_files.assets_dir(workdir) or (
      checkpoint_files.assets_dir(config.init_checkpoint) if config.init_checkpoint else None)
  data = batches.make_iterator(config.data, cfg, config.batch_size // jax.process_count(), seed=config.seed,
                               assets_dir=assets)
  try:
    return _run(config, workdir, cfg, trainer, data, lora, mesh, mesh_shape)
  finally:
    if hasattr(data, "log_summary"):
      data.log_summary()  # skipped samples per reason, whatever ended the run
    if hasattr(data, "close"):
      data.close()  # the pipeline's worker processes


def _run(config, workdir, cfg, trainer, data, lora, mesh, mesh_shape) -> dict:
  is_main = jax.process_index() == 0
  manager = checkpointing.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                       config.checkpoint.async_save)
  try:
    meta = checkpointing.run_meta(config.stage, lora)
    skipped: list[tuple[int, str]] = []
    state = checkpointing.restore(manager, trainer.abstract_state, data, meta, skipped, cfg.layer_counts)
    moved = checkpointing.set_aside(manager, [s for s, _ in skipped]) if skipped and is_main else []
    if state is not None:
      how = f"resumed from {manager.directory} at step {host_value(state['step'])}"
    elif config.init_checkpoint:
      params = restore_params(config.init_checkpoint, cfg, trainer.state_shardings["params"]["model"])
      state, how = trainer.init_state(params), f"started from {config.init_checkpoint}"
    else:
      state, how = trainer.init_state(), "started from freshly initialised weights"
    if is_main:  # only now: a failed restore leaves the workdir as it was
      checkpointing.write_run_files(workdir, cfg, config.to_json_best_effort(indent=2), config.init_checkpoint)
    start = int(host_value(state["step"]))
    guard = NonfiniteGuard(config.nonfinite.max_consecutive)
    logger = MetricLogger(workdir, start, config.total_steps, every=config.log.every_steps,
                          progress=config.log.progress, tensorboard=config.log.tensorboard,
                          flops_fn=lambda: trainer.flops_per_step,
                          peak_flops=peak_flops_per_device(config.log.peak_tflops), enabled=is_main,
                          observers=[guard], extra_fn=getattr(data, "skip_summary", None))
    guard.write = logger.write
    try:
      for (step, why), where in zip(skipped, moved + [""] * len(skipped)):
        logger.write(f"checkpoint step {step} does not restore ({why}); " +
                     (f"moved to {where}" if where else "left in place"))
      logger.write(f"{how}; stage {config.stage}, mesh {dict(zip(mesh.axis_names, mesh_shape))}, "
                   f"global batch {config.batch_size} x {config.grad_accum_steps} accumulation, "
                   f"{config.total_steps} steps")
      if start >= config.total_steps:
        logger.write(f"nothing to do: step {start} >= total_steps {config.total_steps}")
      step, state, preemption = _steps(config, trainer, data, manager, meta, logger, state, start)
    finally:
      logger.close()
  finally:
    manager.close()
  preempted = preemption.flag and step < config.total_steps  # a finished run is done, whenever the signal came
  if preempted:
    logger.write(f"preempted: saved step {step} in {manager.directory}; run the same command to resume")
  losses = [r["loss"] for r in logger.history]
  return {"start_step": start, "step": step, "preempted": preempted,
          "exit_code": preemption.exit_code if preempted else 0, "nonfinite_steps": guard.total,
          "losses": losses, "final_loss": losses[-1] if losses else float("nan"), "trainer": trainer,
          "state": state, "step_time": float(np.median([r["step_time"] for r in logger.history[1:]]))
          if len(losses) > 1 else None}


def _steps(config, trainer, data, manager, meta, logger, state, start):
  """The steps from `start`, saving on schedule, at the end and on SIGTERM / SIGINT; returns (step, state,
  preemption). Signals stay handled until every save has finished: a second one cannot cut a save short."""
  step = start
  stop_data = [data.request_stop] if hasattr(data, "request_stop") else []
  with Preemption(manager, on_signal=stop_data) as preemption:
    try:
      while step < config.total_steps:
        try:
          batch = next(data)
        except Exception as e:  # pylint: disable=broad-except
          if type(e).__name__ == "DataInterrupted" and preemption.flag:
            _save(trainer, manager, step, state, data.get_state(), meta, logger)  # the skips read so far count
            break
          raise
        data_state = data.get_state()
        state, metrics = trainer.step(state, batch)
        step += 1
        compile_seconds = 0.0
        if step == start + 1 and trainer.compile_seconds is not None:
          compile_seconds = trainer.compile_seconds
          logger.write(f"compiled the train step in {compile_seconds:.1f}s")
        logger.push(step, metrics, compile_seconds)
        preempted = preemption.reached(step)
        if preempted or step == config.total_steps or manager.should_save(step):
          _save(trainer, manager, step, state, data_state, meta, logger)
        if preempted:
          break
      logger.flush()
    finally:
      manager.wait_until_finished()  # inside the handlers: a second signal cannot abort the save
  return step, state, preemption


def _save(trainer, manager, step, state, data_state, meta, logger) -> None:
  """Saves `state` (after `step` steps) unless that step is saved already; never a non-finite one."""
  logger.flush()  # this step's time (and its non-finite check) before the save's
  if manager.latest_step() == step:
    return
  if not trainer.params_finite(state):
    raise NonfiniteLossError(f"the parameters at step {step} are not finite; not saving them (the checkpoints "
                             f"in {manager.directory} are the last good ones)")
  t0 = time.perf_counter()
  checkpointing.save(manager, step, state, data_state, meta, force=True)
  logger.skip(time.perf_counter() - t0)
