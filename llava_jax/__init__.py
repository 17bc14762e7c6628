"""llava-jax: LLaVA in JAX/Flax, faithful to the reference, sharded over a device mesh."""

from llava_jax.checkpoint import load_checkpoint, save_checkpoint
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.convert import convert_checkpoint, export_hf, load_hf_checkpoint
from llava_jax.generation import generate
from llava_jax.models.llava import Llava

__all__ = ["Llava", "LlavaConfig", "TextConfig", "VisionConfig", "convert_checkpoint", "export_hf", "generate",
           "load_checkpoint", "load_hf_checkpoint", "save_checkpoint"]
