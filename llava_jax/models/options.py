"""How the model runs, as opposed to what it computes (`LlavaConfig`): one frozen dataclass the model holds.

Every option leaves the parameter values and (up to float rounding) the results unchanged, so one checkpoint serves
generation (defaults) and training (scan, remat, pinned activations, fp32 logits) alike. `scan_layers` also stacks
the layer weights ([layers, ...], `models/stack.py`); `llava_jax.tree.relayout` converts params between the forms.
The model and each of its layers hold the options and read what they need where they use it; this is the one place
that checks them (the run config's keys of the same names are translated by `train/run_config.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llava_jax.models.attention import IMPLS as ATTENTION_IMPLS  # what each is: models/attention.py

REMAT_POLICY_NAMES = ("none", "full", "dots_saveable")


class OptionValueError(ValueError):
  """An option's value that cannot work; `field` names the option (and the run config's key of that name)."""

  def __init__(self, field: str, value, what: str):
    super().__init__(f"{field}={value!r} {what}")
    self.field = field


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  attention_impl: str = "xla"        # models/attention.py
  scan_layers: bool = False          # layer weights stacked, lax.scan over them (one compiled layer instead of N)
  remat: str = "none"                # the layer stacks' rematerialisation policy, decoder and vision tower alike
  logits_dtype: str | None = None    # None: the compute dtype; training uses float32 for the softmax
  # A jax Sharding of the [batch, length, features] hidden state, pinned at every layer boundary: without it
  # XLA may trade the batch split for the FSDP split of the weights (both on the fsdp axis) and keep whole-batch
  # activations on every device.
  activation_sharding: Any = None
  # Positions per piece of the MLP (and, in training, of the lm_head + loss), each piece recomputed in the backward
  # pass: their [B, T, intermediate] and [B, T, vocab] buffers are a step's widest (0: whole rows).
  seq_chunk: int = 0

  def __post_init__(self):
    if self.attention_impl not in ATTENTION_IMPLS:
      raise OptionValueError("attention_impl", self.attention_impl, f"is not one of {ATTENTION_IMPLS}")
    if self.remat not in REMAT_POLICY_NAMES:
      raise OptionValueError("remat", self.remat, f"is not one of {REMAT_POLICY_NAMES}")
    if self.seq_chunk < 0:
      raise OptionValueError("seq_chunk", self.seq_chunk, "is negative: use 0 (whole rows) or a positive number "
                             "of positions")

  def replace(self, **changes) -> "ModelOptions":
    return dataclasses.replace(self, **changes)


def options_with(options: ModelOptions | None = None, **knobs) -> ModelOptions:
  """`options` (default: the defaults) with the knobs given one by one (the older keyword arguments of the loaders
  and the Trainer; None: not given) applied on top."""
  options = ModelOptions() if options is None else options
  given = {k: v for k, v in knobs.items() if v is not None}
  return options.replace(**given) if given else options
