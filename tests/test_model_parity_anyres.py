"""LLaVA-NeXT (1.6): our Llava against transformers' LlavaNextForConditionalGeneration (PyTorch, CPU, fp32).

Tiny random models on a 56-px CLIP with 14-px patches (4x4 features a tile) and the 1.6 pinpoints scaled by
56 / 336; LLaMA, Mistral (with and without a sliding window) and Yi-style text models. Tiles come from the
anyres tiler on random images; transformers gets them padded to the batch's maximum tile count, as its
processor pads them, and ours also with every image padded to the pinpoints' maximum (5 slots).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import hf_tiny
from hf_tiny import IMAGE_TOKEN, NEXT_PROCESSOR_56, PINPOINTS_56
from llava_jax import generate, load_hf_checkpoint
from llava_jax.checkpoint import model_from_params, params_of
from llava_jax.data.layout import AnyresGeometry
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.decoding import cache_schedule
from llava_jax.generation import stream
from llava_jax.padding import round_up

TOL = 1e-4
GEOMETRY = AnyresGeometry(PINPOINTS_56, tile=56, patches_per_side=4)
IMAGE_CONFIG = ImageProcessorConfig.from_dict(NEXT_PROCESSOR_56)
MAX_TILES = 5  # 1 base tile + the largest grid of the pinpoints (2x2)

BACKBONES = {
    "llama_gqa": lambda: hf_tiny.text_config(num_key_value_heads=2, max_position_embeddings=512),
    "mistral": lambda: hf_tiny.mistral_text_config(),
    "mistral_window_8": lambda: hf_tiny.mistral_text_config(sliding_window=8),
    "yi": lambda: hf_tiny.yi_text_config(),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (transformers model, ours loaded from its save_pretrained directory), built on first use."""
  built = {}

  def get(name):
    if name not in built:
      hf = hf_tiny.llava_next_model(text=BACKBONES[name](), seed=len(built))
      folder = tmp_path_factory.mktemp(name)
      hf.save_pretrained(folder)
      built[name] = hf, load_hf_checkpoint(str(folder))
    return built[name]

  return get


def images_of(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in sizes]


def make_batch(rows, seed=0):
  """rows: per prompt, a list of text ids and image sizes (tuples), in order -> left-padded input_ids,
  attention_mask, tiles [N, batch max, 56, 56, 3] and image_sizes [N, 2] (height, width)."""
  input_ids, mask, sizes = hf_tiny.left_padded_rows(rows, IMAGE_TOKEN, GEOMETRY.num_image_tokens)
  if not sizes:
    return input_ids, mask, None, None
  tiles = [GEOMETRY.tiles(image, IMAGE_CONFIG) for image in images_of(sizes, seed)]
  pixels = np.zeros((len(tiles), max(map(len, tiles)), 56, 56, 3), np.float32)
  for i, t in enumerate(tiles):
    pixels[i, :len(t)] = t
  return input_ids, mask, pixels, np.asarray(sizes, np.int64)


def with_slots(pixels, slots):
  """The same tiles padded with zero tiles up to `slots` per image (a static pipeline's layout)."""
  return np.pad(pixels, ((0, 0), (0, slots - pixels.shape[1]), (0, 0), (0, 0), (0, 0)))


def ours_logits(model, ids, mask, pixels, sizes):
  return np.asarray(model(jnp.asarray(ids), None if pixels is None else jnp.asarray(pixels), jnp.asarray(mask),
                          image_sizes=sizes), np.float32)


def max_error(ref, got, mask):
  return float(np.abs(ref - got)[mask.astype(bool)].max())


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_left_padded_batch_of_different_image_sizes(backbone, models):
  """Two images in one prompt (one tall 500x40, one smaller than a tile), a text-only prompt and an odd-sized
  wide image, left-padded together; ours both with the batch's tile count and with the pinpoints' maximum."""
  hf, ours = models(backbone)
  ids, mask, pixels, sizes = make_batch([[1, 5, (500, 40), 7, 8, (20, 30), 9],
                                         [1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
                                         [1, (30, 157), 21, 22]])
  assert pixels.shape[1] < MAX_TILES and ids.shape[1] > 8  # so padding to 5 slots and the window both matter
  ref = hf_tiny.next_reference_logits(hf, ids, pixels, mask, sizes)
  assert max_error(ref, ours_logits(ours, ids, mask, pixels, sizes), mask) <= TOL
  assert max_error(ref, ours_logits(ours, ids, mask, with_slots(pixels, MAX_TILES), sizes), mask) <= TOL


def test_each_pinpoint_and_extreme_and_odd_sizes(models):
  """An image of each pinpoint's shape (its grid exactly, no unpad), a wide 40x500, an odd 99x57 and a 1x1."""
  hf, ours = models("llama_gqa")
  sizes = [tuple(p) for p in PINPOINTS_56] + [(40, 500), (99, 57), (1, 1)]
  assert {GEOMETRY.num_tiles(hw) for hw in sizes} == {3, 4, 5}
  ids, mask, pixels, sizes = make_batch([[1, hw, 2 + i] for i, hw in enumerate(sizes)], seed=1)
  ref = hf_tiny.next_reference_logits(hf, ids, pixels, mask, sizes)
  assert max_error(ref, ours_logits(ours, ids, mask, pixels, sizes), mask) <= TOL


@pytest.mark.parametrize("backbone", ["llama_gqa", "mistral_window_8"])
def test_text_only_batch(backbone, models):
  hf, ours = models(backbone)
  ids, mask, _, _ = make_batch([list(range(1, 20)), [1, 40, 41]])
  ref = hf_tiny.next_reference_logits(hf, ids, None, mask)
  assert max_error(ref, ours_logits(ours, ids, mask, None, None), mask) <= TOL


def test_the_sliding_window_changes_the_logits(models):
  """The window parity above is not vacuous: without the window, our logits past slot 8 differ."""
  hf, ours = models("mistral_window_8")
  assert ours.config.text.sliding_window == 8 and ours.config.text.model_type == "mistral"
  unwindowed = model_from_params(ours.config.replace(text=dataclasses.replace(ours.config.text, sliding_window=None)),
                                 params_of(ours))
  ids, mask, pixels, sizes = make_batch([[1, 5, (20, 30), 7, 8]])
  assert ids.shape[1] > 8
  windowed, full = ours_logits(ours, ids, mask, pixels, sizes), ours_logits(unwindowed, ids, mask, pixels, sizes)
  assert np.abs(windowed[:, :8] - full[:, :8]).max() <= 1e-5  # the first 8 slots see everything either way
  assert np.abs(windowed[:, 8:] - full[:, 8:]).max() > 1e-2


@pytest.mark.parametrize("new", [10, 80])
@pytest.mark.parametrize("backbone", ["llama_gqa", "mistral_window_8"])
def test_greedy_generation_equals_transformers(backbone, new, models):
  """Greedy tokens of a left-padded batch of prompts with different image sizes equal transformers' generate;
  80 new tokens cross three KV cache sizes (`cache_schedule`), through `generate` and `stream`."""
  hf, ours = models(backbone)
  ids, mask, pixels, sizes = make_batch([[1, 5, (500, 40), 7], [1, (57, 113), 21, 22, 23], [1, 9, (20, 30)]],
                                        seed=2)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      pixel_values=torch.from_numpy(pixels.transpose(0, 1, 4, 2, 3).copy()),
                      image_sizes=torch.as_tensor(sizes), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
  kw = dict(max_new_tokens=new, eos_token_id=(), pad_token_id=0, image_sizes=sizes, prompt_bucket=16)
  got = generate(ours, ids, jnp.asarray(with_slots(pixels, MAX_TILES)), mask, **kw)
  np.testing.assert_array_equal(got, ref)
  if new > 10:
    assert len(cache_schedule(round_up(ids.shape[1], 16), new)) == 3
    np.testing.assert_array_equal(np.stack(list(stream(ours, ids, jnp.asarray(pixels), mask, **kw)), axis=1), ref)


def test_image_sizes_are_checked(models):
  _, ours = models("llama_gqa")
  ids, mask, pixels, sizes = make_batch([[1, (20, 30), 2]])
  with pytest.raises(ValueError, match="needs concrete image_sizes"):
    ours(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
  with pytest.raises(ValueError, match="Image features and image tokens do not match"):
    ours(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask), image_sizes=np.asarray([[56, 112]]))
  with pytest.raises(ValueError, match="more than 3 slots"):
    ours(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask), image_sizes=np.asarray([[500, 40]]))
