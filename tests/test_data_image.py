"""Pixels against transformers' CLIP and SigLIP image processors (PIL backend) on real photographs."""

import numpy as np
import pytest
import skimage.data
import transformers
from PIL import Image

from llava_jax.data import image as image_lib

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera")


def _photo(name):
  a = getattr(skimage.data, name)()
  return Image.fromarray(a).convert("RGB")


def _hf(size):
  return transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})


def _hf_pixels(processor, pil_image):
  return processor(pil_image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _config(size):
  return image_lib.ImageProcessorConfig.from_dict({
      "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size},
      "image_mean": list(image_lib.OPENAI_CLIP_MEAN), "image_std": list(image_lib.OPENAI_CLIP_STD),
      "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True,
      "resample": 3, "rescale_factor": 0.00392156862745098,
      "image_processor_type": "CLIPImageProcessor"})


def _expand2square(pil_img, background_color):  # LLaVA-1.5 train.py
  width, height = pil_img.size
  if width == height:
    return pil_img
  if width > height:
    result = Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  result = Image.new(pil_img.mode, (height, height), background_color)
  result.paste(pil_img, ((height - width) // 2, 0))
  return result


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("name", PHOTOS)
def test_crop_equals_clip_image_processor(name, size):
  photo = _photo(name)
  ours = image_lib.preprocess_image(photo, _config(size), aspect_ratio="crop")
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _hf_pixels(_hf(size), photo), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("name,portrait", [("chelsea", False), ("coffee", False), ("rocket", False),
                                           ("coffee", True), ("chelsea", True)])
def test_pad_equals_expand2square_then_processor(name, portrait, size):
  photo = _photo(name)
  if portrait:
    photo = photo.transpose(Image.Transpose.ROTATE_90)
  assert photo.width != photo.height
  processor = _hf(size)
  fill = tuple(int(x * 255) for x in processor.image_mean)
  expected = _hf_pixels(processor, _expand2square(photo, fill))
  ours = image_lib.preprocess_image(photo, _config(size), aspect_ratio="pad")
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_pad_colour_is_the_truncated_mean():
  assert image_lib.pad_colour(_config(336)) == (122, 116, 104)


def _modes():
  rgb = _photo("chelsea")
  rgba = Image.fromarray(skimage.data.logo())
  grey = Image.fromarray(skimage.data.camera())
  yield "L", grey, grey.convert("RGB")
  yield "LA", grey.convert("LA"), grey.convert("LA").convert("RGB")
  yield "RGBA", rgba, rgba.convert("RGB")
  yield "P", rgb.convert("P"), rgb.convert("P").convert("RGB")
  yield "CMYK", rgb.convert("CMYK"), rgb.convert("CMYK").convert("RGB")
  yield "1", grey.convert("1"), grey.convert("1").convert("RGB")
  # 16-bit: the same picture at 16 bits must give the 8-bit picture's pixels.
  sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
  assert sixteen.mode.startswith("I;16")
  yield "I;16", sixteen, grey.convert("RGB")
  yield "array", np.asarray(rgb), rgb


@pytest.mark.parametrize("mode,img,reference_rgb", list(_modes()), ids=lambda x: x if isinstance(x, str) else "")
def test_modes_converted_to_rgb(mode, img, reference_rgb):
  del mode
  processor = _hf(224)
  ours = image_lib.preprocess_image(img, _config(224), aspect_ratio="pad")
  fill = tuple(int(x * 255) for x in processor.image_mean)
  expected = _hf_pixels(processor, _expand2square(reference_rgb, fill))
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_small_image_without_resize_is_zero_padded_like_hf():
  img = Image.fromarray(skimage.data.chelsea()[:20, :30])
  processor = transformers.CLIPImageProcessorPil(do_resize=False, crop_size={"height": 24, "width": 24})
  config = image_lib.ImageProcessorConfig.from_dict({"do_resize": False, "crop_size": 24, "size": 24})
  ours = image_lib.preprocess_image(img, config, aspect_ratio="crop")
  np.testing.assert_allclose(ours, _hf_pixels(processor, img), atol=1e-5, rtol=0)


def test_config_reads_old_and_new_size_spellings(tmp_path):
  old = image_lib.ImageProcessorConfig.from_dict({"size": 336, "crop_size": 336})
  new = image_lib.ImageProcessorConfig.from_dict({"size": {"shortest_edge": 336},
                                                  "crop_size": {"height": 336, "width": 336}})
  assert old == new and new.output_size == (336, 336)
  (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 224}}')
  assert image_lib.ImageProcessorConfig.from_pretrained(str(tmp_path)).shortest_edge == 224


def _siglip_config(size):  # a SigLIP preprocessor_config.json as google/siglip-so400m-patch14-384 writes it
  return image_lib.ImageProcessorConfig.from_dict({
      "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
      "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class":
      "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
      "size": {"height": size, "width": size}})


@pytest.mark.parametrize("size", [384, 56])
@pytest.mark.parametrize("name", PHOTOS)
def test_siglip_equals_siglip_image_processor(name, size):
  """SigLIP resizes straight to size x size (no aspect kept, no centre crop), mean and std 0.5."""
  photo = _photo(name)
  processor = transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
  config = _siglip_config(size)
  assert not config.do_center_crop and config.output_size == (size, size)
  ours = image_lib.preprocess_image(photo, config, aspect_ratio="crop")
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _hf_pixels(processor, photo), atol=1e-5, rtol=0)
  # LLaVA's "pad" is the same processor on the image padded to a square of the mean colour (127, 127, 127).
  expected = _hf_pixels(processor, _expand2square(photo, (127, 127, 127)))
  np.testing.assert_allclose(image_lib.preprocess_image(photo, config, aspect_ratio="pad"), expected, atol=1e-5,
                             rtol=0)


def test_siglip_defaults_fill_omitted_keys():
  config = image_lib.ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessor"})
  assert (config.height, config.width, config.shortest_edge, config.do_center_crop) == (224, 224, None, False)
  assert config.image_mean == config.image_std == (0.5, 0.5, 0.5)
  assert image_lib.ImageProcessorConfig.from_dict({}).do_center_crop  # CLIP's unchanged
