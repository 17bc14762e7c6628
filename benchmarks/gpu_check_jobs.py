"""The jobs of benchmarks/gpu_check.py (see its docstring): each builds its side's models, checks and times its rows,
and returns {"rows": {key: cells' data}, "notes": [...]}. JSON-able, so a job may run in its own process."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import numpy as np

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
import flops as flops_lib  # noqa: E402  (benchmarks/flops.py)

FP32_TOL = 1e-4  # tests/test_model_parity.py's bound


# -- models and inputs -------------------------------------------------------------------------------------------


def hf_config(shape: dict, layers: int | None = None):
  """A transformers LlavaConfig of the shape (image token: the last vocabulary id); both sides are built from it."""
  import transformers
  text = dict(shape["text"], max_position_embeddings=4096, rms_norm_eps=1e-5)
  if layers:
    text["num_hidden_layers"] = layers
  return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**shape["vision"]).to_dict(),
                                  text_config=transformers.LlamaConfig(**text).to_dict(),
                                  image_token_index=text["vocab_size"] - 1)


def our_config(hf_cfg, dtype: str, param_dtype: str):
  from llava_jax.config import LlavaConfig
  return LlavaConfig.from_hf(hf_cfg.to_dict(), dtype=dtype, param_dtype=param_dtype)


def rows(cfg, batch: int, seq: int, seed: int):
  """BOS, one image's tokens, random text; the last quarter supervised; NHWC pixels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.text.vocab_size - 1, (batch, seq)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_index
  labels = np.full_like(ids, -100)
  labels[:, -(seq // 4):] = ids[:, -(seq // 4):]
  px = rng.standard_normal((batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  return ids, np.ones_like(ids), labels, px


def torch_device():
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def torch_inputs(ids, mask, px, dev, dtype=None, labels=None):
  import torch
  out = dict(input_ids=torch.from_numpy(ids).long().to(dev), attention_mask=torch.from_numpy(mask).long().to(dev),
             pixel_values=torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2))).to(dev, dtype))
  if labels is not None:
    out["labels"] = torch.from_numpy(labels).long().to(dev)
  return out


def torch_sync():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def median_time(run, repeats: int, prepare=None) -> float:
  """Median seconds of `run()` (which waits for its device) after one warm-up; `prepare()` untimed before each."""
  times = []
  for i in range(repeats + 1):
    arg = prepare() if prepare else None
    t0 = time.perf_counter()
    run(arg) if prepare else run()
    if i:
      times.append(time.perf_counter() - t0)
    del arg  # before the next prepare(): one copy alive at a time
  return float(np.median(times))


def build_torch(hf_cfg, dev, dtype):
  """A random transformers LLaVA made directly on `dev` in `dtype` (its own init; no weights to copy)."""
  import torch
  import transformers
  torch.manual_seed(0)
  old = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(dev):
      return transformers.LlavaForConditionalGeneration(hf_cfg)
  finally:
    torch.set_default_dtype(old)


def attn_name(hf) -> str:
  return hf.config._attn_implementation  # pylint: disable=protected-access


# -- parity ------------------------------------------------------------------------------------------------------


def tiny_hf():
  """A tiny random transformers LLaVA (GQA) with weights spread enough that differences show (tests/hf_tiny.py)."""
  import torch
  import transformers
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=28, patch_size=7)
  text = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=60)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])))
  return model


def job_parity(shape, args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  from flax import nnx

  from llava_jax import generate, load_hf_checkpoint

  dev = torch_device()
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  hf = tiny_hf()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    ours32, ours16 = load_hf_checkpoint(tmp), load_hf_checkpoint(tmp, dtype="bfloat16")
  hf = hf.to(dev)
  n = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
  image = [60] * n ** 2
  ids = np.array([[1, 5, 9] + image + [11, 12, 13, 14], [0, 0, 0, 1] + image + [20, 21, 22]], np.int64)
  mask = (np.arange(ids.shape[1]) >= np.array([[0], [3]])).astype(np.int64)
  px = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  real = mask.astype(bool)

  def hf_logits(model, dtype):
    kw = torch_inputs(ids, mask, px, dev, dtype)
    with torch.no_grad():
      return model(**kw, position_ids=(kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits.float().cpu().numpy()

  def our_logits(model):  # jitted: op by op, the tiny model's forward compiles each op on its own (slower)
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, ids, px, mask: nnx.merge(graphdef, state)(ids, px, mask))
    return np.asarray(f(state, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)), np.float32)

  exact = hf_logits(hf, torch.float32)
  with jax.default_matmul_precision("highest"):
    got32 = our_logits(ours32)
    ours_tokens = generate(ours32, ids, jnp.asarray(px), mask, max_new_tokens=8, eos_token_id=())
  with torch.no_grad():
    ref_tokens = hf.generate(**torch_inputs(ids, mask, px, dev), do_sample=False, max_new_tokens=8,
                             min_new_tokens=8, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].cpu().numpy()
  hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), torch.bfloat16)
  got16 = our_logits(ours16)
  err32 = float(np.abs(got32 - exact)[real].max())
  hf_err, our_err = float(np.abs(hf_bf16 - exact)[real].max()), float(np.abs(got16 - exact)[real].max())
  tol16 = 2 * hf_err + 0.02
  same = float(np.mean(ours_tokens == ref_tokens))
  return {"rows": {
      "parity fp32": dict(label="parity fp32: logits, tiny model", kind="check", ours_text=f"max err {err32:.1e}",
                          torch_text="reference", check=f"<= {FP32_TOL:.0e}", ok=err32 <= FP32_TOL),
      "parity bf16": dict(label="parity bf16: logits vs fp32", kind="check", ours_text=f"max err {our_err:.2e}",
                          torch_text=f"max err {hf_err:.2e}", check=f"<= 2 x torch + 0.02 = {tol16:.2e}",
                          ok=our_err <= tol16),
      "greedy fp32": dict(label="greedy decode fp32: 2 x 8 tokens", kind="check",
                          ours_text=f"{100 * same:.0f}% identical", torch_text="reference", check="100%",
                          ok=same == 1.0)}}


# -- attention ---------------------------------------------------------------------------------------------------


def job_attention(shape, args) -> dict:
  import jax
  import jax.numpy as jnp

  from llava_jax.models.attention import SelfAttentionMask, dot_product_attention, xla_attention

  b, t, h, d = shape["attention"]
  scale = d ** -0.5
  rng = np.random.default_rng(0)
  q, k, v, ct = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(4))
  on_gpu = jax.devices()[0].platform == "gpu"
  work = 3 * 2 * b * h * t * t * d  # fwd (causal half of 4 T^2 d) + bwd (twice that)

  def loss_of(fn):  # the cotangent an argument: a closed-over array would be compiled in as a constant
    return lambda q, k, v, ct: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

  with jax.default_matmul_precision("highest"):
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    exact = lambda q, k, v, causal: xla_attention(q, k, v, causal, scale=scale)
    ref_out = np.asarray(jax.jit(exact)(q, k, v, causal))
    ref_grads = [np.asarray(g) for g in jax.jit(jax.grad(
        lambda q, k, v, ct, causal: jnp.sum(exact(q, k, v, causal) * ct), argnums=(0, 1, 2)))(q, k, v, ct, causal)]

  def rel_err(out, grads):
    e_out = float(np.abs(np.asarray(out, np.float32) - ref_out).max() / np.abs(ref_out).max())
    e_grad = max(float(np.abs(np.asarray(g, np.float32) - r).max() / np.abs(r).max())
                 for g, r in zip(grads, ref_grads))
    return e_out, e_grad

  torch_err, torch_s = torch_attention(q, k, v, ct, scale, rel_err, shape["repeats"])
  out = {"rows": {}, "notes": [], "attention_ok": False}
  bq, bk, bv = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  bct = jnp.asarray(ct)
  key_valid = jnp.ones((b, t), bool)
  for impl in ("cudnn", "xla"):
    key = f"attention {impl}"
    label = f"attention {impl}: fwd+bwd {b}x{t}x{h}x{d} bf16 causal"
    if impl == "cudnn" and not on_gpu:
      out["rows"][key] = dict(label=label, kind="skip", reason="skipped: no GPU (cuDNN is GPU only)")
      continue
    attend = lambda q, k, v, impl=impl: dot_product_attention(q, k, v, SelfAttentionMask(key_valid), scale=scale,
                                                              impl=impl)
    fwd = jax.jit(attend)
    step = jax.jit(jax.value_and_grad(loss_of(attend), argnums=(0, 1, 2)))
    try:
      e_out, e_grad = rel_err(fwd(bq, bk, bv), step(bq, bk, bv, bct)[1])
    except Exception as e:  # pylint: disable=broad-except  (a cuDNN that refuses this shape is a finding)
      out["rows"][key] = dict(label=label, kind="skip", reason=f"failed: {type(e).__name__}: {str(e)[:200]}",
                              ok=False)
      continue
    tol_out, tol_grad = 2 * torch_err[0] + 0.01, 2 * torch_err[1] + 0.01
    ok = e_out <= tol_out and e_grad <= tol_grad
    ours_s = median_time(lambda: jax.block_until_ready(step(bq, bk, bv, bct)), shape["repeats"])
    out["rows"][key] = dict(label=label, kind="time", ours_s=ours_s, torch_s=torch_s, work=work, ok=ok,
                            check=f"out {e_out:.1e} <= {tol_out:.1e}, grad {e_grad:.1e} <= {tol_grad:.1e} "
                                  f"(torch {torch_err[0]:.1e}, {torch_err[1]:.1e})")
    if impl == "cudnn":
      out["attention_ok"] = ok
  return out


def torch_attention(q, k, v, ct, scale, rel_err, repeats):
  """torch's scaled_dot_product_attention in bf16 ([B, H, T, D]), causal: (its errors, fwd + bwd seconds)."""
  import torch
  import torch.nn.functional as F

  dev = torch_device()
  tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).to(dev, torch.bfloat16).requires_grad_()
                for x in (q, k, v))
  tct = torch.from_numpy(ct.transpose(0, 2, 1, 3).copy()).to(dev)

  def run():
    out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale)
    grads = torch.autograd.grad((out.float() * tct).sum(), (tq, tk, tv))
    torch_sync()
    return out, grads

  out, grads = run()
  back = lambda x: x.float().detach().cpu().numpy().transpose(0, 2, 1, 3)
  return rel_err(back(out), [back(g) for g in grads]), median_time(run, repeats)


# -- stage 2 -----------------------------------------------------------------------------------------------------


def stage2_label(shape) -> str:
  return f"stage-2 step, 7B-shaped, {shape['train_layers']} layers, 1 x {shape['seq']}"


def with_xla_fallback(attempt, impl: str, what: str):
  """attempt(impl), and if that raises for an impl other than xla (a cuDNN that refuses a shape), attempt("xla")
  with a note: one GPU run should still give the row. The failed attempt's buffers go with its frame."""
  try:
    return attempt(impl), []
  except Exception as e:  # pylint: disable=broad-except
    if impl == "xla":
      raise
    note = f"{what}: {impl} attention failed ({type(e).__name__}: {str(e)[:200]}); measured with xla instead"
  print(note, flush=True)
  return attempt("xla"), [note]


def job_stage2_jax(shape, args) -> dict:
  result, notes = with_xla_fallback(lambda impl: stage2_jax(shape, impl), args.attention, "stage2 llava-jax")
  result["notes"] = notes + result["notes"]
  return result


def stage2_jax(shape, impl: str) -> dict:
  import jax

  from llava_jax.models.options import ModelOptions
  from llava_jax.sharding import make_mesh
  from llava_jax.train.optim import OptimConfig
  from llava_jax.train.step import Trainer

  cfg = our_config(hf_config(shape, shape["train_layers"]), "bfloat16", "float32")
  options = ModelOptions(attention_impl=impl, scan_layers=True, remat="full", seq_chunk=shape["seq_chunk"])
  trainer = Trainer(cfg, "stage2", OptimConfig(lr=2e-5, warmup_ratio=0.0), 1000, make_mesh((1, 1, 1)),
                    options=options)
  holder = {"state": trainer.init_state()}
  ids, mask, labels, px = rows(cfg, 1, shape["seq"], 3)
  batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px,
           "image_mask": np.ones(1, bool)}
  losses = []

  def run():
    holder["state"], metrics = trainer.step(holder["state"], batch)
    losses.append(float(jax.block_until_ready(metrics)["loss"]))

  seconds = median_time(run, shape["repeats"])
  work = flops_lib.train_step(cfg, "stage2", 1, shape["seq"], 1).total
  hardware = flops_lib.train_step(cfg, "stage2", 1, shape["seq"], 1, remat=True, hardware=True,
                                  seq_chunk=shape["seq_chunk"]).total
  note = (f"stage2 llava-jax: attention {impl}, compile {trainer.compile_seconds:.0f} s, losses "
          f"{', '.join(f'{x:.3f}' for x in losses)}; model FLOPs {work / 1e12:.3g} T/step (the MFU numerator), "
          f"computed with remat and dense attention {hardware / 1e12:.3g} T ({hardware / work:.2f}x); XLA's cost "
          f"analysis {(trainer.flops_per_step or float('nan')) / 1e12:.3g} T (it counts the scanned layers once)")
  return {"rows": {"stage2": dict(label=stage2_label(shape), kind="time", ours_s=seconds, work=work)},
          "notes": [note]}


def job_stage2_torch(shape, args) -> dict:
  import torch

  dev = torch_device()
  hf_cfg = hf_config(shape, shape["train_layers"])
  hf = build_torch(hf_cfg, dev, torch.float32)
  hf.train()  # dropout is 0; train mode as a training run has it
  hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  trainable = ("model.multi_modal_projector.", "model.language_model.", "lm_head.")
  params = []
  for name, p in hf.named_parameters():
    p.requires_grad_(name.startswith(trainable))
    if p.requires_grad:
      params.append(p)
  opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
  cfg = our_config(hf_cfg, "bfloat16", "float32")
  ids, mask, labels, px = rows(cfg, 1, shape["seq"], 3)
  kw = torch_inputs(ids, mask, px, dev, labels=labels)
  losses = []

  def run():
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
      loss = hf(**kw).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    torch_sync()

  seconds = median_time(run, shape["repeats"])
  return {"rows": {"stage2": dict(label=stage2_label(shape), kind="time", torch_s=seconds,
                                  work=flops_lib.train_step(cfg, "stage2", 1, shape["seq"], 1).total)},
          "notes": [f"stage2 transformers: {attn_name(hf)} attention, losses {', '.join(f'{x:.3f}' for x in losses)}"]}


# -- inference: prefill and decode -------------------------------------------------------------------------------


def inference_labels(shape) -> dict:
  out = {"prefill": f"prefill, 7B-shaped, 1 x {shape['seq']} (last logits + KV cache)"}
  for b in shape["batches"]:
    out[f"decode b{b}"] = f"greedy decode, batch {b}, {shape['prompt']}-token prompt, {shape['new_tokens']} new"
  return out


def decode_work(cfg, shape, batch):
  weights, kv = flops_lib.decode_bytes(cfg, batch, shape["prompt"] + (shape["new_tokens"] + 1) / 2, 2)
  return weights + kv


def job_inference_jax(shape, args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from llava_jax.decoding import decode_step, prefill
  from llava_jax.models.llava import Llava
  from llava_jax.models.options import ModelOptions

  cfg = our_config(hf_config(shape), "bfloat16", "bfloat16")
  state = jax.jit(lambda: nnx.split(Llava(cfg, rngs=nnx.Rngs(0)))[1])()
  graph = lambda impl: nnx.graphdef(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), options=ModelOptions(
      attention_impl=impl))))
  labels, out = inference_labels(shape), {"rows": {}, "notes": []}

  def prefill_fn(graphdef, cache_len):
    return jax.jit(lambda state, ids, px, mask: prefill(nnx.merge(graphdef, state), ids, mask, {"pixel_values": px},
                                                        cache_len))

  seq = shape["seq"]
  ids, mask, _, px = rows(cfg, 1, seq, 2)

  def time_prefill(impl):
    f = prefill_fn(graph(impl), seq)
    return median_time(lambda: jax.block_until_ready(f(state, ids, px, mask)), shape["repeats"]), impl

  (seconds, impl), notes = with_xla_fallback(time_prefill, args.attention, "prefill llava-jax")
  out["rows"]["prefill"] = dict(label=labels["prefill"], kind="time", ours_s=seconds,
                                work=flops_lib.forward(cfg, 1, seq, 1, head_tokens=1).total)
  out["notes"] += notes + [f"prefill llava-jax: attention {impl}; decode: xla"]

  decode_graph, prompt, steps = graph("xla"), shape["prompt"], shape["new_tokens"]

  @jax.jit
  def decode(state, token, caches, key_valid, position):
    model = nnx.merge(decode_graph, state)

    def body(i, carry):
      token, caches, key_valid, position, toks = carry
      logits, caches, key_valid = decode_step(model, token, caches, key_valid, position, prompt + i)
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      return token, caches, key_valid, position + 1, toks.at[:, i].set(token)

    toks = jnp.zeros((token.shape[0], steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (token, caches, key_valid, position, toks))[-1]

  def time_decode(b):  # the cache lives while this runs
    ids, mask, _, px = rows(cfg, b, prompt, 4)
    logits, caches, key_valid, position = prefill_fn(decode_graph, prompt + steps)(state, ids, px, mask)
    first = jnp.argmax(logits, -1).astype(jnp.int32)
    return median_time(lambda: jax.block_until_ready(decode(state, first, caches, key_valid, position)),
                       shape["repeats"])

  for b in shape["batches"]:
    out["rows"][f"decode b{b}"] = dict(label=labels[f"decode b{b}"], kind="rate", ours_s=time_decode(b) / steps,
                                       tokens=b, work=decode_work(cfg, shape, b))
  return out


def job_inference_torch(shape, args) -> dict:
  import torch

  dev = torch_device()
  hf_cfg = hf_config(shape)
  hf = build_torch(hf_cfg, dev, torch.bfloat16).eval()
  cfg = our_config(hf_cfg, "bfloat16", "bfloat16")
  labels, out = inference_labels(shape), {"rows": {}, "notes": [
      f"transformers: {attn_name(hf)} attention, eager"]}
  seq = shape["seq"]
  ids, mask, _, px = rows(cfg, 1, seq, 2)
  kw = torch_inputs(ids, mask, px, dev, torch.bfloat16)

  def run_prefill():
    with torch.no_grad():
      hf(**kw, use_cache=True, logits_to_keep=1)
    torch_sync()

  out["rows"]["prefill"] = dict(label=labels["prefill"], kind="time", torch_s=median_time(run_prefill,
                                                                                         shape["repeats"]),
                                work=flops_lib.forward(cfg, 1, seq, 1, head_tokens=1).total)
  prompt, steps = shape["prompt"], shape["new_tokens"]

  def time_decode(b):  # one forward per token; the prompt's cache copied outside the timing, one copy at a time
    ids, mask, _, px = rows(cfg, b, prompt, 4)
    kw = torch_inputs(ids, mask, px, dev, torch.bfloat16)
    with torch.no_grad():
      first = hf(**kw, use_cache=True, logits_to_keep=1)
    prefilled, tok0 = first.past_key_values, first.logits[:, -1].argmax(-1, keepdim=True)
    del first
    ones = torch.ones((b, 1), dtype=torch.long, device=dev)

    def run(cache):
      m, tok = kw["attention_mask"], tok0
      with torch.no_grad():
        for _ in range(steps):
          m = torch.cat([m, ones], dim=1)
          tok = hf(input_ids=tok, attention_mask=m, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
      torch_sync()

    return median_time(run, shape["repeats"], prepare=lambda: copy.deepcopy(prefilled))

  for b in shape["batches"]:
    out["rows"][f"decode b{b}"] = dict(label=labels[f"decode b{b}"], kind="rate", torch_s=time_decode(b) / steps,
                                       tokens=b, work=decode_work(cfg, shape, b))
  return out


JOB_FNS = {("parity", "both"): job_parity, ("attention", "both"): job_attention,
           ("stage2", "jax"): job_stage2_jax, ("stage2", "torch"): job_stage2_torch,
           ("inference", "jax"): job_inference_jax, ("inference", "torch"): job_inference_torch}
