"""SigLIP ViT vision tower (LLaVA-OneVision's), attribute names mirroring transformers' SiglipVisionModel.

CLIP's encoder with a different stem: a patch conv with bias, one position per patch, no CLS token and no
pre-LayerNorm. The pooling head (`vision_use_head`) is not built: LLaVA reads hidden states, never the pooled
output. `post_layernorm` is kept only so checkpoints round-trip; features are taken before it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llava_jax.config import VisionConfig
from llava_jax.models.clip import CLIPEncoder, patch_embed, run_encoder
from llava_jax.models.layers import LayerNorm, normal_init, param, zeros_init
from llava_jax.models.options import ModelOptions


class SiglipEmbeddings(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype):
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_size, self.num_patches, self.dtype = p, cfg.num_patches, dtype
    self.patch_embedding = nnx.Dict(
        kernel=param(rngs, normal_init(), (p, p, cfg.num_channels, d), (None, None, None, "embed"), param_dtype),
        bias=param(rngs, zeros_init, (d,), ("embed",), param_dtype))
    self.position_embedding = nnx.Dict(embedding=param(
        rngs, normal_init(), (cfg.num_patches, d), (None, "embed"), param_dtype))

  def __call__(self, pixel_values):
    x = patch_embed(pixel_values, self.patch_embedding, self.patch_size, self.num_patches, self.dtype)
    return x + self.position_embedding["embedding"][...].astype(self.dtype)[None]


class SiglipVisionTower(nnx.Module):
  """Returns every hidden state up to `num_layers`: index 0 is the embedding output, index i the output of layer
  i, as in transformers' `hidden_states`."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
               options: ModelOptions = ModelOptions()):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.config, self.options = cfg, options
    self.embeddings = SiglipEmbeddings(cfg, **kw)
    self.encoder = CLIPEncoder(cfg, options=options, **kw)
    self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

  def __call__(self, pixel_values, num_layers: int | None = None) -> list:
    """pixel_values [N, H, W, C] -> list of hidden states [N, patches, D], `num_layers + 1` long."""
    num_layers = self.config.num_hidden_layers if num_layers is None else num_layers
    return run_encoder(self.encoder, self.embeddings(pixel_values), self.options, num_layers)
