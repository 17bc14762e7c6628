"""The LLaVA-NeXT path of `Processor` against transformers' `LlavaNextProcessor` (PIL image processor).

A tiny SentencePiece tokenizer with "<image>" added as llava-hf adds it (legacy, as the llava-hf LLaMA
tokenizers are), and the 1.6 pinpoints scaled to a 56-px CLIP with 14-px patches (4x4 features a tile).
"""

import json
import types

import numpy as np
import pytest

import hf_tiny
import transformers

from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.data.anyres import num_image_tokens, unpadded_grid
from llava_jax.data.conversation import get_template
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.data.layout import AnyresGeometry
from llava_jax.data.synthetic import build_tokenizer
from llava_jax.processor import Processor

PINPOINTS_56 = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # the 1.6 list * 56 / 336
PROCESSOR_56 = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 56},
                "crop_size": {"height": 56, "width": 56}, "image_grid_pinpoints": PINPOINTS_56, "resample": 3}
SIZES = [(20, 30), (1, 1), (500, 40), (40, 500), (57, 113), (3, 200), (99, 57)] + [tuple(p) for p in PINPOINTS_56]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """Not conftest's tokenizer: this one is legacy and has "<image>" and the ChatML tokens."""
  folder = tmp_path_factory.mktemp("next_tok")
  build_tokenizer(str(folder), legacy=True, special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])
  (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_56))
  return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_processor(tokenizer):
  image_processor = transformers.LlavaNextImageProcessorPil(
      **{k: v for k, v in PROCESSOR_56.items() if k != "image_processor_type"})
  # llava-hf's NeXT processors: patch_size 14, "default" strategy, +1 for the CLS that "default" then drops.
  return transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                         vision_feature_select_strategy="default", num_additional_image_tokens=1)


def make_processor(tokenizer, template="vicuna_v1", semantics="hf", max_tiles=None):
  return Processor(tokenizer, ImageProcessorConfig.from_dict(PROCESSOR_56), num_image_tokens=16,
                   image_token_index=tokenizer.convert_tokens_to_ids("<image>"), template=template,
                   anyres=AnyresGeometry(PINPOINTS_56, tile=56, patches_per_side=4, semantics=semantics),
                   max_tiles=max_tiles)


photographs, synthetic = hf_tiny.photographs, hf_tiny.random_images


def unpadded_rows(batch):
  return [ids[mask.astype(bool)] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def assert_equals_transformers(batch, hf_processor, prompts, images_per_prompt):
  """Each row's tokens equal LlavaNextProcessor's on that prompt; the batch's pixels and sizes its image processor's."""
  assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
  for row, prompt, images in zip(unpadded_rows(batch), prompts, images_per_prompt):
    expected = hf_processor(text=[prompt], images=images or None, return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(row, expected)
  assert (batch["attention_mask"][:, -1] == 1).all()  # left-padded
  images = [im for ims in images_per_prompt for im in ims]
  hf = hf_processor.image_processor(images, return_tensors="np")
  assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape[:2] == hf["pixel_values"].shape[:2]
  np.testing.assert_allclose(batch["pixel_values"], hf["pixel_values"].transpose(0, 1, 3, 4, 2), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(batch["image_sizes"], hf["image_sizes"])


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "chatml_direct"])
def test_one_image_per_prompt_equals_llava_next_processor(tokenizer, hf_processor, template):
  proc = make_processor(tokenizer, template)
  images = photographs() + synthetic(SIZES)
  questions = ["What is this?", "Describe the image in detail.", "Is it tall or wide?"]
  prompts = [proc.prompt([questions[i % 3]], image=True) for i in range(len(images))]
  batch = proc(prompts, images)
  assert_equals_transformers(batch, hf_processor, prompts, [[im] for im in images])
  counts = (batch["input_ids"] == proc.image_token_index).sum(1)
  np.testing.assert_array_equal(counts, [num_image_tokens((im.height, im.width), PINPOINTS_56, 56, 4) for im in images])


def test_several_images_in_one_prompt_and_a_text_only_prompt(tokenizer, hf_processor):
  proc = make_processor(tokenizer)
  vicuna = get_template("vicuna_v1")
  prompts = [vicuna.render([("USER", "<image>\nLeft, and <image>\nright: which is larger?"), ("ASSISTANT", None)]),
             vicuna.render([("USER", "Hello there."), ("ASSISTANT", None)]),
             proc.prompt(["What is this?"], image=True)]
  images = [synthetic([(500, 40)])[0], photographs()[1], synthetic([(20, 30)], seed=1)[0]]
  batch = proc(prompts, images)
  assert_equals_transformers(batch, hf_processor, prompts, [images[:2], [], images[2:]])

  text_only = proc(prompts[1:2])
  assert text_only["pixel_values"] is None and text_only["image_sizes"] is None
  np.testing.assert_array_equal(text_only["input_ids"][0], hf_processor(text=prompts[1:2])["input_ids"][0])
  with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
    proc(prompts[:1], images[:1])


def test_batch_feature_index_places_each_images_features_at_its_tokens(tokenizer):
  """The contract the model relies on: gathering the batch's tile features with `batch_feature_index` fills the
  image-token positions of input_ids in order, each image's own tiles giving its tokens."""
  proc = make_processor(tokenizer, max_tiles=5)
  vicuna = get_template("vicuna_v1")
  prompts = [vicuna.render([("USER", "<image>\nand <image>\ncompare."), ("ASSISTANT", None)]),
             proc.prompt(["What is this?"], image=True)]
  batch = proc(prompts, synthetic([(57, 113), (20, 30), (112, 112)]))
  index = proc.anyres.batch_feature_index(batch["image_sizes"], slots=5)
  assert len(index) == (batch["input_ids"] == proc.image_token_index).sum()
  # A stand-in for tile features: each feature row records (image, tile, patch) as i * 1000 + k * 100 + j.
  rows = np.asarray([i * 1000 + k * 100 + j for i in range(3) for k in range(5) for j in range(16)])
  placed = np.concatenate([rows, [-1]])[index]
  sizes = [tuple(hw) for hw in batch["image_sizes"]]
  starts = np.cumsum([0] + [proc.anyres.num_image_tokens(hw) for hw in sizes])
  for i, hw in enumerate(sizes):
    own = placed[starts[i]:starts[i + 1]]
    np.testing.assert_array_equal(own[:16], i * 1000 + np.arange(16))  # base tile first
    grid = own[16:][own[16:] >= 0]
    assert set(grid // 1000) == {i} and set(grid % 1000 // 100) <= set(range(1, proc.anyres.num_tiles(hw)))
    rows, cols = unpadded_grid(hw, PINPOINTS_56, 56, 4)
    assert (own == -1).sum() == rows and len(grid) == rows * cols > 0
  with pytest.raises(ValueError, match="more than 4 slots"):
    proc.anyres.batch_feature_index(batch["image_sizes"], slots=4)


def test_max_tiles_pads_every_image_to_static_slots(tokenizer):
  images = synthetic([(20, 30), (56, 168)])  # 3 and 4 tiles; the pinpoints allow at most 1 + 2x2
  prompts = [make_processor(tokenizer).prompt(["What?"], image=True)] * 2
  dynamic = make_processor(tokenizer)(prompts, images)
  assert dynamic["pixel_values"].shape == (2, 4, 56, 56, 3)
  for static in [make_processor(tokenizer, max_tiles=5)(prompts, images),
                 make_processor(tokenizer)(prompts, images, max_tiles=5)]:
    assert static["pixel_values"].shape == (2, 5, 56, 56, 3)
    np.testing.assert_array_equal(static["pixel_values"][:, :4], dynamic["pixel_values"])
    assert not static["pixel_values"][:, 4].any() and not static["pixel_values"][0, 3].any()
    np.testing.assert_array_equal(static["input_ids"], dynamic["input_ids"])
  with pytest.raises(ValueError, match="max_tiles=3 is fewer than the 4 tiles"):
    make_processor(tokenizer)(prompts, images, max_tiles=3)
  with pytest.raises(ValueError, match="differ from the vision tower"):
    Processor(tokenizer, ImageProcessorConfig.from_dict(PROCESSOR_56), num_image_tokens=16, image_token_index=0,
              anyres=AnyresGeometry(PINPOINTS_56, tile=28, patches_per_side=2))


def test_original_semantics_changes_the_grid_of_small_images(tokenizer):
  image = synthetic([(20, 30)])[0]  # fits one tile: transformers picks 56x112 (1x2), the reference 112x56 (2x1)
  prompt = make_processor(tokenizer).prompt(["What?"], image=True)
  hf, original = make_processor(tokenizer)(prompt, [image]), make_processor(tokenizer, semantics="original")(prompt,
                                                                                                          [image])
  # 20 high x 30 wide. 1x2 grid: 4x8 map, wider than the image: new width = 30 * 4 / 20 = 6, padding 1 a side:
  # 4 rows of 6 + 4 newlines. 2x1 grid: 8x4 map, taller: new height = 20 * 4 / 30 = 2.67 -> 2, padding 3 a side:
  # 2 rows of 4 + 2 newlines.
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  assert (hf["input_ids"] == image_id).sum() == 16 + 4 * 6 + 4
  assert (original["input_ids"] == image_id).sum() == 16 + 2 * 4 + 2
  np.testing.assert_array_equal(hf["pixel_values"][0, 0], original["pixel_values"][0, 0])  # same base tile
  assert not np.array_equal(hf["pixel_values"][0, 1], original["pixel_values"][0, 1])


def fake_model(assets, **config):
  """What `from_model` reads of a loaded model: its assets and its config's image fields."""
  image_token_index = transformers.AutoTokenizer.from_pretrained(assets).convert_tokens_to_ids("<image>")
  cfg = LlavaConfig(vision=VisionConfig(image_size=56, patch_size=14, num_hidden_layers=2),
                    image_token_index=image_token_index, **config)
  return types.SimpleNamespace(assets_dir=str(assets), config=cfg)


def test_from_model_reads_the_pinpoints_from_the_config_or_the_preprocessor(tokenizer_dir, tokenizer, hf_processor):
  image = photographs()[2]
  # The config has none (a config from before NeXT): the preprocessor config's pinpoints.
  proc = Processor.from_model(fake_model(tokenizer_dir))
  assert proc.anyres == AnyresGeometry(PINPOINTS_56, 56, 4)
  assert proc.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
  prompt = proc.prompt(["What is this?"], image=True)
  assert_equals_transformers(proc(prompt, image), hf_processor, [prompt], [[image]])
  # The model config's pinpoints and semantics win.
  proc = Processor.from_model(fake_model(tokenizer_dir, image_grid_pinpoints=[[112, 112]], anyres_semantics="original"))
  assert proc.anyres == AnyresGeometry([[112, 112]], 56, 4, semantics="original")
  assert proc(prompt, image)["pixel_values"].shape == (1, 5, 56, 56, 3)


def test_a_model_without_pinpoints_keeps_the_llava_1_5_path(tmp_path, tokenizer_dir):
  for name in ["tokenizer.model", "tokenizer_config.json"]:
    (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {k: v for k, v in PROCESSOR_56.items() if k != "image_grid_pinpoints"}))
  proc = Processor.from_model(fake_model(tmp_path))
  assert proc.anyres is None
  batch = proc(proc.prompt(["What?"], image=True), synthetic([(20, 30)]))
  assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
  assert batch["pixel_values"].shape == (1, 56, 56, 3) and (batch["input_ids"] == proc.image_token_index).sum() == 16
