"""LLaVA-OneVision inputs: the processor's ids, pixels and sizes against transformers' `LlavaOnevisionProcessor`,
which images the model reads as base-only (it must agree with the processor, from input_ids and image_sizes
alone), and the model's spliced embeddings against transformers' `pack_image_features` / `apply_pooling` on the
same projected features, on a batch mixing one image, two images, two videos and text only."""

import json
import types
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov
from transformers.models.llava_onevision import processing_llava_onevision as hf_proc

import hf_tiny
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.data.layout import layout_for
from llava_jax.data.onevision_batch import assign_images, assign_videos
from llava_jax.generation import generate
from llava_jax.models.llava import Llava
from llava_jax.processor import Processor

IMAGE, VIDEO = hf_tiny.OV_IMAGE, hf_tiny.OV_VIDEO
PINPOINTS = [[56, 56], [56, 112], [112, 112]]
PREPROCESSOR = {"size": {"height": 56, "width": 56}, "image_grid_pinpoints": PINPOINTS, "resample": 3,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True}
PROMPTS = ["describe <image> please", "compare <image> and <image> now", "<video> then <video> happened?", "hi"]
SIZES = [(100, 110), (30, 80), (70, 40)]  # one alone in row 0 (5 tiles), two base-only in row 1
FRAMES = [3, 2]


def _config():
  """A CLIP stand-in for SigLIP (CLS dropped: 4x4 = 16 features a tile, as SigLIP's 27x27), 56 px tiles, grids
  over one tile's area shrunk (anyres_max_1)."""
  vision = VisionConfig(image_size=56, patch_size=14, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                        num_attention_heads=2)
  text = TextConfig(vocab_size=264, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=8, eos_token_id=256, pad_token_id=256)
  return LlavaConfig(vision=vision, text=text, image_token_index=IMAGE, video_token_index=VIDEO,
                     vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1",
                     tokenization="hf")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  assets = tmp_path_factory.mktemp("assets")
  hf_tiny.qwen2_byte_tokenizer().save_pretrained(str(assets))
  (assets / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
  return Llava(_config(), assets_dir=str(assets))


def _videos(seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (f, 48, 64, 3), np.uint8) for f in FRAMES]


@pytest.fixture(scope="module")
def batch(model):
  proc = Processor.from_model(model)
  return proc(PROMPTS, images=hf_tiny.random_images(SIZES), videos=_videos())


def _hf_processor():
  """transformers' processor with its PIL image processor and no video processor (its class check, which looks
  the video processors up and needs torchvision, is skipped: the classes here are right by construction)."""
  from transformers import LlavaOnevisionImageProcessorPil  # pylint: disable=import-outside-toplevel

  with mock.patch.object(hf_proc.LlavaOnevisionProcessor, "check_argument_for_proper_class", lambda *a: None):
    return hf_proc.LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessorPil(**PREPROCESSOR),
                                           tokenizer=hf_tiny.qwen2_byte_tokenizer(), num_image_tokens=16,
                                           vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")


def test_processor_shapes_and_counts(model, batch):
  layout = layout_for(model.config)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert ids.shape == mask.shape and ids.shape[0] == 4 and mask[:, -1].all()
  assert batch["pixel_values"].shape == (3, 5, 56, 56, 3) and batch["pixel_values"].dtype == np.float32
  np.testing.assert_array_equal(batch["image_sizes"], SIZES)
  assert batch["image_base_only"].tolist() == [False, True, True]
  assert not batch["pixel_values"][1:, 1:].any() and batch["pixel_values"][1:, 0].any()
  videos = batch["pixel_values_videos"]
  assert videos.shape == (2, 3, 56, 56, 3) and videos.dtype == np.float32
  assert videos[0].any(axis=(1, 2, 3)).all() and videos[1, :2].any() and not videos[1, 2].any()
  # transformers' own counts: an image alone, then one of several (its base + newline), then the videos
  hf = _hf_processor()
  single = hf._get_number_of_features(*SIZES[0], 56, 56)
  assert single == layout.num_image_tokens(SIZES[0]) == hf._get_num_multimodal_tokens(
      image_sizes=[SIZES[0]])["num_image_tokens"][0]
  video_counts = hf._get_num_multimodal_tokens(video_sizes=[(f, 48, 64) for f in FRAMES])["num_video_tokens"]
  assert video_counts == [f * 4 + 1 for f in FRAMES]
  assert ((ids == IMAGE).sum(1)).tolist() == [single, 2 * (16 + 1), 0, 0]
  assert ((ids == VIDEO).sum(1)).tolist() == [0, 0, sum(video_counts), 0]
  assert (ids[3][mask[3] == 1] < 256).all()


def test_processor_ids_equal_transformers(batch):
  """The image rows' ids as transformers' processor gives them for the same images nested per prompt."""
  hf = _hf_processor()
  images = hf_tiny.random_images(SIZES)
  expected = hf(text=PROMPTS[:2], images=[[images[0]], images[1:]], return_tensors="np", padding=True,
                padding_side="left")
  for row in range(2):
    ours = batch["input_ids"][row][batch["attention_mask"][row] == 1]
    theirs = expected["input_ids"][row][expected["attention_mask"][row] == 1]
    np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(expected["image_sizes"], SIZES)
  # the real tiles: the single image's five, each base-only image's one (the rest of transformers' are padding)
  theirs = np.asarray(expected["pixel_values"]).transpose(0, 1, 3, 4, 2)
  np.testing.assert_allclose(batch["pixel_values"][0], theirs[0, :5], atol=1e-5)
  np.testing.assert_allclose(batch["pixel_values"][1:, 0], theirs[1:, 0], atol=1e-5)


def test_model_reads_base_only_as_the_processor(model, batch):
  layout = layout_for(model.config)
  inferred = layout.assign_images(batch["input_ids"], IMAGE, batch["image_sizes"])
  assert inferred == batch["image_base_only"].tolist()
  assert layout.video_frame_counts(batch["input_ids"], VIDEO, 3) == FRAMES


def test_assign_images_rules():
  # row 0 could be one whole image of 34 tokens or two base-only ones; only the first uses all three images
  assert assign_images([34, 0, 34], [34, 50, 60], 17) == [False, True, True]
  assert assign_images([34, 34], [34, 34, 34, 34], 17) == [True] * 4
  with pytest.raises(ValueError, match="row 0: .* both readings"):
    assign_images([34, 34], [34, 34, 34], 17)
  with pytest.raises(ValueError, match="row 1: its 20 image tokens match neither"):
    assign_images([30, 20], [30, 40], 17)
  with pytest.raises(ValueError, match=r"take \[1\] images, but 2"):
    assign_images([30], [30, 30], 17)
  with pytest.raises(ValueError, match="row 0"):
    assign_images([17], [30], 17)  # one image is never base-only


def test_video_frames_rule():
  row = np.array([[0, 5, 5, 5, 5, 5, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5]])  # 1 frame, then 2 frames (4 a frame)
  assert assign_videos(row, 5, 4) == [1, 2]
  adjacent = np.array([[5] * 18])  # two videos, 2 frames each (9 tokens a video), in one run
  assert assign_videos(adjacent, 5, 4, frame_slots=2) == [2, 2]
  with pytest.raises(ValueError, match="2 adjacent videos"):
    assign_videos(adjacent, 5, 4, frame_slots=3)
  with pytest.raises(ValueError, match="row 0: a run of 4"):
    assign_videos(np.array([[5] * 4]), 5, 4)


def _stub_model():
  vision = types.SimpleNamespace(image_size=56, patch_size=14)
  return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision, image_grid_pinpoints=PINPOINTS))


def _expected_embeds(model, batch):
  """Each image packed and each video pooled by transformers on the model's projected features, placed in token
  order per row (images and videos apart), text embedded as usual."""
  newline = torch.from_numpy(np.array(model.image_newline[...]))
  pixels, videos = batch["pixel_values"], batch["pixel_values_videos"]
  packed = []
  for i, (hw, only) in enumerate(zip(batch["image_sizes"], batch["image_base_only"])):
    tiles = 1 if only else layout_for(model.config).num_tiles(hw)
    features = torch.from_numpy(np.asarray(model.image_features(jnp.asarray(pixels[i, :tiles]))))
    with torch.no_grad():
      out, _ = hf_ov.LlavaOnevisionModel.pack_image_features(_stub_model(), [features], torch.tensor([hw.tolist()]),
                                                             image_newline=newline,
                                                             vision_aspect_ratio="anyres_max_1")
    packed.append(out[0].numpy())
  pooled = []
  for v, frames in enumerate(FRAMES):
    features = torch.from_numpy(np.asarray(model.image_features(jnp.asarray(videos[v, :frames]))))
    with torch.no_grad():
      out = hf_ov.LlavaOnevisionModel.apply_pooling(_stub_model(), features).reshape(-1, features.shape[-1])
    pooled.append(torch.cat([out, newline[None]]).numpy())
  ids = batch["input_ids"]
  expected = np.array(model.language_model.embed_tokens(jnp.asarray(np.where(ids >= 257, 0, ids))))
  expected[ids == IMAGE] = np.concatenate(packed)
  expected[ids == VIDEO] = np.concatenate(pooled)
  return expected


def test_model_embeddings_equal_transformers_packing(model, batch):
  inputs = model.feature_inputs(batch["input_ids"], jnp.asarray(batch["pixel_values"]), batch["image_sizes"],
                                jnp.asarray(batch["pixel_values_videos"]))
  embeds = model.embed(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                       pixel_values_videos=jnp.asarray(batch["pixel_values_videos"]), **inputs)
  np.testing.assert_allclose(np.asarray(embeds), _expected_embeds(model, batch), atol=2e-5, rtol=0)
  # the public call computes the same rows itself, and gives what the explicit (jit-ready) inputs give
  logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                 image_sizes=batch["image_sizes"], pixel_values_videos=batch["pixel_values_videos"])
  explicit = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                   attention_mask=jnp.asarray(batch["attention_mask"]),
                   pixel_values_videos=jnp.asarray(batch["pixel_values_videos"]), **inputs)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(explicit), atol=1e-6, rtol=0)


def test_generate_on_the_mixed_batch(model, batch):
  out = generate(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], max_new_tokens=3,
                 temperature=0.0, image_sizes=batch["image_sizes"], pixel_values_videos=batch["pixel_values_videos"],
                 eos_token_id=())
  assert out.shape == (4, 3)
  logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                 image_sizes=batch["image_sizes"], pixel_values_videos=batch["pixel_values_videos"])
  np.testing.assert_array_equal(out[:, 0], np.argmax(np.asarray(logits)[:, -1], axis=-1))


def test_video_from_a_folder_and_model_errors(model, tmp_path):
  proc = Processor.from_model(model)
  frames = _videos()[0]
  for i, frame in enumerate(frames):
    Image.fromarray(frame).save(tmp_path / f"frame_{i:03d}.png")
  from_folder = proc(["<video> what?"], videos=[str(tmp_path)])
  from_frames = proc(["<video> what?"], videos=[list(frames)])
  np.testing.assert_array_equal(from_folder["input_ids"], from_frames["input_ids"])
  np.testing.assert_allclose(from_folder["pixel_values_videos"], from_frames["pixel_values_videos"])
  assert from_folder["pixel_values"] is None and from_folder["pixel_values_videos"].shape[:2] == (1, 3)
  with pytest.raises(ValueError, match="1 videos were given"):
    proc(["<video> and <video>"], videos=[frames])
  ids = np.array([[1] + [IMAGE] * 20])  # no image's count, nor base-only images'
  with pytest.raises(ValueError, match="row 0: its 20 image tokens"):
    model(ids, np.zeros((1, 5, 56, 56, 3), np.float32), image_sizes=np.array([SIZES[0]]))
  with pytest.raises(ValueError, match="no pixel_values_videos"):
    model(np.array([[1] + [VIDEO] * 5]))
