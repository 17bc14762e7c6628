"""`llava-jax` console script. Subcommands: convert, export-hf, demo (training and generation join as they land)."""

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


def _demo(args):
  from llava_jax import demo

  demo.run(args.workdir)


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

  p = sub.add_parser("demo", help="the tiny end-to-end job on locally made weights")
  p.add_argument("--workdir", default="runs/demo")
  p.set_defaults(func=_demo)
  return parser


def main(argv=None):
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"llava-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
