"""Tiny random-weight transformers models, built and saved inside the tests: the reference we compare against."""

from __future__ import annotations

import numpy as np
import torch
import transformers

IMAGE_TOKEN = 60  # inside the tiny vocabulary, as llava-hf's <image> is


def vision_config(**kw):
  base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, projection_dim=16, hidden_act="quick_gelu")
  base.update(kw)
  return transformers.CLIPVisionConfig(**base)


def siglip_vision_config(**kw):
  """A tiny SigLIP tower as llava-onevision's: no pooling head; 56 px / 14 px patches = 16 features, no CLS."""
  base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14, vision_use_head=False)
  base.update(kw)
  return transformers.SiglipVisionConfig(**base)


def text_config(**kw):
  base = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=64, max_position_embeddings=128, rms_norm_eps=1e-5)
  base.update(kw)
  return transformers.LlamaConfig(**base)


def llava_model(vision=None, text=None, seed=0, **kw) -> transformers.LlavaForConditionalGeneration:
  """A random LlavaForConditionalGeneration whose weights are spread out enough to make differences visible."""
  cfg = transformers.LlavaConfig(vision_config=(vision or vision_config()).to_dict(),
                                 text_config=(text or text_config()).to_dict(), image_token_index=IMAGE_TOKEN,
                                 **kw)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF's init (std 0.02, zero biases, unit norms) makes every layer nearly the identity
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or "layrnorm" in name):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])))
  return model


def pixels(n, size=28, seed=0) -> np.ndarray:
  """NHWC float32 images, normalised-looking."""
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def to_torch_pixels(pixel_values: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2)))


def reference_logits(model, input_ids, pixel_values=None, attention_mask=None) -> np.ndarray:
  """HF logits with positions from the attention mask (what HF's generate does for padded batches)."""
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
  if pixel_values is not None:
    kwargs["pixel_values"] = to_torch_pixels(pixel_values).to(model.dtype)
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()


# -- LLaVA-NeXT (1.6) ------------------------------------------------------------------------------------------

# The 1.6 pinpoints scaled by 56 / 336, as (height, width): a 56-px CLIP with 14-px patches, 4x4 features a tile.
PINPOINTS_56 = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
NEXT_PROCESSOR_56 = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 56},
                     "crop_size": {"height": 56, "width": 56}, "image_grid_pinpoints": PINPOINTS_56, "resample": 3}


def next_vision_config(**kw):
  return vision_config(**{"image_size": 56, "patch_size": 14, **kw})


def mistral_text_config(**kw):
  """Mistral: LLaMA's blocks with GQA, rope_theta 1e6 (v0.2) and an optional sliding window (v0.1)."""
  base = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_parameters=dict(rope_type="default", rope_theta=1e6), sliding_window=None)
  base.update(kw)
  return transformers.MistralConfig(**base)


def yi_text_config(**kw):
  """Nous-Hermes-2-Yi style: the LLaMA architecture with another vocabulary and rope_theta 5e6, GQA."""
  base = dict(vocab_size=80, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=512,
              rope_parameters=dict(rope_type="default", rope_theta=5e6))
  base.update(kw)
  return text_config(**base)


def qwen2_text_config(**kw):
  """Qwen2 (LLaVA-OneVision's decoder): biases on q/k/v only, GQA, rope_theta 1e6, RMSNorm eps 1e-6."""
  base = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_parameters=dict(rope_type="default", rope_theta=1e6), use_sliding_window=False)
  base.update(kw)
  return transformers.Qwen2Config(**base)


def _spread_weights(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():  # HF's init (std 0.02, zero biases, unit norms) makes every layer nearly the identity
    for name, p in model.named_parameters():
      if name.endswith("image_newline"):  # as large as a projected feature, so a misplaced newline shows
        p.copy_(torch.randn_like(p))
      elif p.ndim == 1 and ("norm" in name or "layrnorm" in name):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])))
  return model


def llava_next_model(vision=None, text=None, seed=0, **kw) -> transformers.LlavaNextForConditionalGeneration:
  """A random LlavaNextForConditionalGeneration on the 56-px tower and the scaled 1.6 pinpoints."""
  text = text or text_config(max_position_embeddings=512)
  kw = {"image_grid_pinpoints": PINPOINTS_56, "image_token_index": IMAGE_TOKEN, **kw}
  cfg = transformers.LlavaNextConfig(vision_config=(vision or next_vision_config()).to_dict(),
                                     text_config=text.to_dict(), **kw)
  torch.manual_seed(seed)
  return _spread_weights(transformers.LlavaNextForConditionalGeneration(cfg).eval(), seed)


def next_reference_logits(model, input_ids, pixel_values=None, attention_mask=None, image_sizes=None) -> np.ndarray:
  """HF NeXT logits; pixel_values [N, P, H, W, 3] (P at least each image's tiles), image_sizes [N, 2]."""
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
  kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
  if pixel_values is not None:
    kwargs["pixel_values"] = torch.from_numpy(np.ascontiguousarray(np.asarray(pixel_values).transpose(0, 1, 4, 2, 3)))
    kwargs["image_sizes"] = torch.as_tensor(np.asarray(image_sizes), dtype=torch.long)
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()


CLIP_PREPROCESSOR_28 = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
                        "crop_size": {"height": 28, "width": 28}, "do_resize": True, "do_center_crop": True,
                        "resample": 3}


def converted_checkpoint(root, max_position_embeddings: int | None = None) -> str:
  """A tiny llava-hf directory with a real SentencePiece tokenizer (+ `<image>`, as llava-hf adds it) and a CLIP
  preprocessor config, converted with `llava-jax convert`; returns the checkpoint directory."""
  import json  # pylint: disable=import-outside-toplevel

  from llava_jax.cli import main as cli  # pylint: disable=import-outside-toplevel
  from llava_jax.data.synthetic import build_tokenizer  # pylint: disable=import-outside-toplevel

  build_tokenizer(str(root / "hf"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / "hf")
  tokenizer.add_tokens([transformers.AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
  tokenizer.save_pretrained(root / "hf")
  vocab = len(tokenizer)
  context = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
  hf = llava_model(text=text_config(vocab_size=vocab, num_key_value_heads=2, **context))
  hf.config.image_token_id = hf.config.image_token_index = vocab - 1
  hf.save_pretrained(root / "hf")
  (root / "hf" / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR_28))
  assert cli(["convert", "--hf", str(root / "hf"), "--out", str(root / "ckpt"), "--quiet"]) == 0
  return str(root / "ckpt")


def photographs() -> list:
  """Real photographs (scikit-image's), for preprocessing tests."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  return [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee()),
          Image.fromarray(skimage.data.chelsea())]


def random_images(sizes, seed=0) -> list:
  """Random RGB images of the given (height, width) sizes."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, tuple(hw) + (3,), np.uint8)) for hw in sizes]


# -- LLaVA-OneVision ----------------------------------------------------------------------------------------------

# OneVision's 36 pinpoints scaled by 56 / 384 (a 56-px SigLIP with 14-px patches: 4x4 features a tile).
OV_TILE = 56
PINPOINTS_OV_56 = [[h, w] for h in range(OV_TILE, 6 * OV_TILE + 1, OV_TILE)
                   for w in range(OV_TILE, 6 * OV_TILE + 1, OV_TILE)]
OV_IMAGE, OV_VIDEO = 257, 258  # "<image>" and "<video>" of `qwen2_byte_tokenizer`


def onevision_model(tied: bool = False, seed: int = 0, *, image_token: int = 60, video_token: int = 61,
                    pinpoints=None, max_grid_tiles: int = 2, text=None):
  """A random LlavaOnevisionForConditionalGeneration: the tiny SigLIP, a Qwen2 with GQA and q/k/v biases,
  anyres_max_`max_grid_tiles` (small, so that small images already give shrunk grids)."""
  cfg = transformers.LlavaOnevisionConfig(
      vision_config=siglip_vision_config().to_dict(),
      text_config=(text or qwen2_text_config(tie_word_embeddings=tied)).to_dict(), image_token_index=image_token,
      video_token_index=video_token, image_grid_pinpoints=pinpoints or PINPOINTS_OV_56,
      vision_aspect_ratio=f"anyres_max_{max_grid_tiles}", vision_feature_select_strategy="full",
      vision_feature_layer=-1, tie_word_embeddings=tied)
  torch.manual_seed(seed)
  return _spread_weights(transformers.LlavaOnevisionForConditionalGeneration(cfg).eval(), seed)


def qwen2_byte_tokenizer():
  """A byte-level Qwen2 tokenizer (no merges: one token a byte) with "<image>" and "<video>" special, 257 and 258;
  "<|endoftext|>" (256) ends replies."""
  from tokenizers.pre_tokenizers import ByteLevel  # pylint: disable=import-outside-toplevel

  vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
  vocab["<|endoftext|>"] = len(vocab)
  tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=[])
  tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
  assert tok.convert_tokens_to_ids(["<image>", "<video>"]) == [OV_IMAGE, OV_VIDEO]
  return tok


def onevision_preprocessor(pinpoints=None) -> dict:
  """preprocessor_config.json of a 56-px OneVision image processor."""
  return {"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": OV_TILE, "width": OV_TILE},
          "image_grid_pinpoints": pinpoints or PINPOINTS_OV_56, "resample": 3, "image_mean": [0.5, 0.5, 0.5],
          "image_std": [0.5, 0.5, 0.5], "do_pad": True}


def onevision_directory(folder, seed: int = 0) -> str:
  """A llava-hf OneVision directory the serving, CLI and eval paths load: the tiny model (vocabulary 264, its
  image and video tokens the byte tokenizer's), that tokenizer and the 56-px preprocessor config."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel

  folder = str(folder)
  qwen2_byte_tokenizer().save_pretrained(folder)
  hf = onevision_model(seed=seed, image_token=OV_IMAGE, video_token=OV_VIDEO,
                       text=qwen2_text_config(vocab_size=264, eos_token_id=256, pad_token_id=256))
  hf.save_pretrained(folder)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(onevision_preprocessor(), f)
  return folder


def left_padded_rows(rows, image_token: int, tokens_of) -> tuple[np.ndarray, np.ndarray, list]:
  """rows: per prompt, text ids and image sizes (tuples, (height, width)) in order -> left-padded input_ids and
  attention_mask (int64) with each image's `tokens_of(size)` image tokens, and the image sizes in tag order."""
  ids_rows, sizes = [], []
  for row in rows:
    ids = []
    for item in row:
      if isinstance(item, tuple):
        ids += [image_token] * tokens_of(item)
        sizes.append(item)
      else:
        ids.append(item)
    ids_rows.append(ids)
  t = max(map(len, ids_rows))
  input_ids, mask = np.zeros((len(rows), t), np.int64), np.zeros((len(rows), t), np.int64)
  for i, ids in enumerate(ids_rows):
    input_ids[i, t - len(ids):], mask[i, t - len(ids):] = ids, 1
  return input_ids, mask, sizes


def left_padded(rows, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token rows -> left-padded input_ids and attention_mask (int64), as transformers' batched generate takes them."""
  t = max(map(len, rows))
  ids, mask = np.full((len(rows), t), pad, np.int64), np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  return ids, mask


def greedy_generate(hf, ids, mask, px, n: int, eos=None, pad: int = 0) -> np.ndarray:
  """transformers' greedy `generate`: the n new tokens [B, n] (pixels [N, H, W, C] or None)."""
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                max_new_tokens=n, min_new_tokens=0, eos_token_id=eos, pad_token_id=pad)
  if px is not None:  # transformers crashes on pixel_values=None: leave it out
    kwargs["pixel_values"] = to_torch_pixels(px)
  with torch.no_grad():
    return hf.generate(**kwargs)[:, ids.shape[1]:].numpy()


def next_checkpoint(folder: str):
  """A random transformers NeXT model saved in `folder` with a tokenizer that has "<image>" and the 56-px anyres
  processor; returns (it, ours loaded from the folder, our processor)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel

  from llava_jax import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
  from llava_jax.data.synthetic import build_tokenizer  # pylint: disable=import-outside-toplevel
  from llava_jax.processor import Processor  # pylint: disable=import-outside-toplevel

  build_tokenizer(folder, special_tokens=["<image>"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  hf = llava_next_model(text=text_config(vocab_size=len(tokenizer), max_position_embeddings=512),
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
  hf.save_pretrained(folder)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(NEXT_PROCESSOR_56, f)
  model = load_hf_checkpoint(folder)
  return hf, model, Processor.from_model(model)
