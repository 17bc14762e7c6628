"""A checkpoint's own processor files, as transformers 5 saves them, and its prompt ids.

Every folder here is written by transformers' `save_pretrained` (`LlavaProcessor`, `LlavaNextProcessor`): the image
processor nested in processor_config.json, the chat template in chat_template.jinja. Token ids are compared with
that processor ("hf") and with the original LLaVA's `tokenizer_image_token` ("reference", re-stated in
test_data_text), on LLaMA tokenizers with `legacy` true and false, a Mistral-style and a ChatML (Yi) one.
"""

import json
import shutil
import types

import numpy as np
import pytest
import transformers

import hf_tiny
from test_data_text import IMAGE_TOKEN_INDEX, ref_tokenizer_image_token

from llava_jax.checkpoint_files import read_config
from llava_jax.config import ConfigError, LlavaConfig, VisionConfig
from llava_jax.data.image import ImageProcessorConfig, read_processor_files
from llava_jax.data.synthetic import build_tokenizer, write_shapes_corpus
from llava_jax.processor import Processor

# name: (legacy, special tokens, template)
TOKENIZERS = {
    "llama_legacy": (True, ["<image>"], "vicuna_v1"),
    "llama": (False, ["<image>"], "vicuna_v1"),
    "mistral": (False, ["<image>"], "mistral_instruct"),
    "yi_chatml": (False, ["<image>", "<|im_start|>", "<|im_end|>"], "chatml_direct"),
}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
HALF = [0.5, 0.5, 0.5]


def save_processor(root, kind: str, next_: bool, mean=None, std=None) -> str:
  """A tokenizer of `kind` and a LLaVA(-NeXT) processor on it, saved by transformers into root/"processor"."""
  legacy, specials, _ = TOKENIZERS[kind]
  build_tokenizer(str(root / "tok"), legacy=legacy, special_tokens=specials)
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tok")
  if next_:
    image_processor = transformers.LlavaNextImageProcessorPil(
        **{k: v for k, v in hf_tiny.NEXT_PROCESSOR_56.items() if k != "image_processor_type"})
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
  else:
    stats = {} if mean is None else dict(image_mean=mean, image_std=std)
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                         crop_size={"height": 28, "width": 28}, **stats)
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=7, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
  processor.save_pretrained(root / "processor")
  if legacy:  # transformers 5.23 saves no `legacy: true` (it reloads non-legacy): LLaMA's own files, as on the hub
    (root / "processor" / "tokenizer.json").unlink()
    for name in ["tokenizer.model", "tokenizer_config.json"]:
      shutil.copy(root / "tok" / name, root / "processor" / name)
  return str(root / "processor")


def fake_model(folder: str, next_: bool, **config):
  """What `from_model` reads of a loaded model: its assets and its config."""
  image_token_index = transformers.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<image>")
  vision = VisionConfig(**(dict(image_size=56, patch_size=14) if next_ else dict(image_size=28, patch_size=7)),
                        num_hidden_layers=2)
  pinpoints = {"image_grid_pinpoints": hf_tiny.PINPOINTS_56} if next_ else {}
  cfg = LlavaConfig(vision=vision, image_token_index=image_token_index, **pinpoints, **config)
  return types.SimpleNamespace(assets_dir=folder, config=cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folders = {}

  def get(kind, next_):
    if (kind, next_) not in folders:
      folders[kind, next_] = save_processor(tmp_path_factory.mktemp(f"{kind}_{int(next_)}"), kind, next_)
    return folders[kind, next_]

  return get


def reference_ids(prompt: str, tokenizer, counts) -> np.ndarray:
  """The original code's ids, each image placeholder widened to that image's token count."""
  ids = ref_tokenizer_image_token(prompt, tokenizer).numpy()
  repeats = np.ones(len(ids), np.int64)
  repeats[ids == IMAGE_TOKEN_INDEX] = counts
  out = np.repeat(ids, repeats)
  out[out == IMAGE_TOKEN_INDEX] = tokenizer.convert_tokens_to_ids("<image>")
  return out


@pytest.mark.parametrize("next_", [False, True], ids=["llava_1_5", "next"])
@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_ids_equal_the_checkpoints_processor_or_the_reference(saved, kind, next_):
  folder = saved(kind, next_)
  hf = transformers.AutoProcessor.from_pretrained(folder)
  images = hf_tiny.photographs()[:2] + hf_tiny.random_images([(20, 30), (500, 40)])
  model = fake_model(folder, next_, tokenization="hf")
  proc = Processor.from_model(model, template=TOKENIZERS[kind][2], aspect_ratio="crop")
  assert proc.tokenization == "hf" and proc.chat_template == CHAT_TEMPLATE
  questions = ["What is this?", "Describe the image in detail.", "Is it tall or wide?", "Hello there."]
  prompts = [proc.prompt([q], image=i < 3) for i, q in enumerate(questions)]
  batch = proc(prompts, images[:3])
  reference = Processor.from_model(model, template=TOKENIZERS[kind][2], aspect_ratio="crop",
                                   tokenization="reference")
  ref_batch = reference(prompts, images[:3])
  differs = False
  for i, prompt in enumerate(prompts):
    expected = hf(text=[prompt], images=images[i:i + 1] if i < 3 else None, return_tensors="np")
    expected_ids = expected["input_ids"][0]
    np.testing.assert_array_equal(batch["input_ids"][i][batch["attention_mask"][i] == 1], expected_ids)
    count = int((expected_ids == proc.image_token_index).sum())
    ref = reference_ids(prompt, proc.tokenizer, count)
    np.testing.assert_array_equal(ref_batch["input_ids"][i][ref_batch["attention_mask"][i] == 1], ref)
    differs |= not np.array_equal(ref, expected_ids)
  # Non-legacy LLaMA tokenizers put a "▁" after each image chunk-wise; the whole string does not.
  assert differs == (not TOKENIZERS[kind][0])
  pixels = hf.image_processor(images[:3], return_tensors="np")["pixel_values"]
  pixels = pixels.transpose(0, 1, 3, 4, 2) if next_ else pixels.transpose(0, 2, 3, 1)
  np.testing.assert_allclose(batch["pixel_values"][:, :pixels.shape[1]] if next_ else batch["pixel_values"], pixels,
                             atol=1e-5, rtol=0)


def test_the_checkpoint_config_picks_the_tokenization_and_an_argument_overrides_it(saved):
  folder = saved("llama", False)
  assert Processor.from_model(fake_model(folder, False)).tokenization == "reference"  # an old llava_config.json
  assert Processor.from_model(fake_model(folder, False, tokenization="hf")).tokenization == "hf"
  assert Processor.from_model(fake_model(folder, False), tokenization="hf").tokenization == "hf"
  with pytest.raises(ValueError, match="one of"):
    Processor.from_model(fake_model(folder, False), tokenization="chunked")


def test_hf_tokenization_needs_the_image_token_in_the_vocabulary(saved):
  """An original-layout checkpoint: the image id is one past the vocabulary, so only "reference" works."""
  model = fake_model(saved("llama", False), False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model.assets_dir)
  with pytest.raises(ValueError, match="tokenization='reference'"):
    Processor(tokenizer, ImageProcessorConfig(), num_image_tokens=16, image_token_index=len(tokenizer),
              tokenization="hf")
  with pytest.raises(ConfigError, match="outside"):
    LlavaConfig(image_token_index=32000, tokenization="hf")
  original = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": "clip",
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024, "vocab_size": 32000}
  assert LlavaConfig.from_hf(original, vision=VisionConfig()).tokenization == "reference"
  hf_cfg = fake_model(model.assets_dir, False, tokenization="hf").config
  assert LlavaConfig.from_hf(hf_cfg.to_hf_dict()).tokenization == "hf"
  ours = hf_cfg.replace(tokenization="reference")
  assert LlavaConfig.from_hf(ours.to_hf_dict()) == ours  # an export of ours reads back as ours


def test_every_layout_transformers_writes_is_read(saved, tmp_path):
  files = read_processor_files(saved("llama", True))
  assert files.image_processor["image_grid_pinpoints"] == hf_tiny.PINPOINTS_56
  assert files.image_config.crop_height == 56 and files.chat_template == CHAT_TEMPLATE
  assert files.processor["patch_size"] == 14
  # Older transformers: preprocessor_config.json and chat_template.json.
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({**hf_tiny.CLIP_PREPROCESSOR_28,
                                                                  "image_mean": HALF, "image_std": HALF}))
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
  files = read_processor_files(str(tmp_path))
  assert files.image_config.image_mean == (0.5, 0.5, 0.5) and files.chat_template == CHAT_TEMPLATE
  # Both: the nested one wins, as in transformers.
  (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": hf_tiny.CLIP_PREPROCESSOR_28}))
  assert ImageProcessorConfig.from_pretrained(str(tmp_path)).image_mean != (0.5, 0.5, 0.5)
  for name in ["processor_config.json", "preprocessor_config.json"]:
    (tmp_path / name).unlink()
  with pytest.raises(FileNotFoundError, match="processor_config.json .* preprocessor_config.json"):
    read_processor_files(str(tmp_path))


def test_a_converted_llava_hf_checkpoint_keeps_its_processor_and_tokenization(tmp_path):
  from llava_jax import load_checkpoint  # pylint: disable=import-outside-toplevel
  from llava_jax.cli import main as cli  # pylint: disable=import-outside-toplevel

  folder = save_processor(tmp_path, "llama", False, mean=HALF, std=HALF)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = hf_tiny.llava_model(text=hf_tiny.text_config(vocab_size=len(tokenizer)))
  model.config.image_token_id = model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
  model.save_pretrained(folder)
  assert cli(["convert", "--hf", folder, "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
  assert read_config(str(tmp_path / "ckpt")).tokenization == "hf"
  for name in ["processor_config.json", "chat_template.jinja"]:
    assert (tmp_path / "ckpt" / "assets" / name).exists(), name
  proc = Processor.from_model(load_checkpoint(str(tmp_path / "ckpt")), aspect_ratio="crop")
  assert proc.tokenization == "hf" and proc.image_config.image_mean == (0.5, 0.5, 0.5)
  prompt, image = proc.prompt(["What is this?"], image=True), hf_tiny.photographs()[0]
  expected = transformers.AutoProcessor.from_pretrained(folder)(text=[prompt], images=[image], return_tensors="np")
  np.testing.assert_array_equal(proc(prompt, [image])["input_ids"], expected["input_ids"])
  np.testing.assert_allclose(proc(prompt, [image])["pixel_values"], expected["pixel_values"].transpose(0, 2, 3, 1),
                             atol=1e-5, rtol=0)


def _train_data(tmp_path, assets):
  import train_util  # pylint: disable=import-outside-toplevel
  from llava_jax.train import batches, run_config  # pylint: disable=import-outside-toplevel

  paths = write_shapes_corpus(str(tmp_path / "shapes"), num_train=8, num_eval=1)
  config = train_util.tiny_config("stage1", **{
      "data.kind": "llava", "data.json_path": paths["stage1"], "data.image_dir": paths["image_dir"],
      "data.seq_len": 64, "model.text.vocab_size": 1024, "model.image_token_index": 1024})
  return batches.make_iterator(config.data, run_config.model_config(config), 2, seed=0, assets_dir=assets)


def test_training_reads_the_checkpoints_image_settings(tmp_path):
  """A processor saved with SigLIP's mean and std (0.5): the training batches' pixels use them, not CLIP's."""
  folder = save_processor(tmp_path, "llama", False, mean=HALF, std=HALF)
  pixels = next(_train_data(tmp_path, folder))["pixel_values"]
  table = ((np.arange(256, dtype=np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
  assert pixels.shape[1:] == (28, 28, 3) and np.isin(pixels, table).all()


def test_training_from_a_checkpoint_without_an_image_processor_is_an_error(tmp_path):
  build_tokenizer(str(tmp_path / "assets"))
  with pytest.raises(FileNotFoundError, match="no image processor"):
    _train_data(tmp_path, str(tmp_path / "assets"))
