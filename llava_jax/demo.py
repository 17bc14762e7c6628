"""The main job on the tiny built-in default, on weights and data it makes locally (no downloads):

  1. a synthetic "shapes and colours" corpus (captions, questions, a held-out split) and a SentencePiece tokenizer
  2. a tiny random CLIP and a tiny random LLaMA, written as Hugging Face checkpoints
  3. `convert --clip --llm`: the stage-1 start, projector freshly initialised
  4. stage 1 (projector only, `plain` captions), then stage 2 (projector + LLM, `vicuna_v1` Q&A)
  5. greedy answers to the held-out questions, scored: the fraction naming the asked colour / shape / background
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from flax import nnx

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.convert import convert_checkpoint, iter_hf_tensors
from llava_jax.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llava_jax.models.llava import Llava
from llava_jax.safetensors_io import write_safetensors

TINY_VISION = VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=7)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


def write_tiny_hf_parts(root: str, tokenizer_dir: str, seed: int = 0) -> tuple[str, str]:
  """A random CLIP vision tower and a random LLaMA (vocabulary from the tokenizer) as HF checkpoint directories,
  in the layouts the hub uses (`vision_model.*`; `model.*` + `lm_head.*`)."""
  import transformers

  vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
  text = TextConfig(vocab_size=vocab, **TINY_TEXT)
  cfg = LlavaConfig(vision=TINY_VISION, text=text, image_token_index=vocab)
  params = nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
  clip_dir, llm_dir = os.path.join(root, "clip"), os.path.join(root, "llm")
  os.makedirs(clip_dir), os.makedirs(llm_dir)
  clip, llm = {}, {}
  for key, array in iter_hf_tensors(cfg, params):
    if key.startswith("vision_tower."):
      clip["vision_model." + key[len("vision_tower."):]] = array
    elif key.startswith("language_model.model."):
      llm["model." + key[len("language_model.model."):]] = array
    elif key.startswith("language_model.lm_head."):
      llm[key[len("language_model."):]] = array
  write_safetensors(clip, clip_dir)
  write_safetensors(llm, llm_dir)
  v = TINY_VISION
  vision_json = transformers.CLIPVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size).to_dict()
  llm_json = transformers.LlamaConfig(vocab_size=vocab, rms_norm_eps=text.rms_norm_eps, bos_token_id=1,
                                      eos_token_id=2, **TINY_TEXT).to_dict()
  llm_json["architectures"] = ["LlamaForCausalLM"]
  processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": v.image_size},
               "crop_size": {"height": v.image_size, "width": v.image_size}, "do_resize": True,
               "do_center_crop": True, "do_rescale": True, "do_normalize": True, "resample": 3,
               "rescale_factor": 1 / 255, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
  for folder, name, content in ((clip_dir, "config.json", vision_json), (llm_dir, "config.json", llm_json),
                                (clip_dir, "preprocessor_config.json", processor)):
    with open(os.path.join(folder, name), "w") as f:
      json.dump(content, f, indent=1)
  for name in os.listdir(tokenizer_dir):
    shutil.copy2(os.path.join(tokenizer_dir, name), llm_dir)
  return clip_dir, llm_dir


def tiny_config_path() -> str:
  """configs/tiny.py of this checkout (the package is installed editable, as README says)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the demo from a checkout installed with `pip install -e .`")
  return path


def train_stage(stage: str, workdir: str, init: str, json_path: str, image_dir: str, steps: int, lr: float,
                batch: int = 16, seq_len: int = 160) -> None:
  """One `llava-jax train` run, exactly as a user would start it."""
  from llava_jax.train.cli import main as train_main

  code = train_main([
      "--config", f"{tiny_config_path()}:{stage}", "--workdir", workdir, f"--config.init_checkpoint={init}",
      "--config.data.kind=llava", f"--config.data.json_path={json_path}", f"--config.data.image_dir={image_dir}",
      f"--config.data.seq_len={seq_len}", f"--config.batch_size={batch}", f"--config.total_steps={steps}",
      f"--config.optimizer.lr={lr}", f"--config.checkpoint.every_steps={steps}", "--config.log.every_steps=50",
      "--config.log.tensorboard=False"])
  if code:
    raise SystemExit(f"{stage} training failed (exit {code})")


def evaluate(ckpt: str, eval_json: str, image_dir: str, template: str = "vicuna_v1") -> tuple[float, list]:
  """Greedy answers to the held-out questions through `llava-jax eval`: eval.json is written as the `shapes` task
  (the reference's layout) next to it and scored by the evaluator; an answer counts when its first word is the
  expected one. Returns the accuracy and (question, expected, answer) per question."""
  from llava_jax.checkpoint import load_checkpoint
  from llava_jax.eval.runner import evaluate as run_eval, read_answers
  from llava_jax.eval.tasks import write_shapes_task
  from llava_jax.processor import Processor

  model = load_checkpoint(ckpt)
  proc = Processor.from_model(model, template=template)
  with open(eval_json) as f:
    samples = json.load(f)
  root = os.path.dirname(os.path.abspath(eval_json))
  data = write_shapes_task(os.path.join(root, "shapes_task"), samples, image_dir)
  out = os.path.join(root, "shapes_eval")
  shutil.rmtree(out, ignore_errors=True)  # a fresh score for this checkpoint, not a resumed one
  metrics = run_eval("shapes", data, out, model=model, processor=proc, batch_size=16, progress=False,
                     print_fn=lambda *_: None)
  answers = {a["question_id"]: a["text"] for a in read_answers(os.path.join(out, "answers.jsonl"))}
  results = [(s["conversations"][0]["value"].split("\n")[-1], s["conversations"][1]["value"], answers.get(i, ""))
             for i, s in enumerate(samples)]
  return metrics["accuracy"], results


def _first_word(text: str) -> str:
  words = text.lower().replace(".", " ").split()
  return words[0] if words else ""


# The demo's images: shapes that fill most of a near-square frame, anti-aliased. On 24-48 px images with small,
# aliased shapes the tiny model named the shape 59% of the time (colour and background 100%): at 56 px and patch 7
# a shape spanned two or three patches.
DEMO_IMAGES = dict(min_size=56, max_size=64, radius=(0.35, 0.48), supersample=4)


def run(workdir: str, num_train: int = 2000, num_eval: int = 200, stage1_steps: int = 100,
        stage2_steps: int = 1600, seed: int = 0) -> dict:
  from llava_jax.data.synthetic import build_tokenizer, tokenizer_training_text, write_shapes_corpus

  t0 = time.time()
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  data = write_shapes_corpus(os.path.join(workdir, "data"), num_train=num_train, num_eval=num_eval, seed=seed,
                             **DEMO_IMAGES)
  tokenizer = build_tokenizer(os.path.join(workdir, "tokenizer"), tokenizer_training_text(seed))
  print(f"[1/5] wrote {num_train} training and {num_eval} held-out images with captions and questions, and a "
        f"tokenizer ({time.time() - t0:.0f}s)")
  clip_dir, llm_dir = write_tiny_hf_parts(os.path.join(workdir, "hf"), tokenizer, seed)
  print(f"[2/5] made a tiny random CLIP ({clip_dir}) and LLaMA ({llm_dir}) as Hugging Face checkpoints")
  ckpt = os.path.join(workdir, "ckpt")
  convert_checkpoint(ckpt, clip=clip_dir, llm=llm_dir, progress=False)
  print(f"[3/5] converted them into {ckpt}: the stage-1 start, projector freshly initialised")
  stage1, stage2 = os.path.join(workdir, "stage1"), os.path.join(workdir, "stage2")
  train_stage("stage1", stage1, ckpt, data["stage1"], data["image_dir"], stage1_steps, lr=1e-3)
  print(f"[4/5] stage 1 (projector) and ...  ({time.time() - t0:.0f}s)")
  train_stage("stage2", stage2, stage1, data["stage2"], data["image_dir"], stage2_steps, lr=1e-3)
  print(f"      ... stage 2 (projector + LLM) trained ({time.time() - t0:.0f}s)")
  accuracy, results = evaluate(stage2, data["eval"], data["image_dir"])
  for question, expected, answer in results[:5]:
    print(f"      Q: {question!r}  expected {expected!r}  model: {answer!r}")
  by_kind = {}
  for question, expected, answer in results:
    kind = "background" if "background" in question else "colour" if "colour" in question else "shape"
    by_kind.setdefault(kind, []).append(_first_word(answer) == _first_word(expected))
  detail = ", ".join(f"{k} {np.mean(v):.0%} of {len(v)}" for k, v in sorted(by_kind.items()))
  print(f"[5/5] held-out accuracy: {accuracy:.1%} of {len(results)} questions ({detail})")
  print(f"done in {time.time() - t0:.0f}s")
  return {"accuracy": accuracy, **{k: float(np.mean(v)) for k, v in by_kind.items()}}

