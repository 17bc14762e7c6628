"""A tiny synthetic "shapes and colours" corpus in LLaVA's format, and a tokenizer for it.

The demo, the tests and the notebooks need data and a tokenizer without downloads.
`write_shapes_corpus` draws one coloured shape on a plain background per image and
writes three LLaVA JSON files next to the images:

  stage1.json  captions, the LLaVA-Pretrain shape ("<image>" + instruction / caption)
  stage2.json  questions with one-word answers (colour, shape, background), some
               multi-turn, about 10% text-only, the llava_v1_5_mix665k shape
  eval.json    held-out images with one question each (different seed stream)

`build_tokenizer` trains a small LLaMA-style SentencePiece model (BPE with byte
fallback, BOS added) on text like the corpus and saves it where
`transformers.AutoTokenizer.from_pretrained` can load it.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 170), "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}

_CAPTION_PROMPTS = (
    "<image>\nDescribe the image briefly.",
    "Give a brief description of the image.\n<image>",
    "<image>\nWhat is in the picture?",
    "Summarize the visual content of the image.\n<image>",
)
_QUESTIONS = {
    "colour": ("What colour is the shape?", "What is the colour of the shape?"),
    "shape": ("What shape is this?", "Which shape is shown?"),
    "background": ("What colour is the background?",),
}
_TEXT_ONLY = (
    ("What colour do you get by mixing red and yellow?", "Orange."),
    ("What colour do you get by mixing blue and yellow?", "Green."),
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("What colour is the sky on a clear day?", "Blue."),
)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "square":
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "triangle":
    return [(cx, cy - r), (cx + r * 0.94, cy + r * 0.75), (cx - r * 0.94, cy + r * 0.75)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
  if shape == "star":
    angles = np.arange(10) * np.pi / 5 - np.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return [(cx + float(a) * np.cos(t), cy + float(a) * np.sin(t)) for a, t in zip(radii, angles)]
  raise ValueError(shape)


def draw_shape(shape: str, colour: str, background: str, size: tuple[int, int],
               rng: np.random.Generator, radius: tuple[float, float] = (0.25, 0.4),
               supersample: int = 1) -> Image.Image:
  """One RGB image: `shape` filled with `colour`, at a random place, on `background`.

  The shape's radius is a `radius` fraction of the shorter side. `supersample` > 1 draws at that many times the
  size and downsamples (Lanczos), which anti-aliases the edges.
  """
  w, h = size[0] * supersample, size[1] * supersample
  img = Image.new("RGB", (w, h), BACKGROUNDS[background])
  draw = ImageDraw.Draw(img)
  r = float(rng.uniform(*radius)) * min(w, h)
  cx = float(rng.uniform(r, w - r))
  cy = float(rng.uniform(r, h - r))
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
  else:
    draw.polygon(_polygon(shape, cx, cy, r), fill=COLOURS[colour])
  return img.resize(size, Image.LANCZOS) if supersample > 1 else img


def _sample_scene(rng: np.random.Generator, min_size: int, max_size: int):
  shape = SHAPES[rng.integers(len(SHAPES))]
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  size = (int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1)))
  return shape, colour, background, size


def _answer(kind: str, shape: str, colour: str, background: str) -> str:
  word = {"colour": colour, "shape": shape, "background": background}[kind]
  return word.capitalize() + "."


def write_shapes_corpus(out_dir: str, num_train: int = 200, num_eval: int = 50, seed: int = 0,
                        min_size: int = 24, max_size: int = 48, radius: tuple[float, float] = (0.25, 0.4),
                        supersample: int = 1) -> dict[str, str]:
  """Writes images/ and stage1.json, stage2.json, eval.json under `out_dir`.

  Image sides are drawn from [min_size, max_size]; `radius` and `supersample` are passed to `draw_shape`.

  Returns the paths: {"image_dir", "stage1", "stage2", "eval"}.
  """
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  stage1, stage2, held_out = [], [], []

  for i in range(num_train):
    shape, colour, background, size = _sample_scene(train_rng, min_size, max_size)
    name = f"train_{i:06d}.png"
    draw_shape(shape, colour, background, size, train_rng, radius, supersample).save(os.path.join(image_dir, name))
    article = "An" if colour[0] in "aeiou" else "A"
    stage1.append({
        "id": f"shapes-cap-{i:06d}", "image": name,
        "conversations": [
            {"from": "human", "value": _CAPTION_PROMPTS[train_rng.integers(len(_CAPTION_PROMPTS))]},
            {"from": "gpt", "value": f"{article} {colour} {shape} on a {background} background."},
        ]})
    kinds = list(_QUESTIONS)
    train_rng.shuffle(kinds)
    turns = []
    for k, kind in enumerate(kinds[:int(train_rng.integers(1, 4))]):
      question = _QUESTIONS[kind][train_rng.integers(len(_QUESTIONS[kind]))]
      if k == 0:
        question = question + "\n<image>" if train_rng.random() < 0.3 else "<image>\n" + question
      turns += [{"from": "human", "value": question},
                {"from": "gpt", "value": _answer(kind, shape, colour, background)}]
    stage2.append({"id": f"shapes-qa-{i:06d}", "image": name, "conversations": turns})
    if i % 10 == 9:
      question, answer = _TEXT_ONLY[train_rng.integers(len(_TEXT_ONLY))]
      stage2.append({"id": f"shapes-text-{i:06d}", "conversations": [
          {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})

  for i in range(num_eval):
    shape, colour, background, size = _sample_scene(eval_rng, min_size, max_size)
    name = f"eval_{i:06d}.png"
    draw_shape(shape, colour, background, size, eval_rng, radius, supersample).save(os.path.join(image_dir, name))
    kind = list(_QUESTIONS)[eval_rng.integers(len(_QUESTIONS))]
    held_out.append({
        "id": f"shapes-eval-{i:06d}", "image": name,
        "conversations": [
            {"from": "human", "value": "<image>\n" + _QUESTIONS[kind][0]},
            {"from": "gpt", "value": _answer(kind, shape, colour, background)},
        ]})

  paths = {"image_dir": image_dir}
  for key, records in (("stage1", stage1), ("stage2", stage2), ("eval", held_out)):
    paths[key] = os.path.join(out_dir, f"{key}.json")
    with open(paths[key], "w") as f:
      json.dump(records, f, indent=1)
  return paths


def tokenizer_training_text(seed: int = 0, num_lines: int = 400) -> list[str]:
  """Lines like the corpus and the templates' fixed strings, for `build_tokenizer`."""
  # Imported here so that this module does not pull the templates in at import time.
  from llava_jax.data.conversation import TEMPLATES  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  words = (list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) +
           "the a an is what which colour of on in background image picture shape shown brief "
           "description describe summarize visual content sides does how many have sky day clear "
           "mixing get you and yellow three four".split())
  # qwen_1_5 is left out: its tokenizer is `build_qwen_tokenizer`'s, and this text (so every tiny SentencePiece
  # model trained on it) stays as it was.
  lines = [t.system for t in TEMPLATES.values() if t.system and t.name != "qwen_1_5"]
  lines += ["USER: hello ASSISTANT: hi", "[INST] question [/INST] answer", "Answer the questions."]
  for q, a in _TEXT_ONLY:
    lines.append(q + " " + a)
  for _ in range(num_lines):
    n = int(rng.integers(3, 14))
    text = " ".join(words[int(j)] for j in rng.integers(len(words), size=n))
    lines.append(text[0].upper() + text[1:] + [".", "?", "!", ","][int(rng.integers(4))])
  return lines


def build_tokenizer(folder: str, lines: Iterable[str] | None = None, vocab_size: int = 600,
                    legacy: bool = False, special_tokens: Iterable[str] = ()) -> str:
  """Trains a LLaMA-style SentencePiece model and saves a loadable tokenizer in `folder`.

  BPE with byte fallback (no unknown tokens), ids unk=0, bos=1, eos=2 like LLaMA, BOS
  added and EOS not. `special_tokens` (e.g. "<|im_start|>", "<|im_end|>" for ChatML)
  are registered as added special tokens. Returns `folder`.
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  lines = list(tokenizer_training_text() if lines is None else lines)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      character_coverage=1.0, allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  config = {
      "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True,
      "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
      "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
  }
  special_tokens = list(special_tokens)
  if special_tokens:
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    config["added_tokens_decoder"] = {
        str(size + i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False}
        for i, tok in enumerate(special_tokens)}
    config["additional_special_tokens"] = special_tokens
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)
  return folder


def _byte_alphabet() -> list[str]:
  """The 256 byte-level BPE characters in GPT-2's (and Qwen2's) id order: printable bytes first, the rest shifted
  past 255. So "\\n" gets id 198, as in Qwen2, whose "\\n" id `preprocess_qwen` hard-codes."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  chars, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in chars:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in [*printable, *(b for b in range(256) if b not in printable)]]


def build_qwen_tokenizer(folder: str, lines: Iterable[str] | None = None, num_merges: int = 300) -> str:
  """A tiny Qwen2 tokenizer (byte-level BPE, no BOS) saved in `folder` for `AutoTokenizer.from_pretrained`.

  The merges are learned here on `lines`; the ids are Qwen2's layout in small: the 256 bytes (so "\\n" is 198),
  the merges, then <|endoftext|> (EOS and pad), <|im_start|> and <|im_end|> as special tokens. Returns `folder`.
  """
  from tokenizers import Tokenizer, models, normalizers, trainers  # pylint: disable=import-outside-toplevel
  from transformers import Qwen2Tokenizer  # pylint: disable=import-outside-toplevel

  lines = list(tokenizer_training_text() if lines is None else lines)
  lines += ["<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"]
  probe = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_byte_alphabet())}, merges=[])
  bpe = Tokenizer(models.BPE())
  bpe.normalizer = normalizers.NFC()
  bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
  alphabet = _byte_alphabet()
  bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, show_progress=False,
                                                     initial_alphabet=alphabet, special_tokens=[]))
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  vocab = {c: i for i, c in enumerate(alphabet)}
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", model_max_length=1 << 20,
                             extra_special_tokens=["<|im_start|>", "<|im_end|>"])
  tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tokenizer.save_pretrained(folder)
  return folder
