"""The prompt format a LLaVA-OneVision checkpoint defaults to: a llava-hf one renders as its own chat template
(transformers' `LlavaOnevisionProcessor.apply_chat_template` with the chat_template.json llava-hf ships, which has
no system turn), an original lmms-lab one (tokenization "reference") as it was trained, `qwen_1_5`."""

import dataclasses
import json
from unittest import mock

import pytest
from transformers.models.llava_onevision import processing_llava_onevision as hf_proc

import hf_tiny
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.data import conversation, text
from llava_jax.models.llava import Llava
from llava_jax.processor import Processor

# chat_template.json of llava-hf/llava-onevision-qwen2-*-hf, as published (also transformers' processor tests').
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PREPROCESSOR = {"size": {"height": 56, "width": 56}, "image_grid_pinpoints": [[56, 56], [56, 112]],
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def _hf_processor():
  """transformers' processor with the published chat template (its class check, which needs torchvision for the
  video processor, skipped: the classes are right by construction)."""
  from transformers import LlavaOnevisionImageProcessorPil  # pylint: disable=import-outside-toplevel

  with mock.patch.object(hf_proc.LlavaOnevisionProcessor, "check_argument_for_proper_class", lambda *a: None):
    return hf_proc.LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessorPil(**PREPROCESSOR),
                                           tokenizer=hf_tiny.qwen2_byte_tokenizer(), num_image_tokens=16,
                                           vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)


def _model(tmp_path, tokenization: str) -> Llava:
  tokenizer = hf_tiny.qwen2_byte_tokenizer()
  tokenizer.save_pretrained(str(tmp_path))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
  image_token = tokenizer.convert_tokens_to_ids("<image>") if tokenization == "hf" else 300
  vision = VisionConfig(image_size=56, patch_size=14, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                        num_attention_heads=2)
  text_cfg = TextConfig(vocab_size=image_token if tokenization == "reference" else 300, hidden_size=16,
                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        head_dim=8)
  cfg = LlavaConfig(vision=vision, text=text_cfg, image_token_index=image_token, vision_feature_layer=-1,
                    image_grid_pinpoints=[[56, 56], [56, 112]], vision_aspect_ratio="anyres_max_1",
                    tokenization=tokenization)
  return Llava(cfg, assets_dir=str(tmp_path))


def _message(role, text_=None, images=0, videos=0):
  content = [{"type": "image"}] * images + [{"type": "video"}] * videos
  return {"role": role, "content": content + ([{"type": "text", "text": text_}] if text_ else [])}


# (our turns, how many images and videos the first turn carries, the same conversation as llava-hf messages)
CONVERSATIONS = [
    (["What is shown in this image?"], 1, 0, [_message("user", "What is shown in this image?", images=1)]),
    (["Compare these.", "The first is red.", "And the second?"], 2, 0,
     [_message("user", "Compare these.", images=2), _message("assistant", "The first is red."),
      _message("user", "And the second?")]),
    (["Hello!"], 0, 0, [_message("user", "Hello!")]),
    (["Describe both.\nBriefly."], 1, 1, [_message("user", "Describe both.\nBriefly.", images=1, videos=1)]),
]


@pytest.mark.parametrize("turns, images, videos, messages", CONVERSATIONS)
def test_llava_hf_checkpoints_prompt_as_their_chat_template(tmp_path, turns, images, videos, messages):
  proc = Processor.from_model(_model(tmp_path, "hf"))
  assert proc.template.name == "llava_onevision_hf"
  expected = _hf_processor().apply_chat_template(messages, add_generation_prompt=True)
  assert proc.prompt(turns, image=images, videos=videos) == expected


def test_a_templates_rendering_of_a_whole_conversation():
  tpl = conversation.get_template("llava_onevision_hf")
  messages = [_message("user", "What?", images=1), _message("assistant", "A cat.")]
  expected = _hf_processor().apply_chat_template(messages)
  assert tpl.render([(tpl.roles[0], "<image>\nWhat?"), (tpl.roles[1], "A cat.")]) == expected
  assert expected == "<|im_start|>user <image>\nWhat?<|im_end|><|im_start|>assistant \nA cat.<|im_end|>"
  assert tpl.stop_str == "<|im_end|>"
  # A chat's system message (the serving path puts its text in `system`) renders as the chat template's.
  with_system = dataclasses.replace(tpl, system="Be brief.")
  expected = _hf_processor().apply_chat_template([_message("system", "Be brief."), *messages])
  assert with_system.render([(tpl.roles[0], "<image>\nWhat?"), (tpl.roles[1], "A cat.")]) == expected
  assert conversation.split_media_tags("<image>\n<video> Hi <image>") == ("<image><video>", "Hi <image>")
  assert conversation.split_media_tags("Hi") == ("", "Hi")


def test_original_checkpoints_default_to_their_training_template(tmp_path):
  proc = Processor.from_model(_model(tmp_path, "reference"))
  assert proc.template.name == "qwen_1_5"
  assert proc.prompt(["Hi?"], image=True).startswith("<|im_start|>system\nYou are a helpful assistant.")
  assert Processor.from_model(_model(tmp_path, "reference"), template="vicuna_v1").template.name == "vicuna_v1"


def test_the_llava_hf_template_does_not_train():
  with pytest.raises(ValueError, match="qwen_1_5"):
    text.conversation_tokens([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], None,
                             "llava_onevision_hf")
