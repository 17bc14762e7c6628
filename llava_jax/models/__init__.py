from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.llama import LlamaModel
from llava_jax.models.llava import Llava, MultiModalProjector
from llava_jax.models.siglip import SiglipVisionTower
