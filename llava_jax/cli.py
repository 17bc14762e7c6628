"""`llava-jax` console script: convert, export-hf, generate, chat, eval, demo, serve, web."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _convert(args):
  from llava_jax.convert import convert_checkpoint

  with _overwrite_hint(args.out):
    cfg = convert_checkpoint(args.out, hf=args.hf, clip=args.clip, llm=args.llm, projector_type=args.projector,
                             dtype=args.dtype, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
  t, v = cfg.text, cfg.vision
  anyres = f", anyres ({cfg.anyres_semantics} semantics)" if cfg.is_next else ""
  tower = "SigLIP" if v.model_type == "siglip" else "CLIP"
  print(f"wrote {args.out}: {t.model_type} {t.num_hidden_layers}x{t.hidden_size} (vocab {t.vocab_size}), {tower} "
        f"{v.num_hidden_layers}x{v.hidden_size} at {v.image_size}px, {cfg.projector_type} projector{anyres}, "
        f"{cfg.param_dtype}")


@contextlib.contextmanager
def _overwrite_hint(out: str):
  """The library says `overwrite=True`; on the command line the switch is `--overwrite`."""
  try:
    yield
  except FileExistsError:
    raise FileExistsError(f"{out} already exists; remove it or pass --overwrite") from None


def _export(args):
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.convert import export_hf

  model = load_checkpoint(args.ckpt, dtype=args.dtype)
  with _overwrite_hint(args.out):
    export_hf(model, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
  print(f"wrote {args.out}")


def _int_in(low: int, high: int | None, what: str):
  """An argparse type: an integer from `low` (to `high`), else a usage error saying `what` it must be."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
      raise argparse.ArgumentTypeError(f"{value} is not {what}")
    return value

  return parse


_positive_int = _int_in(1, None, "a positive integer")
# --limit: 0 answers nothing (a score of the answers already in OUT); a negative N used to mean "all but N".
_non_negative_int = _int_in(0, None, "0 or more")
_port = _int_in(0, 65535, "a TCP port (0 to 65535)")


def _read_images(paths) -> list:
  """The --image files (the flag may repeat), each decoded in full now."""
  return [_read_image(p) for p in paths or ()]


def _read_videos(folders) -> list:
  """The --video folders (the flag may repeat), each one video: its image files' frames, sorted by name."""
  from llava_jax.processor_onevision import read_frames

  for folder in folders or ():
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"--video {folder} is not a folder of frame images")
  return [read_frames(folder) for folder in folders or ()]


def _read_image(path: str | None):
  """The --image file, decoded in full now: a missing, non-image or truncated file is an error naming it."""
  if path is None:
    return None
  from PIL import Image

  if not os.path.isfile(path):
    raise FileNotFoundError(f"--image {path} does not exist")
  try:
    with Image.open(path) as im:
      im.load()
      return im.copy()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways to fail
    raise ValueError(f"--image {path}: not a readable image ({type(e).__name__}: {e})") from None


def _load_for_generation(args, images=(), videos=()):
  """The model and its processor; several images or any video need a OneVision checkpoint (one that takes them)."""
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.processor import Processor

  model = load_checkpoint(args.ckpt, dtype=args.dtype)
  if not model.config.is_onevision and (len(images) > 1 or videos):
    what = f"{len(images)} --image" if len(images) > 1 else "--video"
    raise ValueError(f"{what} given, but this checkpoint takes one image per conversation (several images and "
                     "videos need a LLaVA-OneVision checkpoint)")
  return model, Processor.from_model(model, template=args.template, aspect_ratio=args.aspect_ratio,
                                     tokenization=args.tokenization)


def _reply(model, processor, turns, images, args, out=None, videos=()) -> str:
  """Streams one assistant reply to `out` as tokens come; stops at EOS, the template's stop string or the limit.

  The text comes from `llava_jax.decoding.Detokenizer`, as the server's: what it shows always ends as the full
  decode of the reply (byte-fallback tokens and half characters are held back until final)."""
  import jax.numpy as jnp

  from llava_jax.decoding import Detokenizer, byte_token_ids
  from llava_jax.generation import stream

  out = out or sys.stdout
  images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
  videos = list(videos)
  media = {"videos": videos} if videos else {}  # OneVision's; other processors take none
  several = {"image": len(images), "videos": len(videos)} if len(images) > 1 or videos else {"image": bool(images)}
  inputs = processor(processor.prompt(turns, **several), images or None, **media)
  max_new_tokens = args.max_new_tokens
  context = model.config.text.max_position_embeddings
  room = context - inputs["input_ids"].shape[1]
  if max_new_tokens > room:  # the prompt fits (the processor checked); the reply is cut at the context's end
    print(f"note: --max-new-tokens {max_new_tokens} lowered to {room}: the prompt takes "
          f"{inputs['input_ids'].shape[1]} of the model's {context} positions", file=sys.stderr)
    max_new_tokens = max(room, 1)  # the first new token needs no position of its own
  pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
  eos = processor.tokenizer.eos_token_id
  text = Detokenizer(processor.decode, [processor.template.stop_str or ""], byte_token_ids(processor.tokenizer))
  for token in stream(model, inputs["input_ids"], pixels, inputs["attention_mask"],
                      max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      top_k=getattr(args, "top_k", 0), eos_token_id=eos, seed=args.seed,
                      image_sizes=inputs.get("image_sizes"),  # NeXT, OneVision
                      pixel_values_videos=inputs.get("pixel_values_videos")):
    if int(token[0]) == eos:
      break
    out.write(text.add(int(token[0])))
    out.flush()
    if text.stopped:
      break
  out.write(text.finish() + "\n")
  return text.text.strip()


def _generate(args):
  images, videos = _read_images(args.image), _read_videos(args.video)  # before the (slow) model load
  model, processor = _load_for_generation(args, images, videos)
  _reply(model, processor, [args.prompt], images, args, videos=videos)


def _chat(args):
  images, videos = _read_images(args.image), _read_videos(args.video)
  model, processor = _load_for_generation(args, images, videos)
  turns = []
  about = ", ".join((args.image or []) + (args.video or [])) or "nothing in particular"
  print(f"chatting about {about} (template {processor.template.name}); an empty line or Ctrl-D ends")
  while True:
    try:
      user = input("USER: ").strip()
    except EOFError:
      break
    if not user:
      break
    turns.append(user)
    print("ASSISTANT: ", end="", flush=True)
    turns.append(_reply(model, processor, turns, images, args, videos=videos))


def _add_generation_flags(p):
  p.add_argument("--ckpt", required=True, help="checkpoint directory (llava-jax convert / train)")
  p.add_argument("--image", action="append", help="image file; repeat it for several (LLaVA-OneVision)")
  p.add_argument("--video", action="append", metavar="DIR", help="a folder of frame images, sorted by name, as one "
                 "video (LLaVA-OneVision); may repeat")
  p.add_argument("--temperature", type=float, default=0.2, help="0 for greedy (default 0.2, as the reference)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0: off)")
  p.add_argument("--max-new-tokens", type=_positive_int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--template", help="conversation template (default: the checkpoint's; LLaVA-OneVision: "
                 "llava_onevision_hf for llava-hf ones, qwen_1_5 for original ones; else vicuna_v1)")
  p.add_argument("--aspect-ratio", choices=["pad", "crop"], help="image handling (default: checkpoint's, else pad)")
  p.add_argument("--tokenization", choices=["hf", "reference"],
                 help="prompt ids as transformers' processor or the original LLaVA makes them (default: checkpoint's)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")


def _demo(args):
  from llava_jax import demo

  steps = {k: v for k, v in (("stage1_steps", args.stage1_steps), ("stage2_steps", args.stage2_steps)) if v}
  demo.run(args.workdir, **steps)  # unset: demo.run's defaults


def _eval(args):
  from llava_jax.eval import evaluate

  if (args.ckpt is None) == (args.answers is None):
    raise ValueError("give exactly one of --ckpt (generate, then score) and --answers (score an answers file)")
  evaluate(args.task, args.data, args.out, ckpt=args.ckpt, answers=args.answers, template=args.template,
           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_bucket=args.prompt_bucket,
           dtype=args.dtype, limit=args.limit, progress=not args.quiet)


def _serve_flags(p):
  """Every flag is checked here (argparse: exit 2 with usage) or in `serve.check_limits` before the model loads."""
  p.add_argument("--ckpt", required=True, help="checkpoint directory (llava-jax convert / train)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  p.add_argument("--port", type=_port, default=8000)
  p.add_argument("--max-batch", type=_positive_int, default=8, help="rows decoded together in one compiled step")
  p.add_argument("--max-tokens", type=_positive_int, default=512, help="cap (and default) of a reply's max_tokens")
  p.add_argument("--max-len", type=_positive_int, help="positions per row: prompt + reply (default: the "
                 "model's context, at most 2048, + --max-tokens)")
  p.add_argument("--page-size", type=_positive_int, help="positions per KV page (default 16)")
  p.add_argument("--max-kv-tokens", type=_positive_int, help="the KV pool's most positions, all rows and the prefix "
                 "cache together; it starts small and doubles up to this (default: --max-batch x --max-len)")
  p.add_argument("--prefix-cache-tokens", type=_non_negative_int, help="positions of finished rows' pages kept for "
                 "prompts that begin the same, e.g. a chat's next turn (default: half of --max-kv-tokens; 0: off)")
  p.add_argument("--image-cache", type=_non_negative_int, help="images whose features are kept for the next turn "
                 "(default 64; 0: off)")
  p.add_argument("--prefill-chunk", type=_positive_int, help="prompt tokens prefilled per engine iteration, between "
                 "decode steps (default 256)")
  p.add_argument("--decode-prefill-chunk", type=_positive_int, help="the same while other rows are decoding: each "
                 "chunk delays their next token by its time, but small chunks slow every new request under load (default: "
                 "--prefill-chunk)")
  p.add_argument("--prompt-bucket", type=_positive_int, default=32, help="prompts are padded to a multiple of this "
                 "(one compiled prefill per bucket)")
  p.add_argument("--max-queue", type=_positive_int, default=64, help="requests waiting for a row; more get 429")
  p.add_argument("--max-body-bytes", type=_positive_int, help="largest request body in bytes; a larger one gets "
                 "413 unread (default 20 MiB, room for a large photo as a base64 data URI)")
  p.add_argument("--template", help="conversation template (default: the checkpoint's; LLaVA-OneVision: "
                 "llava_onevision_hf for llava-hf ones, qwen_1_5 for original ones; else vicuna_v1)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
  p.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")


def _serve(args, web: bool = False):
  import logging

  import uvicorn

  from llava_jax import serve

  if not args.host:
    raise ValueError("--host must name an address, e.g. 127.0.0.1")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  served = serve.load(args.ckpt, max_batch=args.max_batch, max_len=args.max_len, max_tokens=args.max_tokens,
                      prompt_bucket=args.prompt_bucket, max_queue=args.max_queue, template=args.template,
                      dtype=args.dtype, allow_local_images=getattr(args, "allow_local_images", None),
                      model_name=args.model_name, max_body_bytes=args.max_body_bytes,
                      **{name: getattr(args, name) for name in serve.MEMORY_SETTINGS})
  if web:
    from llava_jax.serve.web import create_web_app

    app = create_web_app(served)
  else:
    from llava_jax.serve.api import create_app

    app = create_app(served)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
  finally:
    served.engine.close()


def build_parser() -> argparse.ArgumentParser:
  from llava_jax.eval.tasks import TASKS  # the eval command's choices: the registry's tasks

  parser = argparse.ArgumentParser(prog="llava-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="Hugging Face weights -> Orbax checkpoint directory",
                     description="--hf DIR (llava-hf); --hf DIR --clip DIR (original LLaVA + its CLIP or SigLIP); "
                                 "--clip DIR --llm DIR (fresh stage-1 start, projector initialised)")
  p.add_argument("--hf", help="llava-hf directory (llava, llava_next, llava_onevision), or an original LLaVA "
                              "(LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaQwenForCausalLM) one")
  p.add_argument("--clip", help="vision tower checkpoint directory: CLIP or SigLIP, whole model or vision model")
  p.add_argument("--llm", help="LlamaForCausalLM checkpoint directory")
  p.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="target dtype (default: as stored)")
  p.add_argument("--projector", default="mlp2x_gelu", choices=["mlp2x_gelu", "linear"],
                 help="projector type for --clip/--llm (mlp2x_gelu: LLaVA-1.5, linear: LLaVA-1.0)")
  p.add_argument("--seed", type=int, default=0, help="seed of the fresh projector")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=_convert)

  p = sub.add_parser("export-hf", help="Orbax checkpoint -> transformers LlavaForConditionalGeneration directory")
  p.add_argument("--ckpt", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="export dtype (default: as stored)")
  p.add_argument("--max-shard-gb", type=float, default=5.0)
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=_export)

  p = sub.add_parser("generate", help="answer one prompt about an image, streamed")
  _add_generation_flags(p)
  p.add_argument("--prompt", required=True)
  p.set_defaults(func=_generate)

  p = sub.add_parser("chat", help="multi-turn chat about an image")
  _add_generation_flags(p)
  p.set_defaults(func=_chat)

  sub.add_parser("train", help="train from a config: llava-jax train --config configs/tiny.py:stage1 --workdir W "
                 "[--config.key=value ...]; rerun to resume")

  p = sub.add_parser("eval", help="answer a benchmark's questions (reference layout) and score them as the reference",
                     description="llava-jax eval --task TASK --data DIR --ckpt CKPT --out OUT (generate, then score); "
                                 "--answers FILE instead of --ckpt scores an existing answers file. Rerunning into "
                                 "the same OUT resumes. See docs/EVALUATION.md.")
  p.add_argument("--task", required=True, choices=list(TASKS))
  p.add_argument("--data", required=True, help="the task's folder, e.g. playground/data/eval/pope")
  p.add_argument("--out", required=True, help="output folder: answers.jsonl, metrics.json, run.json")
  p.add_argument("--ckpt", help="checkpoint directory to generate the answers with")
  p.add_argument("--answers", help="an answers file (the reference's format) to score instead of generating")
  p.add_argument("--template", help="conversation template (default: the checkpoint's; LLaVA-OneVision: "
                 "llava_onevision_hf for llava-hf ones, qwen_1_5 for original ones; else vicuna_v1)")
  p.add_argument("--batch-size", type=_positive_int, default=8,
                 help="rows per generate call, >= 1 (rounded up to the devices)")
  p.add_argument("--max-new-tokens", type=_positive_int, help="default: the reference's for the task (128, or 1024)")
  p.add_argument("--prompt-bucket", type=_positive_int, default=32,
                 help="prompts are left-padded to a multiple of this (>= 1)")
  p.add_argument("--limit", type=_non_negative_int, help="only the first N questions (N >= 0)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=_eval)

  p = sub.add_parser("serve", help="OpenAI-compatible chat completions server (batches concurrent requests)",
                     description="POST /v1/chat/completions (stream too), GET /v1/models, /health, /metrics. "
                                 "See docs/SERVING.md.")
  _serve_flags(p)
  p.add_argument("--allow-local-images", metavar="DIR", help="also accept image paths inside DIR (default: only "
                 "base64 data URIs)")
  p.set_defaults(func=_serve)

  p = sub.add_parser("web", help="Gradio chat page (image upload, chat, regenerate) on the batching engine")
  _serve_flags(p)
  p.set_defaults(func=lambda args: _serve(args, web=True), port=7860)

  p = sub.add_parser("demo", help="the main job on the tiny default: make data and weights, convert, train "
                     "stage 1 and 2, answer held-out questions")
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--stage1-steps", type=int, help="default: demo.run's")
  p.add_argument("--stage2-steps", type=int, help="default: demo.run's")
  p.set_defaults(func=_demo)
  return parser


def main(argv=None):
  """Console entry; argv None means this call is the process's own entry (the console script, `python -m`)."""
  own_process = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # its flags are the config's own (ml_collections), parsed in llava_jax/train/cli.py
    from llava_jax.train.cli import main as train_main

    return train_main(argv[1:], own_process=own_process)
  args = build_parser().parse_args(argv)
  if own_process:
    from llava_jax.cpu_defaults import apply_cpu_flags
    apply_cpu_flags()  # before JAX starts (CPU-only runs only): the XLA:CPU flags of docs/PERFORMANCE.md
  try:
    args.func(args)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
    print(f"llava-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
