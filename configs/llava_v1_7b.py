"""LLaVA-1.0 (7B): CLIP ViT-L/14 at 224 px, a single linear projector, LLaMA/Vicuna-7B.

Stage 1 trains the projector on CC-595K (the paper's filtered CC3M), stage 2 fine-tunes projector + LLM on
LLaVA-Instruct-158K; both use the LLaVA-1.5 schedule shape here (warm-up 0.03, cosine, one epoch per stage), with
LLaVA-1.0's batch 128 / 32 and learning rates 2e-3 / 2e-5, and images centre-cropped rather than padded.
"""

from llava_jax.train import recipes

CLIP_L_224 = dict(recipes.CLIP_L_336, image_size=224)
CC595K_SAMPLES = 595_375
INSTRUCT158K_SAMPLES = 157_712


def get_config(arg: str = "stage1"):
  c = recipes.llava_v1_5(arg, CLIP_L_224, recipes.VICUNA_7B)
  stage = arg.partition(",")[0]
  c.model.projector_type = "linear"
  c.data.aspect_ratio = "crop"
  c.data.template = "plain" if stage == "stage1" else "llava_v1"
  c.batch_size = 128 if stage == "stage1" else 32
  c.optimizer.lr = {"stage1": 2e-3, "stage2": 2e-5, "lora": 2e-4}[stage]
  c.total_steps = -(-(CC595K_SAMPLES if stage == "stage1" else INSTRUCT158K_SAMPLES) // c.batch_size)
  return c
