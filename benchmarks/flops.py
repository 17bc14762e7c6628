"""Analytic FLOP counts of LLaVA forward passes and train steps, shared by the benchmarks.

Only matrix multiplies are counted (2 FLOPs per multiply-add); norms, activations and the softmax are left out, as
in the usual MFU conventions. A train step costs, per parameter and token:

  2  forward, for every parameter that runs;
  2  backward to the activations (dL/dx), for every parameter the gradient has to flow through on its way to a
     trainable one: the whole language model and lm_head (the projector is trainable in every stage and sits
     before them), never the frozen vision tower, which runs under stop_gradient;
  2  backward to the weight (dL/dW), for trainable parameters only (stage 1: the projector; stage 2: projector,
     language model and lm_head; LoRA: projector and adapters; OneVision's si and ov: as stage 2, and the tower).

Hence 6 x trainable params x tokens + 4 x (frozen LLM params) x tokens + 2 x (vision tower params) x image tokens,
or 6 x (vision tower params) x image tokens where the tower trains (LLaVA-1.6's stage 2, OneVision's si and ov:
`train_vision`). The tower is CLIP's (a CLS token beside the patches) or SigLIP's (patches only, no CLS); the
decoder LLaMA's, Mistral's or Qwen2's (whose q/k/v biases are left out: a few thousand FLOPs per token).
Attention scores and the weighted sum (QK^T and PV) add 4 T^2 d per layer and sequence for a full T x T product;
a causal mask leaves half of it useful, and the backward pass costs twice the forward.

`model` FLOPs are the useful work (causal attention halved, no recomputation): the numerator of MFU. `hardware`
FLOPs are what the compiled program computes: the dense T x T attention our XLA path evaluates before masking,
and one more forward of each rematerialised decoder layer (but its last matmul). XLA's cost analysis should land
near the latter: it also counts elementwise work, one FLOP per element. A kernel that skips the key blocks a causal
mask hides (splash) computes `causal_block_share` of the T x T product instead (`causal_share`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Flops:
  """FLOPs of one call, split by part (global: all rows, all devices)."""

  vision: float = 0.0
  projector: float = 0.0
  llm: float = 0.0
  attention: float = 0.0

  @property
  def total(self) -> float:
    return self.vision + self.projector + self.llm + self.attention


def causal_block_share(seq: int, block: int) -> float:
  """The share of a T x T product that a causal kernel with square `block` tiles computes: the n (n + 1) / 2
  tiles on and below the diagonal of n x n, n = ceil(T / block)."""
  n = -(-seq // block)
  return (n + 1) / (2 * n)


def vision_matmul_params(vcfg, layers: int) -> int:
  d, f = vcfg.hidden_size, vcfg.intermediate_size
  patch = vcfg.patch_size ** 2 * vcfg.num_channels * d
  return patch + layers * (4 * d * d + 2 * d * f)


def projector_params(cfg) -> tuple[int, int]:
  d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
  d = cfg.text.hidden_size
  return (d_in * d, 0) if cfg.projector_type == "linear" else (d_in * d, d * d)


def llm_layer_params(tcfg) -> int:
  d, hd = tcfg.hidden_size, tcfg.head_dim
  attn = d * tcfg.num_attention_heads * hd * 2 + d * tcfg.num_key_value_heads * hd * 2
  return attn + 3 * d * tcfg.intermediate_size


def lora_params_per_layer(tcfg, r: int) -> int:
  """Adapters on every linear layer of a decoder layer (q, k, v, o, gate, up, down): r x (in + out) each."""
  d, hd, f = tcfg.hidden_size, tcfg.head_dim, tcfg.intermediate_size
  q, kv = tcfg.num_attention_heads * hd, tcfg.num_key_value_heads * hd
  shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
  return sum(r * (a + b) for a, b in shapes)


def vision_layers_run(cfg) -> int:
  """Layers the tower runs: up to the deepest feature layer (LLaVA: the second to last)."""
  n_states = cfg.vision.num_hidden_layers + 1
  return max(l % n_states for l in cfg.feature_layers)


def image_features(cfg, n_images: int) -> Flops:
  """Vision tower (the layers LLaVA needs; CLIP: patches and CLS, SigLIP: patches) + projector, forward."""
  v = cfg.vision
  layers = vision_layers_run(cfg)
  tokens = v.num_tokens
  p1, p2 = projector_params(cfg)
  vision = 2 * vision_matmul_params(v, layers) * tokens * n_images
  vision += layers * 4 * tokens ** 2 * v.hidden_size * n_images  # bidirectional: all of it is useful
  return Flops(vision=vision, projector=2 * (p1 + p2) * v.num_patches * n_images)


def forward(cfg, rows: int, seq: int, n_images: int, *, head_tokens: int | None = None,
            causal_half: bool = True, causal_share: float = 1.0) -> Flops:
  """A full forward: image features, every decoder layer on rows x seq tokens, lm_head on `head_tokens` per row
  (default: all). Attention: half the T x T product (`causal_half`), else `causal_share` of it."""
  t = cfg.text
  f = image_features(cfg, n_images)
  head = t.hidden_size * t.vocab_size
  f.llm = 2 * (t.num_hidden_layers * llm_layer_params(t) * seq + head * (seq if head_tokens is None else
                                                                           head_tokens)) * rows
  full = 4 * seq ** 2 * t.num_attention_heads * t.head_dim * t.num_hidden_layers * rows
  f.attention = full / 2 if causal_half else full * causal_share
  return f


def train_step(cfg, stage: str, rows: int, seq: int, n_images: int, *, lora_r: int = 0, remat: bool = False,
               hardware: bool = False, train_vision: bool = False, seq_chunk: int = 0,
               causal_share: float = 1.0) -> Flops:
  """One optimizer step on rows x seq tokens with n_images images (see the module docstring).

  hardware=False: model FLOPs (causal attention halved, no recomputation). hardware=True: dense attention and,
  with `remat`, one more forward of every decoder layer (attention and adapters included). `train_vision`
  (LLaVA-1.6's stage 2): the tower's layers run backward too, to the input (dx) and to the weights (dW), and with
  `remat` and hardware=True their forward once more. `seq_chunk` (ModelOptions.seq_chunk, hardware=True): each
  position piece of the head and the MLP is recomputed in the backward, so the head's forward runs once more, and
  without `remat` the MLP's gate and up projections too (under remat jax drops the layer's own recomputation of
  them instead, and down_proj's is dead code either way). `causal_share` (hardware=True): the share of the
  decoder's T x T attention product computed (1: dense; splash: `causal_block_share`). Stages si and ov
  (OneVision) train the LLM as stage 2 does; their tower trains with `train_vision`.
  """
  t = cfg.text
  f = forward(cfg, rows, seq, n_images, causal_half=not hardware, causal_share=causal_share)
  p1, p2 = projector_params(cfg)
  f.projector += (2 * (p1 + p2) + 2 * p2) * cfg.vision.num_patches * n_images  # dW of both, dx of linear_2
  layer = t.num_hidden_layers * llm_layer_params(t) * seq * rows
  head = t.hidden_size * t.vocab_size * seq * rows
  fwd_llm = f.llm
  f.llm += 2 * (layer + head)  # dL/dx through every LLM layer and the head
  if stage in ("stage2", "si", "ov"):
    f.llm += 2 * (layer + head)  # dL/dW
  elif stage == "lora":
    adapters = t.num_hidden_layers * lora_params_per_layer(t, lora_r) * seq * rows
    f.llm += 6 * adapters
    fwd_llm += 2 * adapters
  elif stage != "stage1":
    raise ValueError(f"unknown stage {stage!r}")
  if train_vision:
    fwd_vision = f.vision
    f.vision *= 3  # dx and dW of every layer run (matmuls), and attention's backward, each twice the forward
    f.projector += 2 * p1 * cfg.vision.num_patches * n_images  # dx of linear_1, into the tower
    if remat and hardware:
      f.vision += fwd_vision
  fwd_attention = f.attention
  f.attention *= 3  # forward + backward (twice the forward)
  if remat and hardware:
    # The layers' forward again, less the head (outside the remat) and down_proj, whose output the backward pass
    # never reads (XLA drops that recomputation as dead code).
    down = t.num_hidden_layers * t.hidden_size * t.intermediate_size * seq * rows
    f.llm += fwd_llm - 2 * head - 2 * down
    f.attention += fwd_attention
  if hardware and 0 < seq_chunk < seq:
    f.llm += 2 * head
    if not remat:
      f.llm += 2 * 2 * t.num_hidden_layers * t.hidden_size * t.intermediate_size * seq * rows  # gate and up
  return f


def decode_bytes(cfg, batch: int, context: float, bytes_per_value: int = 4) -> tuple[float, float]:
  """Bytes one greedy decode step must read: (weights, KV cache). The weights are every decoder matmul, the head
  and the norms (one row of the embedding table is negligible); the cache holds `context` positions per row."""
  t = cfg.text
  weights = (t.num_hidden_layers * (llm_layer_params(t) + 2 * t.hidden_size) + t.hidden_size * t.vocab_size
             + t.hidden_size) * bytes_per_value
  kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context * batch * bytes_per_value
  return float(weights), float(kv)
