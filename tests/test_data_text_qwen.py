"""LLaVA-OneVision's `qwen_1_5` ids and labels against a re-statement of LLaVA-NeXT's `train.py`.

The reference below is written from LLaVA-NeXT's `preprocess_multimodal` and `preprocess_qwen` (a tokenizer copy
with "<image>" added as a special token, each turn through a reset chat template, the 198 / <|im_start|> /
<|im_end|> unmasking pass), the collator's truncation and the model's image splice, independently of
`llava_jax.data.text`. The tokenizer is a tiny Qwen2 one built offline (`synthetic.build_qwen_tokenizer`).
"""

import copy
import re

import numpy as np
import pytest
import transformers

from llava_jax.data import conversation, synthetic, text

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
NUM_IMAGE_TOKENS = 5
IMAGE_ID = 600  # the model's image token id, past the tiny vocabulary

# ---------------------------------------------------------------- the reference, re-stated

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def ref_preprocess_multimodal(source):
  for sentence in source:
    num_im = len(re.findall("<image>", sentence["value"]))
    if num_im == 1 and "<image>" in sentence["value"] and not sentence["value"].startswith("<image>"):
      sentence["value"] = sentence["value"].replace("<image>", "").strip()
      sentence["value"] = "<image>" + "\n" + sentence["value"]
      sentence["value"] = sentence["value"].strip()
  return source


def ref_preprocess_qwen(source, tokenizer, has_image, system_message="You are a helpful assistant."):
  roles = {"human": "user", "gpt": "assistant"}
  tokenizer = copy.deepcopy(tokenizer)
  if has_image:
    tokenizer.add_tokens(["<image>"], special_tokens=True)
  image_token_index = tokenizer.convert_tokens_to_ids("<image>")
  im_start, im_end = tokenizer.convert_tokens_to_ids(tokenizer.extra_special_tokens)  # additional_special_tokens
  unmask_tokens_idx = [198, im_start, im_end]
  tokenizer.chat_template = CHAT_TEMPLATE
  encode = lambda conv: tokenizer.apply_chat_template(conv, return_dict=False)
  if roles[source[0]["from"]] != roles["human"]:
    source = source[1:]
  input_id, target = [], []
  input_id += encode([{"role": "system", "content": system_message}])
  target += [IGNORE_INDEX] * len(input_id)
  for conv in source:
    role = roles.get(conv["from"], conv["from"])
    encode_id = encode([{"role": role, "content": conv["value"]}])
    input_id += encode_id
    if role in ["user", "system"]:
      target += [IGNORE_INDEX] * len(encode_id)
    else:
      target += encode_id
  assert len(input_id) == len(target)
  for idx, encode_id in enumerate(input_id):
    if encode_id in unmask_tokens_idx:
      target[idx] = encode_id
    if encode_id == image_token_index:
      input_id[idx] = IMAGE_TOKEN_INDEX
  return input_id, target


def ref_sample(record, tokenizer, max_length):
  """The dataset item, the collator's truncation and the model's image splice."""
  has_image = "image" in record
  source = copy.deepcopy(record["conversations"])
  if has_image:
    source = ref_preprocess_multimodal(source)
  ids, labs = ref_preprocess_qwen(source, tokenizer, has_image)
  ids, labs = ids[:max_length], labs[:max_length]
  new_ids, new_labels = [], []
  for t, lab in zip(ids, labs):
    if t == IMAGE_TOKEN_INDEX:
      new_ids += [IMAGE_ID] * NUM_IMAGE_TOKENS
      new_labels += [IGNORE_INDEX] * NUM_IMAGE_TOKENS
    else:
      new_ids.append(t)
      new_labels.append(lab)
  return np.array(new_ids[:max_length]), np.array(new_labels[:max_length])


# ---------------------------------------------------------------- tokenizer and samples


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = synthetic.build_qwen_tokenizer(str(tmp_path_factory.mktemp("qwen")),
                                          lines=synthetic.tokenizer_training_text(seed=2))
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  assert tok.bos_token_id is None and tok("\n").input_ids == [198]
  return tok


def h(value):
  return {"from": "human", "value": value}


def g(value):
  return {"from": "gpt", "value": value}


SAMPLES = {
    "single": {"image": "a.png", "conversations": [h("<image>\nWhat colour is the shape?"), g("Red.")]},
    "tag_first_no_newline": {"image": "a.png", "conversations": [h("<image>What shape is this?"), g("A star.")]},
    "tag_at_end": {"image": "a.png", "conversations": [h("What shape is this?\n<image>"),
                                                       g("A blue circle on a white background.")]},
    "tag_inside": {"image": "a.png", "conversations": [h("Look at <image> and name the colour."), g("Green.")]},
    "multi_turn": {"image": "a.png", "conversations": [
        h("<image>\nWhat colour is the shape?"), g("Red."), h("What shape is this?\nAnswer briefly."),
        g("Square."), h("What colour is the background?"), g("The background is white.\n\nIt is plain.")]},
    "leading_reply": {"image": "a.png", "conversations": [
        g("Hello."), h("<image>\nWhat is in the picture?"), g("A yellow star.")]},
    # Several images: each tag stays where it is, one placeholder per image in order.
    "two_in_one_turn": {"image": ["a.png", "b.png"], "conversations": [
        h("<image>\n<image>\nWhich shape is larger?"), g("The first one.")]},
    "two_inside_text": {"image": ["a.png", "b.png"], "conversations": [
        h("Image 1: <image> Image 2: <image> What differs?"), g("The colour.")]},
    "across_turns": {"image": ["a.png", "b.png", "c.png"], "conversations": [
        h("<image>\n<image>\nCompare them."), g("Both are red."), h("And this one? <image>"), g("Blue.")]},
    "text_only": {"conversations": [h("What colour do you get by mixing red and yellow?"), g("Orange.")]},
    "text_multi_turn": {"conversations": [h("How many sides does a triangle have?\n"), g("Three."),
                                          h("And a square?\n\nBe short."), g("Four,\nall of the same length.")]},
}


def _ours(record, tokenizer, max_length):
  return text.preprocess_conversation(record["conversations"], tokenizer, "qwen_1_5", NUM_IMAGE_TOKENS, max_length,
                                      IMAGE_ID, has_image="image" in record, sample_id="x")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(SAMPLES))
def test_ids_and_labels_equal_reference(tokenizer, name):
  record = SAMPLES[name]
  full_ids, _ = ref_sample(record, tokenizer, 1 << 20)
  n = len(full_ids)
  image_end = np.flatnonzero(full_ids == IMAGE_ID).max() + 1 if "image" in record else n // 2
  for max_length in (1 << 20, n - 3, int(image_end) + 2):
    ref_ids, ref_labels = ref_sample(record, tokenizer, max_length)
    ids, labels = _ours(record, tokenizer, max_length)
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    np.testing.assert_array_equal(ids, ref_ids, err_msg=f"{name} max_length={max_length}")
    np.testing.assert_array_equal(labels, ref_labels, err_msg=f"{name} max_length={max_length}")


def test_newline_and_chatml_markers_stay_unmasked_in_system_and_user_turns(tokenizer):
  """The reference's quirk, spelled out: outside the replies exactly the ids 198 ("\\n"), <|im_start|> and
  <|im_end|> are targets; inside them every token is, the "<|im_start|>assistant\\n" header too."""
  ids, labels = _ours(SAMPLES["multi_turn"], tokenizer, 1 << 20)
  im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
  starts = np.flatnonzero(ids == im_start)
  assert len(starts) == 7  # system + 3 user + 3 assistant turns
  for k, (a, b) in enumerate(zip(starts, [*starts[1:], len(ids)])):
    turn_ids, turn_labels = ids[a:b], labels[a:b]
    if k and k % 2 == 0:  # an assistant turn
      np.testing.assert_array_equal(turn_labels, turn_ids)
      assert tokenizer.decode(turn_ids).startswith("<|im_start|>assistant\n")
    else:
      kept = np.isin(turn_ids, [198, im_start, im_end])
      np.testing.assert_array_equal(turn_labels, np.where(kept, turn_ids, IGNORE_INDEX))
      assert kept.sum() >= 3  # <|im_start|>, its role's "\n", <|im_end|> (and its "\n")
  assert labels[0] == im_start  # the very first token is a target too (no loss reads it after the shift)


def test_ids_are_the_rendered_prompt_and_the_generation_prompt_a_prefix(tokenizer):
  tpl = conversation.get_template("qwen_1_5")
  record = SAMPLES["multi_turn"]
  ids, _ = _ours(record, tokenizer, 1 << 20)
  turns = [(tpl.roles[t["from"] == "gpt"], t["value"]) for t in record["conversations"]]
  np.testing.assert_array_equal(text.encode_prompt(tpl.render(turns), tokenizer, NUM_IMAGE_TOKENS, IMAGE_ID), ids)
  prompt = text.encode_prompt(tpl.generation_prompt(["What colour is the shape?"], image=True), tokenizer,
                              NUM_IMAGE_TOKENS, IMAGE_ID)
  single, labels = _ours(SAMPLES["single"], tokenizer, 1 << 20)
  np.testing.assert_array_equal(prompt, single[:len(prompt)])
  assert tokenizer.decode(single[len(prompt):]) == "Red.<|im_end|>\n"
  assert (labels[len(prompt):] == single[len(prompt):]).all()


def test_template_strings():
  tpl = conversation.get_template("qwen_1_5")
  assert conversation.get_template("qwen_2") is tpl
  assert tpl.stop_str == "<|im_end|>"
  assert tpl.generation_prompt(["Hi <image>", "Hello.", "Bye?"], image=True) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n")


def test_next_moves_a_single_tag_only():
  assert text.move_image_to_front_next([("human", "<image>What?"), ("gpt", "ok")]) == [
      ("human", "<image>What?"), ("gpt", "ok")]
  assert text.move_image_to_front_next([("human", "What? <image>")]) == [("human", "<image>\nWhat?")]
  assert text.move_image_to_front_next([("human", "A <image> B <image>")]) == [("human", "A <image> B <image>")]


def test_a_tokenizer_without_chatml_markers_is_refused(tmp_path):
  llama = transformers.AutoTokenizer.from_pretrained(synthetic.build_tokenizer(str(tmp_path / "llama")))
  with pytest.raises(ValueError, match="<|im_start|>"):
    _ours(SAMPLES["single"], llama, 4096)


def test_several_tags_stay_in_place_one_placeholder_per_image(tokenizer):
  ids, labels, has_image = text.conversation_tokens(SAMPLES["across_turns"]["conversations"], tokenizer, "qwen_1_5",
                                                    has_image=True, sample_id="x")
  assert has_image and (ids == text.IMAGE_PLACEHOLDER).sum() == 3
  # A single tag in a later turn moves to the front of that turn, as the reference's per-turn rewrite does.
  assert tokenizer.decode(ids[np.flatnonzero(ids == text.IMAGE_PLACEHOLDER)[-1] + 1:]).startswith("\nAnd this one?")
  ids, _ = text.expand_image_tokens(ids, labels, [5, 7, 9], 1 << 20, IMAGE_ID)  # images of their own counts
  runs = np.diff(np.flatnonzero(np.diff(np.r_[0, ids == IMAGE_ID, 0])))[::2]
  assert list(runs) == [5, 7, 9]


def test_a_tag_in_a_reply_is_refused_and_other_templates_keep_one_tagged_turn(tokenizer):
  reply_tag = [h("<image>\nWhat?"), g("This: <image>")]
  with pytest.raises(text.DataError, match="user turns only"):
    text.conversation_tokens(reply_tag, tokenizer, "qwen_1_5", has_image=True)
  with pytest.raises(text.DataError, match="exactly one user turn"):
    text.conversation_tokens(SAMPLES["across_turns"]["conversations"], tokenizer, "vicuna_v1", has_image=True)


@pytest.mark.parametrize("name, default", [("qwen_1_5", "You are a helpful assistant."),
                                           ("chatml_direct", "Answer the questions."),
                                           ("vicuna_v1", None)])
def test_a_chat_system_message_keeps_the_templates_system_header(name, default):
  """A chat's system message replaces the system text only: the ChatML templates keep their
  "<|im_start|>system\n" header (the server once swapped in the bare text, losing it)."""
  template = conversation.get_template(name)
  messages = [(template.roles[0], "Hi"), (template.roles[1], None)]
  if default is not None:
    assert template.with_system(default).render(messages) == template.render(messages)
    assert template.with_system("Be brief.").render(messages).startswith("<|im_start|>system\nBe brief.<|im_end|>")
  else:
    assert template.with_system("Be brief.").render(messages).startswith("Be brief. USER: Hi")
