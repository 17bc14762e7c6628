"""The synthetic shapes corpus: deterministic, well-formed, usable by every stage."""

import filecmp
import json
import os

import numpy as np
import transformers
from PIL import Image

from llava_jax.data import synthetic, text


def test_corpus_is_deterministic_and_well_formed(tmp_path):
  a = synthetic.write_shapes_corpus(str(tmp_path / "a"), num_train=30, num_eval=10, seed=7)
  b = synthetic.write_shapes_corpus(str(tmp_path / "b"), num_train=30, num_eval=10, seed=7)
  c = synthetic.write_shapes_corpus(str(tmp_path / "c"), num_train=30, num_eval=10, seed=8)
  for key in ("stage1", "stage2", "eval"):
    assert filecmp.cmp(a[key], b[key], shallow=False)
    assert not filecmp.cmp(a[key], c[key], shallow=False)
  names = sorted(os.listdir(a["image_dir"]))
  assert names == sorted(os.listdir(b["image_dir"])) and len(names) == 40
  for name in names:
    assert filecmp.cmp(os.path.join(a["image_dir"], name), os.path.join(b["image_dir"], name), shallow=False)

  stage1, stage2, held_out = (json.load(open(a[k])) for k in ("stage1", "stage2", "eval"))
  assert len(stage1) == 30 and len(held_out) == 10
  train_images = {r["image"] for r in stage1}
  assert not train_images & {r["image"] for r in held_out}  # held-out images are new
  text_only = [r for r in stage2 if "image" not in r]
  assert len(text_only) == 3 and len(stage2) == 33
  assert any(len(r["conversations"]) > 2 for r in stage2)
  for r in held_out:
    answer = r["conversations"][1]["value"]
    assert answer.endswith(".") and len(answer.split()) == 1
  img = Image.open(os.path.join(a["image_dir"], stage1[0]["image"]))
  assert img.mode == "RGB" and 24 <= min(img.size) and max(img.size) <= 48
  # The shape's colour is really there.
  caption = stage1[0]["conversations"][1]["value"]
  colour = next(c for c in synthetic.COLOURS if f" {c} " in caption)
  pixels = np.asarray(img).reshape(-1, 3)
  assert (np.abs(pixels - np.array(synthetic.COLOURS[colour])).sum(1) == 0).sum() > 20


def test_every_sample_tokenizes_cleanly(tmp_path):
  paths = synthetic.write_shapes_corpus(str(tmp_path / "s"), num_train=40, num_eval=10)
  tok = transformers.AutoTokenizer.from_pretrained(synthetic.build_tokenizer(str(tmp_path / "tok")))
  assert tok("Red circle").input_ids[0] == tok.bos_token_id
  for key, template in (("stage1", "plain"), ("stage2", "vicuna_v1"), ("eval", "vicuna_v1"),
                        ("stage2", "llava_llama_2")):
    for record in json.load(open(paths[key])):
      ids, labels = text.preprocess_conversation(record["conversations"], tok, template, 8, 512, len(tok),
                                                 has_image="image" in record, sample_id=record["id"])
      assert (labels != text.IGNORE_INDEX).any()
      assert ((ids == len(tok)).sum() == 8) == ("image" in record)


def test_radius_sets_the_shape_size_and_supersampling_antialiases():
  def draw(radius, supersample):
    img = synthetic.draw_shape("square", "red", "white", (60, 60), np.random.default_rng(0), radius, supersample)
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    pure = lambda rgb: (np.abs(pixels - np.array(rgb)).sum(1) == 0).mean()
    red, white = pure(synthetic.COLOURS["red"]), pure(synthetic.BACKGROUNDS["white"])
    return red, 1 - red - white  # shape coverage, share of blended edge pixels

  small, aliased_edges = draw((0.25, 0.25), 1)
  large, smooth_edges = draw((0.45, 0.45), 4)
  assert aliased_edges == 0 and 0.2 < small < 0.3  # a square of side 0.5: a quarter of the image
  assert large > 2.5 * small  # side 0.9: 0.81 of the image, less the blended border
  assert smooth_edges > 0.02  # the edges blend into the background
