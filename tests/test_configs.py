"""Every file in configs/ builds with every stage and passes the run's checks; its optimizer groups cover every
parameter exactly once and train what its recipe says; its model and template are the published model's. Models are
built abstractly (eval_shape), so the 7B-34B configs cost no memory."""

import functools
import math
import os

import jax
import pytest
from flax import nnx

from llava_jax import lora as lora_lib
from llava_jax.data.conversation import TEMPLATES
from llava_jax.models.llava import Llava
from llava_jax.models.options import ModelOptions
from llava_jax.train import recipes, run_config
from llava_jax.train.cli import load_config, parse
from llava_jax.train.optim import FROZEN, group_labels, path_str

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-len(".py")] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))

# The published model of each recipe: text (hidden, layers, heads, KV heads, vocab), vision tower (hidden, layers,
# image size, patch), projector, the stage-2 template, anyres, and whether stage 2 trains the tower (LLaVA-1.6);
# OneVision's also its stages, image token and tied embeddings.
TINY = dict(text=(64, 2, 4, 2, 256), vision=(64, 2, 28, 7), projector="mlp2x_gelu", template="vicuna_v1",
            anyres=False, tower_lr=None)
SIGLIP_384 = (1152, 26, 384, 14)  # so400m-patch14-384, its last layer dropped
OV = dict(vision=SIGLIP_384, projector="mlp2x_gelu", template="qwen_1_5", anyres=True, tower_lr=2e-6,
          stages=("stage1", "si", "ov"), image_token=151646)
CLIP_336 = (1024, 24, 336, 14)
V15 = dict(vision=CLIP_336, projector="mlp2x_gelu", template="vicuna_v1", anyres=False, tower_lr=None)
V16 = dict(vision=CLIP_336, projector="mlp2x_gelu", anyres=True, tower_lr=recipes.NEXT_VISION_TOWER_LR)
PUBLISHED = {
    "tiny": TINY,
    "tiny_next": dict(TINY, anyres=True),
    "llava_v1_7b": dict(V15, vision=(1024, 24, 224, 14), projector="linear", template="llava_v1",
                        text=(4096, 32, 32, 32, 32000)),  # LLaMA/Vicuna-7B, CLIP ViT-L/14 at 224
    "llava_v1_5_7b": dict(V15, text=(4096, 32, 32, 32, 32000)),  # Vicuna-7B v1.5
    "llava_v1_5_13b": dict(V15, text=(5120, 40, 40, 40, 32000)),  # Vicuna-13B v1.5
    "llava_v1_6_vicuna_7b": dict(V16, text=(4096, 32, 32, 32, 32000), template="vicuna_v1"),
    "llava_v1_6_vicuna_13b": dict(V16, text=(5120, 40, 40, 40, 32000), template="vicuna_v1"),
    "llava_v1_6_mistral_7b": dict(V16, text=(4096, 32, 32, 8, 32000), template="mistral_instruct"),
    "llava_v1_6_34b": dict(V16, text=(7168, 60, 56, 8, 64000), template="chatml_direct"),  # Nous-Hermes-2-Yi-34B
    "llava_onevision_qwen2_0_5b": dict(OV, text=(896, 24, 14, 2, 151936), tied=True),
    "llava_onevision_qwen2_7b": dict(OV, text=(3584, 28, 28, 4, 152064)),
    "llava_onevision_qwen2_72b": dict(OV, text=(8192, 80, 64, 8, 152064)),
    "tiny_onevision": dict(TINY, vision=(64, 2, 28, 7), template="qwen_1_5", anyres=True, tower_lr=2e-6,
                           stages=("stage1", "si", "ov"), tied=True),
}
TRAINS_ALL = ("si", "ov")  # OneVision: tower, projector and LLM


def stages(name):
  return PUBLISHED[name].get("stages", recipes.LLAVA_STAGES)
LLM = ("language_model", "lm_head", "image_newline")


def test_every_config_is_described():
  assert sorted(PUBLISHED) == CONFIGS


def spec(name, stage):
  return os.path.join(ROOT, "configs", f"{name}.py") + f":{stage}"


@functools.lru_cache(maxsize=None)
def abstract_model(name):
  """The model's params as the trainer holds them (layers stacked where the config scans), shapes only."""
  config = load_config(spec(name, stages(name)[-1]))  # the last stage: everything it trains exists
  cfg = run_config.model_config(config)
  model = nnx.eval_shape(lambda: Llava(cfg, options=ModelOptions(scan_layers=config.scan_layers)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def trainable_tree(name, config):
  model = abstract_model(name)
  adapters = jax.eval_shape(lambda: lora_lib.init(model, config.lora.r, jax.random.key(0))) \
      if config.stage == "lora" else {}
  return {"model": model, "lora": adapters}


def mesh_devices(config):
  return math.prod(config.mesh) if all(d > 0 for d in config.mesh) else 8


@pytest.mark.parametrize("name, stage", [(n, s) for n in CONFIGS for s in stages(n)])
def test_every_config_and_stage_builds_and_its_groups_train_what_the_recipe_says(name, stage):
  config = load_config(spec(name, stage), {"data.json_path": "train.json"} if name.startswith("llava") else {})
  assert config.stage == stage
  run_config.check_config(config, mesh_devices(config))
  optim = run_config.optim_config(config)
  groups = recipes.optim_groups(optim, stage)
  params = trainable_tree(name, config)
  labels = group_labels(params, groups)  # raises unless every leaf is in exactly one group
  by_part = {}
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    parts = path_str(path).split("/")
    by_part.setdefault(parts[0] if parts[0] == "lora" else parts[1], set()).add(label)

  tower_lr = PUBLISHED[name]["tower_lr"]
  expected = {"vision_tower": "vision" if (stage == "stage2" and tower_lr) or stage in TRAINS_ALL else FROZEN,
              "multi_modal_projector": "projector",
              **{part: "llm" if stage in ("stage2", *TRAINS_ALL) else FROZEN for part in LLM if part in by_part}}
  if stage == "lora":
    expected["lora"] = "lora"
  assert by_part == {part: {label} for part, label in expected.items()}
  assert ("image_newline" in by_part) == PUBLISHED[name]["anyres"]

  lrs = {g.name: g.lr for g in groups if g.lr is not None}
  o = config.optimizer
  want = {"stage1": {"projector": o.lr}, "stage2": {"projector": o.lr, "llm": o.lr},
          "lora": {"projector": 2e-5, "lora": o.lr}, "si": {"projector": o.lr, "llm": o.lr},
          "ov": {"projector": o.lr, "llm": o.lr}}[stage]
  if expected["vision_tower"] == "vision":
    want["vision"] = tower_lr
  assert lrs == want
  assert o.lr == {"stage1": 2e-3 if name == "llava_v1_7b" else 1e-3, "stage2": 2e-5, "lora": 2e-4, "si": 1e-5,
                  "ov": 1e-5}[stage]


@pytest.mark.parametrize("name", CONFIGS)
def test_model_and_template_are_the_published_ones(name):
  published = PUBLISHED[name]
  for stage in stages(name):
    config = load_config(spec(name, stage))
    template = "plain" if stage == "stage1" else published["template"]
    assert config.data.template == template and template in TEMPLATES
  cfg = run_config.model_config(config)
  t, v = cfg.text, cfg.vision
  assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == \
      published["text"]
  assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == published["vision"]
  assert cfg.projector_type == published["projector"]
  assert (cfg.image_grid_pinpoints is not None) == published["anyres"]
  assert cfg.image_token_index == published.get("image_token", t.vocab_size) and cfg.num_image_tokens > 0
  assert t.tie_word_embeddings == published.get("tied", False)

  # The built params have these shapes (the stacked layer axis where the config scans).
  params = abstract_model(name)
  hidden, layers, heads, kv_heads, vocab = published["text"]
  lm = params["language_model"]
  assert lm["embed_tokens"]["embedding"].shape == (vocab, hidden)
  if published.get("tied"):
    assert "lm_head" not in params
  else:
    assert params["lm_head"]["kernel"].shape == (hidden, vocab)
  attn = lm["layers"]["self_attn"] if config.scan_layers else lm["layers"][layers - 1]["self_attn"]
  lead = (layers,) if config.scan_layers else ()
  assert attn["q_proj"]["kernel"].shape == (*lead, hidden, heads * t.head_dim)
  assert attn["k_proj"]["kernel"].shape == (*lead, hidden, kv_heads * t.head_dim)
  v_hidden, _, image, patch = published["vision"]
  embeddings = params["vision_tower"]["embeddings"]
  assert embeddings["patch_embedding"]["kernel"].shape == (patch, patch, 3, v_hidden)
  assert embeddings["position_embedding"]["embedding"].shape == ((image // patch) ** 2 + v.has_cls, v_hidden)


@pytest.mark.parametrize("preset, devices", [("v4-32", 16), ("v5p-64", 32), ("v5e-256", 256), ("gpu-8", 8)])
def test_presets_give_meshes_that_divide_their_devices(preset, devices):
  config = load_config(spec("llava_v1_5_7b", f"stage2,{preset}"))
  data, fsdp, tensor = config.mesh
  assert data * fsdp * tensor == devices
  assert config.batch_size % (data * fsdp) == 0  # the global batch splits over the batch axes


def test_unknown_override_is_an_error():
  with pytest.raises(ValueError, match="config.optimizer.learning_rate"):
    parse(["--config", spec("tiny", "stage1"), "--workdir", "w", "--config.optimizer.learning_rate=1"])
  with pytest.raises(ValueError, match="unknown stage 'stage3'"):
    parse(["--config", spec("tiny", "stage3"), "--workdir", "w"])


COVER_TINY = ("('frozen', 'vision_tower', 'frozen'), ('projector', 'multi_modal_projector', 'lr'), "
              "('llm', 'language_model|lm_head', 'lr')")


@pytest.mark.parametrize("groups, error", [
    ("(('llm', 'language_model(', 'lr'),)", r"pattern 'language_model\(' is not a regular expression"),
    ("(('llm', 'language_model', 'lr_of_llm'),)", "learning rate 'lr_of_llm'"),
    ("(('llm', 'language_model', 'frozen'),)", "only 'frozen' entries are named 'frozen'"),
    ("(('llm', 'language_model', 'lr'), ('llm', 'lm_head', 1.0))", "llm has two learning rates"),
    ("(('llm', 'language_model'),)", r"use \(name, pattern, lr\)"),
])
def test_a_malformed_groups_override_fails_the_config_check(groups, error):
  config, _ = parse(["--config", spec("tiny", "stage2"), "--workdir", "w", f"--config.optimizer.groups={groups}"])
  with pytest.raises(run_config.ConfigValueError, match=error) as e:
    run_config.check_config(config, 1)
  assert "set --config.optimizer.groups" in str(e.value)


@pytest.mark.parametrize("groups, error", [
    ("(('projector', 'multi_modal_projector', 'lr'), ('llm', 'language_model|lm_head', 'lr'))",
     "parameter model/vision_tower/.* is in no optimizer group"),
    (f"({COVER_TINY}, ('vision', 'vision_tower/encoder', 1e-5))",
     r"parameter model/vision_tower/encoder/.* is in 2 optimizer groups \(frozen 'vision_tower', vision"),
    (f"({COVER_TINY}, ('lora', 'lora', 'lr'))", "optimizer group lora 'lora' matches no parameter"),
    (f"({COVER_TINY}, ('tower', 'visiontower', 'lr'))", "optimizer group tower 'visiontower' matches no parameter"),
])
def test_groups_that_miss_or_overlap_parameters_fail_when_labelled(groups, error):
  """Well-formed entries that leave a parameter out, take one twice or name nothing fail as the trainer labels the
  model's leaves, before anything compiles."""
  config, _ = parse(["--config", spec("tiny", "stage2"), "--workdir", "w", f"--config.optimizer.groups={groups}"])
  run_config.check_config(config, 1)
  with pytest.raises(ValueError, match=error):
    group_labels(trainable_tree("tiny", config), recipes.optim_groups(run_config.optim_config(config), "stage2"))


def test_optimizer_groups_override_replaces_the_stage():
  three = (("vision", "vision_tower", 2e-6), ("projector", "multi_modal_projector", 1e-5),
           ("llm", "language_model|lm_head|image_newline", "lr*0.5"))
  config, _ = parse(["--config", spec("tiny_next", "stage2"), "--workdir", "w",
                     f"--config.optimizer.groups={three!r}"])
  run_config.check_config(config, 1)
  groups = recipes.optim_groups(run_config.optim_config(config), "stage2")
  assert [(g.name, g.lr) for g in groups] == [("vision", 2e-6), ("projector", 1e-5), ("llm", 1e-5)]
  labels = group_labels(trainable_tree("tiny_next", config), groups)
  assert set(jax.tree.leaves(labels)) == {"vision", "projector", "llm"}
  config.train_vision_tower = True  # two ways of saying what trains
  with pytest.raises(run_config.ConfigValueError, match="train_vision_tower"):
    run_config.check_config(config, 1)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_7b_config_has_the_published_parameter_count():
  """LLaVA-1.5-7B: Vicuna-7B (6.74B) + CLIP ViT-L/14-336 (0.30B) + the MLP projector (21M) = 7.06B."""
  params = abstract_model("llava_v1_5_7b")
  llm, clip, proj = (_count(params[k]) for k in ("language_model", "vision_tower", "multi_modal_projector"))
  llm += _count(params["lm_head"])
  assert abs(llm - 6.738e9) < 0.005e9, llm
  assert abs(clip - 0.3035e9) < 0.001e9, clip
  assert proj == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20.98M
  assert abs(llm + clip + proj - 7.063e9) < 0.005e9
  # The reference recipe.
  config = load_config(spec("llava_v1_5_7b", "stage2"))
  assert (config.batch_size, config.optimizer.lr, config.data.seq_len, config.data.template) == (
      128, 2e-5, 2048, "vicuna_v1")
  stage1 = load_config(spec("llava_v1_5_7b", "stage1"))
  assert (stage1.batch_size, stage1.optimizer.lr, stage1.data.template) == (256, 1e-3, "plain")
  lora = load_config(spec("llava_v1_5_7b", "lora"))
  assert (lora.optimizer.lr, lora.optimizer.projector_lr, lora.lora.r, lora.lora.alpha) == (2e-4, 2e-5, 128, 256)


def test_13b_and_v1_configs():
  assert abs(_count(abstract_model("llava_v1_5_13b")) - 13.35e9) < 0.03e9  # Vicuna-13B + CLIP + projector
  cfg = run_config.model_config(load_config(spec("llava_v1_7b", "stage1")))
  assert cfg.projector_type == "linear" and cfg.vision.image_size == 224 and cfg.num_image_tokens == 256


@pytest.mark.parametrize("name", [n for n in CONFIGS if "onevision" in n])
def test_onevision_configs_are_the_reference_recipe(name):
  """The settings of LLaVA-NeXT's OneVision scripts and of transformers' LlavaOnevisionConfig defaults."""
  tiny = name.startswith("tiny")
  for stage in ("stage1", "si", "ov"):
    config = load_config(spec(name, stage))
    o = config.optimizer
    assert (o.warmup_ratio, o.weight_decay) == (0.03, 0.0)
    assert o.vision_tower_lr == (None if stage == "stage1" else 2e-6)
    if not tiny:
      assert config.data.seq_len == (8192 if stage == "stage1" else 32768)
      assert config.data.max_frames == (32 if stage == "ov" else 0)  # videos only in the OneVision stage
      assert config.batch_size == 256 and config.data.group_by_modality_length == (stage != "stage1")
  cfg = run_config.model_config(config)
  assert cfg.is_onevision and cfg.vision_aspect_ratio == "anyres_max_9"
  assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")
  v, t = cfg.vision, cfg.text
  assert (v.model_type, v.hidden_act, v.layer_norm_eps) == ("siglip", "gelu_pytorch_tanh", 1e-6)
  assert (t.model_type, t.qkv_bias, t.rms_norm_eps) == ("qwen2", True, 1e-6)
  if tiny:
    return
  assert cfg.image_grid_pinpoints == tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))
  assert len(cfg.image_grid_pinpoints) == 36
  assert (cfg.image_token_index, cfg.video_token_index) == (151646, 151647)
  assert v.intermediate_size == 4304 and v.num_attention_heads == 16 and cfg.num_image_tokens == 729
  assert t.rope["rope_theta"] == 1e6 and t.head_dim * t.num_attention_heads == t.hidden_size
  assert t.intermediate_size == {"0_5b": 4864, "7b": 18944, "72b": 29568}[name.split("qwen2_")[1]]


def test_onevision_7b_parameter_count_and_stage_names():
  """LLaVA-OneVision-7B: Qwen2-7B (7.62B) + SigLIP so400m less a layer (0.40B) + the projector (17M) = 8.03B."""
  assert abs(_count(abstract_model("llava_onevision_qwen2_7b")) - 8.03e9) < 0.01e9
  with pytest.raises(ValueError, match="LLaVA-OneVision stage"):
    load_config(spec("llava_v1_5_7b", "si"))
  with pytest.raises(ValueError, match="for LLaVA-OneVision"):
    load_config(spec("llava_onevision_qwen2_7b", "stage2"))
