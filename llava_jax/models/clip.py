"""CLIP ViT vision tower (pre-LayerNorm, quick_gelu), attribute names mirroring transformers' CLIPVisionTransformer.

`pixel_values` are NHWC. `num_layers` runs only the first layers, which is all LLaVA needs (features come from
the second-to-last layer); the remaining layers keep their weights so checkpoints round-trip unchanged.
The encoder (layers take their activation and eps from the config), `patch_embed` and `run_encoder` are shared
with SigLIP (models/siglip.py), whose encoder layer is CLIP's.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llava_jax.config import VisionConfig
from llava_jax.models.attention import dot_product_attention
from llava_jax.models.layers import Dense, LayerNorm, activation, normal_init, param
from llava_jax.models.options import ModelOptions
from llava_jax.models.stack import make_layers, run_layers


def patch_embed(pixel_values, conv: nnx.Dict, p: int, num_patches: int, dtype):
  """[N, H, W, C] -> [N, patches, D] by the patch conv (HWIO `kernel`, optional `bias`), row-major patches."""
  n, h, w, c = pixel_values.shape
  if (h // p) * (w // p) != num_patches:
    raise ValueError(f"pixel_values of {h}x{w} do not match this tower's {num_patches} patches of {p}px")
  # As transformers' strided conv (VALID padding): pixels short of a whole patch at the bottom and the right are
  # not read (SigLIP so400m-patch14-384: 27 x 27 patches of 14 px, the last 6 px unused).
  pixel_values = pixel_values[:, :h - h % p, :w - w % p]
  h, w = h - h % p, w - w % p
  # Patchify then one matmul: identical to the strided conv, and a plain GEMM for the compiler.
  patches = pixel_values.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(n, (h // p) * (w // p), p * p * c).astype(dtype)
  x = patches @ conv["kernel"][...].astype(dtype).reshape(p * p * c, -1)
  return x + conv["bias"][...].astype(dtype) if "bias" in conv else x


def run_encoder(encoder, x, options: ModelOptions, num_layers: int) -> list:
  """[x] and the outputs of the first `num_layers` layers: transformers' `hidden_states`, truncated."""
  def call(layer, x, _):
    x = layer(x)
    return x, x

  # Remat as the decoder (`options.remat`): it costs nothing while the tower is frozen (no gradient reaches it)
  # and bounds its activations when LLaVA-NeXT's stage 2 trains it.
  _, outputs = run_layers(encoder.layers, x, call, options, count=num_layers)
  return [x] + outputs


class CLIPEmbeddings(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype):
    d = cfg.hidden_size
    self.patch_size, self.dtype = cfg.patch_size, dtype
    self.class_embedding = param(rngs, normal_init(), (d,), ("embed",), param_dtype)
    # A conv with stride == kernel == patch, stored HWIO like flax convs.
    self.patch_embedding = nnx.Dict(kernel=param(
        rngs, normal_init(), (cfg.patch_size, cfg.patch_size, cfg.num_channels, d), (None, None, None, "embed"),
        param_dtype))
    self.position_embedding = nnx.Dict(embedding=param(
        rngs, normal_init(), (cfg.num_patches + 1, d), (None, "embed"), param_dtype))

  def __call__(self, pixel_values):
    n = pixel_values.shape[0]
    x = patch_embed(pixel_values, self.patch_embedding, self.patch_size,
                    self.position_embedding["embedding"].shape[0] - 1, self.dtype)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding["embedding"][...].astype(self.dtype)[None]


class CLIPAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, options: ModelOptions):
    d = cfg.hidden_size
    kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.q_proj = Dense(d, d, ("embed", "heads"), **kw)
    self.k_proj = Dense(d, d, ("embed", "heads"), **kw)
    self.v_proj = Dense(d, d, ("embed", "heads"), **kw)
    self.out_proj = Dense(d, d, ("heads", "embed"), **kw)
    self.num_heads, self.head_dim, self.options = cfg.num_attention_heads, cfg.head_dim, options

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                scale=self.head_dim ** -0.5, impl=self.options.attention_impl)
    return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype):
    kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, options: ModelOptions):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.self_attn = CLIPAttention(cfg, options=options, **kw)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(cfg, **kw)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, options: ModelOptions, **kw):
    self.layers = make_layers(lambda: CLIPEncoderLayer(cfg, options=options, **kw), cfg.num_hidden_layers,
                              stacked=options.scan_layers)


class CLIPVisionTower(nnx.Module):
  """Returns every hidden state up to `num_layers`: index 0 is the (pre-LayerNormed) embedding output, index i the
  output of layer i, as in transformers' `hidden_states`."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
               options: ModelOptions = ModelOptions()):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.config, self.options = cfg, options
    self.embeddings = CLIPEmbeddings(cfg, **kw)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)  # sic: HF's name
    self.encoder = CLIPEncoder(cfg, options=options, **kw)
    self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

  def __call__(self, pixel_values, num_layers: int | None = None) -> list:
    """pixel_values [N, H, W, C] -> list of hidden states [N, 1 + patches, D], `num_layers + 1` long."""
    num_layers = self.config.num_hidden_layers if num_layers is None else num_layers
    return run_encoder(self.encoder, self.pre_layrnorm(self.embeddings(pixel_values)), self.options, num_layers)
