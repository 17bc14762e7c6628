"""`llava-jax` console script: convert, export-hf, generate, chat, demo."""

from __future__ import annotations

import argparse
import sys


def _convert(args):
  from llava_jax.convert import convert_checkpoint

  cfg = convert_checkpoint(args.out, hf=args.hf, clip=args.clip, llm=args.llm, projector_type=args.projector,
                           dtype=args.dtype, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
  t, v = cfg.text, cfg.vision
  print(f"wrote {args.out}: LLaMA {t.num_hidden_layers}x{t.hidden_size} (vocab {t.vocab_size}), CLIP "
        f"{v.num_hidden_layers}x{v.hidden_size} at {v.image_size}px, {cfg.projector_type} projector, "
        f"{cfg.param_dtype}")


def _export(args):
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.convert import export_hf

  model = load_checkpoint(args.ckpt, dtype=args.dtype)
  export_hf(model, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
  print(f"wrote {args.out}")


def _load_for_generation(args):
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.processor import Processor

  model = load_checkpoint(args.ckpt, dtype=args.dtype)
  return model, Processor.from_model(model, template=args.template, aspect_ratio=args.aspect_ratio)


def _reply(model, processor, turns, image, args, out=None) -> str:
  """Streams one assistant reply to `out` as tokens come; stops at EOS, the template's stop string or the limit.

  Text is shown only up to a complete character: byte-fallback tokens can end mid-way through one."""
  import jax.numpy as jnp

  from llava_jax.generate import stop_at, stream

  out = out or sys.stdout
  inputs = processor(processor.prompt(turns, image=image is not None), [image] if image is not None else None)
  pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
  eos = processor.tokenizer.eos_token_id
  stops = [s for s in (processor.template.stop_str,) if s]
  ids, shown = [], ""

  def show(text):
    nonlocal shown
    if text.startswith(shown):
      out.write(text[len(shown):])
      out.flush()
      shown = text

  for token in stream(model, inputs["input_ids"], pixels, inputs["attention_mask"],
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      eos_token_id=eos, seed=args.seed):
    if int(token[0]) == eos:
      break
    ids.append(int(token[0]))
    text, stopped = stop_at(processor.decode(ids), stops)
    if stopped:
      break
    if not text.endswith("\ufffd"):
      show(text)
  final = stop_at(processor.decode(ids), stops)[0]
  show(final)  # the rest, unless decoding rewrote text already shown (it can, mid-way through a character)
  out.write("\n")
  return final.strip()


def _generate(args):
  model, processor = _load_for_generation(args)
  _reply(model, processor, [args.prompt], args.image, args)


def _chat(args):
  model, processor = _load_for_generation(args)
  turns = []
  print(f"chatting about {args.image} (template {processor.template.name}); an empty line or Ctrl-D ends")
  while True:
    try:
      user = input("USER: ").strip()
    except EOFError:
      break
    if not user:
      break
    turns.append(user)
    print("ASSISTANT: ", end="", flush=True)
    turns.append(_reply(model, processor, turns, args.image, args))


def _add_generation_flags(p):
  p.add_argument("--ckpt", required=True, help="checkpoint directory (llava-jax convert / train)")
  p.add_argument("--image", help="image file")
  p.add_argument("--temperature", type=float, default=0.2, help="0 for greedy (default 0.2, as the reference)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--template", help="conversation template (default: the checkpoint's, else vicuna_v1)")
  p.add_argument("--aspect-ratio", choices=["pad", "crop"], help="image handling (default: checkpoint's, else pad)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")


def _demo(args):
  from llava_jax import demo

  steps = {k: v for k, v in (("stage1_steps", args.stage1_steps), ("stage2_steps", args.stage2_steps)) if v}
  demo.run(args.workdir, **steps)  # unset: demo.run's defaults


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llava-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="Hugging Face weights -> Orbax checkpoint directory",
                     description="--hf DIR (llava-hf); --hf DIR --clip DIR (original LLaVA + its CLIP); "
                                 "--clip DIR --llm DIR (fresh stage-1 start, projector initialised)")
  p.add_argument("--hf", help="llava-hf directory, or an original LLaVA (LlavaLlamaForCausalLM) one")
  p.add_argument("--clip", help="CLIP or CLIPVision checkpoint directory")
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

  p = sub.add_parser("demo", help="the main job on the tiny default: make data and weights, convert, train "
                     "stage 1 and 2, answer held-out questions")
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--stage1-steps", type=int, help="default: demo.run's")
  p.add_argument("--stage2-steps", type=int, help="default: demo.run's")
  p.set_defaults(func=_demo)
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # its flags are the config's own (ml_collections), parsed in llava_jax/train/cli.py
    from llava_jax.train.cli import main as train_main

    return train_main(argv[1:])
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
    print(f"llava-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
