"""llava-jax against transformers (PyTorch) on this CPU: the same weights, fp32, the same thread count, one run.

  python benchmarks/compare_torch.py                  # mid-size model (~250M parameters), a few minutes on 2 cores
  python benchmarks/compare_torch.py --size small     # the same shapes with fewer layers, ~1 minute
  python benchmarks/compare_torch.py --rows floors,prefill --repeats 5

A random transformers LlavaForConditionalGeneration is saved and loaded into llava-jax, so both sides hold identical
weights. Rows (each side warmed up first, so our compiles are excluded; the two sides alternate and the best of
`--repeats` timings counts, because the machine is shared and timings are noisy):

  vision     image features of one 336 px image (CLIP tower + projector)
  prefill    a full forward of one 1024-token row (576 image tokens), logits at every position
  stage2     one AdamW step, projector + language model trainable, vision frozen (torch: requires_grad masks and
             torch.optim.AdamW(fused=True), HF Trainer's default; both clip the gradient norm to 1)
  stage1     one AdamW step with only the projector trainable
  decode     greedy decode steps at batch 1 and 8 after a 1024-token prompt, each side's own KV cache (ours: the
             bucketed cache and decode step of llava_jax.decoding inside one compiled loop; torch: forward with a
             DynamicCache, one step per call, without `generate`'s per-token bookkeeping)
  tiny       `generate` against `generate` on the tiny README model (per-token overhead dominates), decode rate
             from the difference of 64 and 1 new tokens so the prefill cancels

The floors are measured in the same run: peak FLOP/s of fp32 matmuls (the best of jax and torch over 4096^3, 2048^3
and 1024x1024x2816, the model's MLP shape) and memory
bandwidth of a 1 GiB copy (bytes read + written per second, the best of numpy, torch and jax). Compute rows report
useful FLOPs (benchmarks/flops.py) / time / peak; decode rows report (weights + KV cache bytes read per step) /
step time / bandwidth.

The floors and each group of rows (vision; prefill; the two train steps; decode; tiny) run in their own spawned
process, with glibc keeping freed memory for both sides (`--malloc keep`, llava_jax/host_memory.py): XLA's per-step
temporaries are not page-faulted in again every step, and one row's heap does not shape the next row's timings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # flops.py beside this file; llava_jax from the checkout
import flops as flops_lib  # noqa: E402

SIZES = {
    # ViT-B/14-shaped CLIP at 336 px (576 patches) + a 1024-wide, 8-layer LLaMA with a 32k vocabulary: 256M.
    "mid": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=336, patch_size=14),
                text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8, head_dim=128, vocab_size=32000),
                seq=1024),
    # The same widths with a quarter of the layers: a quick check of the script and of the ratios' direction.
    "small": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=3, num_attention_heads=12,
                              image_size=336, patch_size=14),
                  text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=8, head_dim=128, vocab_size=32000),
                  seq=1024),
}


def tiny_size() -> dict:
  """The README demo's model (llava_jax/demo.py), with the demo tokenizer's vocabulary size."""
  from llava_jax import demo
  vision = {k: v for k, v in dataclasses.asdict(demo.TINY_VISION).items()
            if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                     "patch_size")}
  return dict(vision=vision, text=dict(demo.TINY_TEXT, vocab_size=600))


# Peak FLOP/s: the best of both libraries over a large square matmul and the mid model's own MLP shape.
MATMUL_SHAPES = ((4096, 4096, 4096), (2048, 2048, 2048), (1024, 1024, 2816))
ROWS = ("floors", "vision", "prefill", "stage2", "stage1", "decode", "tiny")
# row -> (minimum speed-up over transformers, minimum fraction of the floor); None: no target (docs/PERFORMANCE.md)
TARGETS = {
    "prefill": (1.05, None), "stage2": (0.9, None), "decode b1": (1.1, None), "decode b8": (1.0, None),
    "tiny decode b1": (3.0, None), "tiny decode b8": (3.0, None)}


@dataclasses.dataclass
class Row:
  name: str
  work: str
  torch_s: float  # seconds per call (decode: per step)
  ours_s: float
  unit: str = "s"  # how to print the times: "s", or "tok/s" with `tokens` per call
  tokens: int = 1
  floor_s: float | None = None  # the time this work would take at the floor (peak FLOP/s or bandwidth)
  target: str = ""
  met: str = ""

  def cells(self):
    if self.unit == "tok/s":
      t, o = f"{self.tokens / self.torch_s:.1f} tok/s", f"{self.tokens / self.ours_s:.1f} tok/s"
    else:
      t, o = f"{self.torch_s:.3f} s", f"{self.ours_s:.3f} s"
    frac = lambda s: "" if self.floor_s is None else f"{100 * self.floor_s / s:.0f}%"
    return [self.name, self.work, t, o, f"{self.torch_s / self.ours_s:.2f}x", frac(self.torch_s),
            frac(self.ours_s), self.target, self.met]


def best_alternating(fns: dict, repeats: int) -> dict:
  """{name: best seconds}: every fn once as warm-up, then `repeats` rounds alternating between them."""
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: min(v) for k, v in times.items()}


# -- the floors ------------------------------------------------------------------------------------------------


MALLOC_LABELS = {"keep": "freed memory kept", "default": "glibc default"}


def add_malloc_flag(parser):
  parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                      help="keep: glibc keeps freed memory (llava_jax/host_memory.py; for both sides); default: as is")


def apply_malloc(mode: str) -> str:
  """Set glibc's malloc as `--malloc` asks (before JAX and torch start their threads); says what holds."""
  from llava_jax.host_memory import keep_freed_memory
  return MALLOC_LABELS["keep" if mode == "keep" and keep_freed_memory() else "default"]


def in_child(fn, *args):
  """fn(*args) in a fresh (spawned) process: what one measurement allocates and compiles stays out of the next."""
  import concurrent.futures
  import multiprocessing

  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    return pool.submit(fn, *args).result()


def measure_floors(repeats: int, threads: int) -> dict:
  return in_child(_measure_floors, repeats, threads)


def _measure_floors(repeats: int, threads: int) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  jmm = jax.jit(jnp.matmul)
  peak_by = {}
  for m, k, n in MATMUL_SHAPES:
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    mm = best_alternating({"jax": lambda: jmm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)},
                          repeats + 2)
    for lib, seconds in mm.items():
      peak_by[f"{lib} {m}x{k}x{n}"] = 2 * m * k * n / seconds
  peak = max(peak_by.values())

  # 1 GiB of fp32, far beyond any cache, read and written in place (a fresh output buffer would add page faults,
  # which cost this VM more than the copy itself).
  size = 2 ** 30 // 4
  src = np.ones(size, np.float32)
  dst = np.empty_like(src)
  tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
  holder = {"x": jnp.ones(size, jnp.float32)}
  jadd = jax.jit(lambda x: x + 1, donate_argnums=0)

  def jax_inplace():
    holder["x"] = jadd(holder["x"])
    holder["x"].block_until_ready()

  cp = best_alternating({"numpy copy": lambda: np.copyto(dst, src), "torch copy": lambda: tdst.copy_(tsrc),
                         "torch add_": lambda: tdst.add_(1), "jax donated add": jax_inplace}, repeats + 2)
  bandwidth = 2 * src.nbytes / min(cp.values())
  del src, dst, tsrc, tdst, holder
  return {"peak": peak, "peak_by": peak_by, "bandwidth": bandwidth,
          "bandwidth_by": {k: 2 * 2 ** 30 / v for k, v in cp.items()}}


# -- models ----------------------------------------------------------------------------------------------------


def build_models(size: dict, tmp: str):
  """A random transformers LLaVA and the same weights in llava-jax."""
  import torch
  import transformers

  from llava_jax import load_hf_checkpoint

  vision = transformers.CLIPVisionConfig(**size["vision"])
  text = transformers.LlamaConfig(**{"max_position_embeddings": 4096, **size["text"]})
  torch.manual_seed(0)
  hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=text.vocab_size - 1)).eval()
  hf.save_pretrained(tmp)
  ours = load_hf_checkpoint(tmp)
  return hf, ours


def make_rows(cfg, batch: int, seq: int, rng, answer: int = 256):
  """Rows of BOS, one image's tokens, random text; the last `answer` tokens supervised; NHWC pixels."""
  n_img, vocab = cfg.num_image_tokens, cfg.text.vocab_size
  ids = rng.integers(3, vocab - 1, (batch, seq)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + n_img] = cfg.image_token_index
  labels = np.full_like(ids, -100)
  labels[:, -answer:] = ids[:, -answer:]
  px = rng.standard_normal((batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  return ids, np.ones_like(ids), labels, px


def torch_pixels(px):
  import torch
  return torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))


# -- rows ------------------------------------------------------------------------------------------------------


def row_vision(hf, ours, cfg, floors, repeats):
  import jax
  import torch
  from flax import nnx

  rng = np.random.default_rng(1)
  px = rng.standard_normal((1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  px_t = torch_pixels(px)
  graphdef, state = nnx.split(ours)
  f = jax.jit(lambda state, px: nnx.merge(graphdef, state).image_features(px))

  def torch_run():
    with torch.no_grad():
      hf.model.get_image_features(pixel_values=px_t, vision_feature_layer=-2, vision_feature_select_strategy="default")

  t = best_alternating({"torch": torch_run, "ours": lambda: f(state, px).block_until_ready()}, repeats)
  work = flops_lib.image_features(cfg, 1).total
  return Row("image features (1 image)", f"{work / 1e9:.0f} GFLOP", t["torch"], t["ours"],
             floor_s=work / floors["peak"])


def row_prefill(hf, ours, cfg, seq, floors, repeats):
  import jax
  import torch
  from flax import nnx

  ids, mask, _, px = make_rows(cfg, 1, seq, np.random.default_rng(2))
  ids_t, mask_t, px_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), torch_pixels(px)
  graphdef, state = nnx.split(ours)
  f = jax.jit(lambda state, ids, px, mask: nnx.merge(graphdef, state)(ids, px, mask))

  def torch_run():
    with torch.no_grad():
      return hf(input_ids=ids_t, pixel_values=px_t, attention_mask=mask_t).logits

  ref, got = torch_run().numpy(), np.asarray(f(state, ids, px, mask))
  err = float(np.max(np.abs(ref - got)))
  t = best_alternating({"torch": torch_run, "ours": lambda: f(state, ids, px, mask).block_until_ready()}, repeats)
  work = flops_lib.forward(cfg, 1, seq, 1).total
  lo, hi = TARGETS["prefill"]
  target = f">= {lo}x" + (f", >= {hi:.0%} peak" if hi else "")
  return Row(f"prefill (1 x {seq}, all logits)", f"{work / 1e9:.0f} GFLOP", t["torch"], t["ours"],
             floor_s=work / floors["peak"], target=target,
             met=_met(t["torch"] / t["ours"] >= lo and (not hi or work / floors["peak"] / t["ours"] >= hi))), err


def rows_train(hf, ours, cfg, stages, seq, rows, floors, repeats):
  """One AdamW step per stage on each side; all (side, stage) pairs alternate in one timing loop, so load changes
  on the shared machine hit every cell alike. transformers' weights are restored afterwards."""
  import jax
  import torch

  from llava_jax.checkpoint import params_of
  from llava_jax.sharding import make_mesh
  from llava_jax.train.optim import OptimConfig
  from llava_jax.train.step import Trainer

  ids, mask, labels, px = make_rows(cfg, rows, seq, np.random.default_rng(3))
  batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px,
           "image_mask": np.ones(rows, bool)}
  ids_t, mask_t, labels_t, px_t = (torch.from_numpy(ids).long(), torch.from_numpy(mask).long(),
                                   torch.from_numpy(labels).long(), torch_pixels(px))
  snapshot = {k: v.clone() for k, v in hf.state_dict().items()}
  named = list(hf.named_parameters())
  hf.train()  # dropout is 0 in both configs; train mode as a training run has it
  fns, first, trainers = {}, {}, {}
  for stage in stages:
    # torch: the stage as requires_grad masks, AdamW on the trainable parameters, global-norm clipping to 1.
    prefixes = ("model.multi_modal_projector.",) + (("model.language_model.", "lm_head.") if stage == "stage2"
                                                     else ())
    mask_of = [name.startswith(prefixes) for name, _ in named]
    params = [p for (_, p), m in zip(named, mask_of) if m]
    opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)

    def torch_step(mask_of=mask_of, params=params, opt=opt):
      for (_, p), m in zip(named, mask_of):
        p.requires_grad_(m)
      loss = hf(input_ids=ids_t, pixel_values=px_t, attention_mask=mask_t, labels=labels_t).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return float(loss.detach())

    trainer = Trainer(ours.config, stage, OptimConfig(lr=2e-5, warmup_ratio=0.0), 1000, make_mesh((1, 1, 1)))
    holder = {"state": trainer.init_state(params_of(ours))}

    def ours_step(trainer=trainer, holder=holder):
      holder["state"], metrics = trainer.step(holder["state"], batch)
      jax.block_until_ready((holder["state"], metrics))
      return float(metrics["loss"])

    hf.load_state_dict(snapshot)  # both sides' first step from the same weights: the losses agree
    first[stage] = (torch_step(), ours_step())
    fns[f"torch {stage}"], fns[f"ours {stage}"], trainers[stage] = torch_step, ours_step, trainer
  t = best_alternating(fns, repeats)
  hf.load_state_dict(snapshot)
  for p in hf.parameters():
    p.requires_grad_(False)
    p.grad = None
  hf.eval()
  out = {}
  for stage in stages:
    work = flops_lib.train_step(cfg, stage, rows, seq, rows).total
    row = Row(f"{stage} train step ({rows} x {seq})", f"{work / 1e9:.0f} GFLOP", t[f"torch {stage}"],
              t[f"ours {stage}"], floor_s=work / floors["peak"])
    if stage in TARGETS:
      row.target, row.met = f">= {TARGETS[stage][0]}x", _met(row.torch_s / row.ours_s >= TARGETS[stage][0])
    compiled = next(iter(trainers[stage]._compiled.values()))  # pylint: disable=protected-access
    out[stage] = (row, first[stage], trainers[stage].flops_per_step, compiled.memory_analysis().temp_size_in_bytes)
  return out


def row_decode(hf, ours, cfg, seq, batch, steps, room, floors, repeats):
  """Greedy decode steps from a prefilled `seq`-token prompt, the prefill outside the timing. Ours decodes as
  `generate` does, over the cache sizes of `cache_schedule(seq, room)` (`room`: the new tokens the cache is made
  for, generate's max_new_tokens; the first `steps` of them are timed); with room > steps also over one static
  cache of seq + room slots, every step reading all of it (the decode loop before the cache grew in buckets)."""
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from llava_jax.decoding import cache_schedule, decode_step, grow_cache, prefill

  ids, mask, _, px = make_rows(cfg, batch, seq, np.random.default_rng(4))
  graphdef, state = nnx.split(ours)

  @functools.partial(jax.jit, static_argnames="cache_len")
  def ours_prefill(state, ids, px, mask, *, cache_len):
    logits, caches, key_valid, position = prefill(nnx.merge(graphdef, state), ids, mask, {"pixel_values": px},
                                                  cache_len)
    return jnp.argmax(logits, -1).astype(jnp.int32), caches, key_valid, position

  @functools.partial(jax.jit, static_argnames="sizes")
  def ours_decode(state, token, caches, key_valid, position, *, sizes):
    model = nnx.merge(graphdef, state)

    def body(i, carry):
      token, caches, key_valid, position, out = carry
      logits, caches, key_valid = decode_step(model, token, caches, key_valid, position, seq + i)
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      return token, caches, key_valid, position + 1, out.at[:, i].set(token)

    carry = (token, caches, key_valid, position, jnp.zeros((token.shape[0], steps), jnp.int32))
    for k, size in enumerate(sizes):  # step i writes slot seq + i: the steps that fit this size, then the next
      carry = jax.lax.fori_loop(min(sizes[k - 1] - seq, steps) if k else 0, min(size - seq, steps), body, carry)
      if size - seq >= steps:
        break
      token, caches, key_valid, position, out = carry
      carry = (token, *grow_cache(caches, key_valid, size=sizes[k + 1]), position, out)
    return carry[-1]

  variants = {"ours": cache_schedule(seq, room)}
  if room > steps:
    variants["ours static"] = (seq + room,)
  runs = {}
  for name, sizes in variants.items():
    prefilled = ours_prefill(state, ids, px, mask, cache_len=sizes[0])
    runs[name] = functools.partial(lambda p, z: ours_decode(state, *p, sizes=z).block_until_ready(), prefilled, sizes)
  ours_run = runs["ours"]

  ids_t, mask_t, px_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), torch_pixels(px)
  with torch.no_grad():
    out = hf(input_ids=ids_t, pixel_values=px_t, attention_mask=mask_t, use_cache=True, logits_to_keep=1)
  prefilled, tok0 = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
  del out
  ones = torch.ones((batch, 1), dtype=torch.long)

  def torch_run():
    cache, m, tok, toks = copy.deepcopy(prefilled), mask_t, tok0, []
    with torch.no_grad():
      for _ in range(steps):
        m = torch.cat([m, ones], dim=1)
        tok = hf(input_ids=tok, attention_mask=m, past_key_values=cache, use_cache=True,
                 logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    return torch.cat(toks, dim=1)

  agree = float(np.mean(torch_run().numpy() == np.asarray(ours_run())))
  # The torch side's cache copy (deepcopy) is inside its timing: measure it alone and take it out.
  copy_s = min(_timed(lambda: copy.deepcopy(prefilled)) for _ in range(3))
  t = best_alternating({"torch": torch_run, **runs}, repeats)
  t["torch"] = max(t["torch"] - copy_s, 1e-9)
  weights, kv = flops_lib.decode_bytes(cfg, batch, seq + (steps + 1) / 2)
  name = f"decode b{batch}"
  lo, frac = TARGETS[name]
  title = f"greedy decode, batch {batch} ({seq}-token prompt" + (f", room for {room} new)" if room > steps else ")")
  row = Row(title, f"{(weights + kv) / 1e6:.0f} MB/step", t["torch"] / steps, t["ours"] / steps, unit="tok/s",
            tokens=batch, floor_s=(weights + kv) / floors["bandwidth"])
  if lo:
    row.target, row.met = f">= {lo}x", _met(t["torch"] / t["ours"] >= lo)
  else:
    row.target, row.met = f">= {frac:.0%} of floor", _met(row.floor_s / row.ours_s >= frac)
  rows = [row]
  if "ours static" in t:
    rows.append(dataclasses.replace(row, name=f"{title}, one static cache", ours_s=t["ours static"] / steps,
                                    target="", met=""))
  return rows, agree


def rows_tiny(repeats, new=64):
  """generate vs generate on the tiny model; decode rate = B (N - 1) / (t(N) - t(1))."""
  import jax.numpy as jnp
  import torch

  from llava_jax import generate

  out = []
  with tempfile.TemporaryDirectory() as tmp:
    hf, ours = build_models(tiny_size(), tmp)
  cfg = ours.config
  for b in (1, 8):
    rng = np.random.default_rng(5)
    ids = np.concatenate([np.ones((b, 1), np.int64), np.full((b, cfg.num_image_tokens), cfg.image_token_index),
                          rng.integers(3, 200, (b, 20))], axis=1)
    mask = np.ones_like(ids)
    px = rng.standard_normal((b, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    px_t = torch_pixels(px)

    def hf_run(n):
      with torch.no_grad():
        hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=px_t,
                    do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def our_run(n):
      generate(ours, ids, jnp.asarray(px), mask, max_new_tokens=n, eos_token_id=())

    t = best_alternating({"torch n": lambda: hf_run(new), "ours n": lambda: our_run(new),
                          "torch 1": lambda: hf_run(1), "ours 1": lambda: our_run(1)}, repeats)
    steps = new - 1
    torch_s = max(t["torch n"] - t["torch 1"], 1e-9) / steps
    ours_s = max(t["ours n"] - t["ours 1"], 1e-9) / steps
    lo = TARGETS[f"tiny decode b{b}"][0]
    out.append(Row(f"tiny model: generate, batch {b}", "overhead-bound", torch_s, ours_s, unit="tok/s", tokens=b,
                   target=f">= {lo}x", met=_met(torch_s / ours_s >= lo)))
  return out


def _met(ok: bool) -> str:
  return "yes" if ok else "**no**"


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def print_table(rows: list[Row]):
  head = ["measurement", "work", "transformers", "llava-jax", "speed-up", "transformers of floor",
          "llava-jax of floor", "target", "met"]
  print("| " + " | ".join(head) + " |")
  print("|" + "|".join("---" for _ in head) + "|")
  for r in rows:
    print("| " + " | ".join(r.cells()) + " |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="mid", choices=sorted(SIZES))
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row (after one warm-up)")
  parser.add_argument("--seq", type=int, default=0, help="tokens per row (default: the size's, 1024)")
  parser.add_argument("--train-rows", type=int, default=1, help="rows per train step")
  parser.add_argument("--decode-steps", type=int, default=32)
  parser.add_argument("--decode-room", type=int, default=0,
                      help="new tokens the decode rows' caches are made for (generate's max_new_tokens; default: "
                           "--decode-steps); when more than the steps, a row with one static cache of that room too")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  add_malloc_flag(parser)
  args = parser.parse_args(argv)
  rows = args.rows.split(",")
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown rows {unknown}; choose from {ROWS}")
  malloc = MALLOC_LABELS[args.malloc]  # as asked: each row group's process applies it (measure_group)
  from llava_jax.cpu_defaults import apply_cpu_flags
  apply_cpu_flags(cpu_run=True)  # our XLA:CPU flags (the row groups' processes inherit them); printed below

  import jax
  import torch
  import transformers

  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device), torch {torch.__version__}"
        f", transformers {transformers.__version__}; {args.threads} threads (torch), {os.cpu_count()} CPUs; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; malloc: {malloc}; best of {args.repeats}, alternating; "
        "each row group in its own process; load average "
        f"{os.getloadavg()[0]:.1f}", flush=True)
  floors = measure_floors(args.repeats, args.threads)
  print(f"floors: peak fp32 matmul {floors['peak'] / 1e9:.1f} GFLOP/s (" +
        ", ".join(f"{k} {v / 1e9:.1f}" for k, v in floors["peak_by"].items()) +
        f"); copy bandwidth {floors['bandwidth'] / 1e9:.1f} GB/s (" +
        ", ".join(f"{k} {v / 1e9:.1f}" for k, v in floors["bandwidth_by"].items()) + ")", flush=True)
  table, notes = [], []
  groups = [g for g in (["vision"], ["prefill"], ["stage2", "stage1"], ["decode"], ["tiny"]) if set(g) & set(rows)]
  for i, group in enumerate(groups):
    got, got_notes = in_child(measure_group, [r for r in group if r in rows], args, floors, i == 0)
    table += got
    notes += got_notes
  print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other work on this machine slows both sides)\n")
  print_table(table)
  print()
  for n in notes:
    print(f"- {n}")
  return table


def measure_group(rows: list[str], args, floors: dict, describe: bool):
  """One group of rows in this (child) process: the model built afresh, so one row's compiled programs and heap
  never shape another row's timings (with kept freed memory, an earlier row's buffers stayed in the heap and slowed
  both sides' later steps by up to 30%)."""
  apply_malloc(args.malloc)
  import torch

  torch.set_num_threads(args.threads)
  if rows == ["tiny"]:
    return rows_tiny(args.repeats), []
  size = SIZES[args.size]
  seq = args.seq or size["seq"]
  with tempfile.TemporaryDirectory() as tmp:
    hf, ours = build_models(size, tmp)
  cfg = ours.config
  if describe:
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: {args.size}, {n_params / 1e6:.0f}M parameters (vision {cfg.vision.num_hidden_layers}x"
          f"{cfg.vision.hidden_size} at {cfg.vision.image_size} px, {cfg.num_image_tokens} image tokens; LLaMA "
          f"{cfg.text.num_hidden_layers}x{cfg.text.hidden_size}, vocab {cfg.text.vocab_size}); {seq} tokens per row",
          flush=True)
  table, notes = [], []
  if "vision" in rows:
    table.append(row_vision(hf, ours, cfg, floors, args.repeats))
    print_partial(table)
  if "prefill" in rows:
    row, err = row_prefill(hf, ours, cfg, seq, floors, args.repeats)
    table.append(row)
    notes.append(f"prefill: max |logit difference| vs transformers {err:.1e}")
    print_partial(table)
  steps = {}
  stages = [s for s in ("stage2", "stage1") if s in rows]
  if stages:
    for stage, (row, first, xla, temp) in rows_train(hf, ours, cfg, stages, seq, args.train_rows, floors,
                                                     args.repeats).items():
      table.append(row)
      steps[stage] = row
      notes.append(f"{stage}: first-step loss transformers {first[0]:.5f}, llava-jax {first[1]:.5f}; XLA cost "
                   f"analysis {xla / 1e9:.0f} GFLOP/step vs analytic {row.work} (causal attention counted half); "
                   f"XLA temporaries {temp / 1e9:.1f} GB per step")
      print_partial(table)
  if len(steps) == 2:
    ratio_ours = steps["stage1"].ours_s / steps["stage2"].ours_s
    ratio_torch = steps["stage1"].torch_s / steps["stage2"].torch_s
    floor = flops_lib.train_step(cfg, "stage1", 1, seq, 1).total / flops_lib.train_step(cfg, "stage2", 1, seq,
                                                                                         1).total
    notes.append(f"stage1 / stage2 step time: llava-jax {ratio_ours:.2f}, transformers {ratio_torch:.2f} "
                 f"(FLOP ratio {floor:.2f}); target <= 0.6: {_met(ratio_ours <= 0.6)}")
  if "decode" in rows:
    for b in (1, 8):
      rows_b, agree = row_decode(hf, ours, cfg, seq, b, args.decode_steps, max(args.decode_room, args.decode_steps),
                                 floors, args.repeats)
      table += rows_b
      notes.append(f"decode b{b}: {100 * agree:.0f}% of greedy tokens identical to transformers'")
      for r in rows_b:
        print_partial([r])
  return table, notes


def print_partial(table):
  r = table[-1]
  print(f"  {r.name}: transformers {r.torch_s:.4f} s, llava-jax {r.ours_s:.4f} s ({r.torch_s / r.ours_s:.2f}x)",
        flush=True)


if __name__ == "__main__":
  main()
