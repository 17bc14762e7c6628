"""Token ids and labels against a re-statement of LLaVA's `train.py` rules.

The reference below is written from LLaVA's `conversation.py`, `mm_utils.py` and
`train.py` (`preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`,
`preprocess_llama_2`, `preprocess_mpt`, the collator, and the truncation in
`prepare_inputs_labels_for_multimodal`), on torch tensors as there, independently of
`llava_jax.data.text`. The tokenizers are SentencePiece models trained here and
loaded by transformers.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import transformers

from llava_jax.data import conversation, synthetic, text

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
NUM_IMAGE_TOKENS = 7

# ---------------------------------------------------------------- the reference, re-stated


@dataclasses.dataclass
class RefConversation:
  system: str
  roles: tuple
  sep_style: str
  sep: str
  sep2: str = None
  version: str = "Unknown"
  messages: list = dataclasses.field(default_factory=list)

  def get_prompt(self):
    if self.sep_style == "TWO":
      seps = [self.sep, self.sep2]
      ret = self.system + seps[0]
      for i, (role, message) in enumerate(self.messages):
        if message:
          ret += role + ": " + message + seps[i % 2]
        else:
          ret += role + ":"
    elif self.sep_style == "MPT":
      ret = self.system + self.sep
      for role, message in self.messages:
        if message:
          ret += role + message + self.sep
        else:
          ret += role
    elif self.sep_style == "CHATML":  # LLaVA-NeXT's
      ret = "" if self.system == "" else self.system + self.sep + "\n"
      for role, message in self.messages:
        if message:
          ret += role + "\n" + message + self.sep + "\n"
        else:
          ret += role + "\n"
    elif self.sep_style == "LLAMA_2":
      wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg
      wrap_inst = lambda msg: f"[INST] {msg} [/INST]"
      ret = ""
      for i, (role, message) in enumerate(self.messages):
        if message:
          if i == 0:
            message = wrap_sys(self.system) + message
          if i % 2 == 0:
            ret += self.sep + wrap_inst(message)
          else:
            ret += " " + message + " " + self.sep2
      ret = ret.lstrip(self.sep)
    else:
      raise ValueError(self.sep_style)
    return ret


REF_TEMPLATES = {
    "vicuna_v1": RefConversation(
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"), version="v1", sep_style="TWO", sep=" ", sep2="</s>"),
    "llava_v1": RefConversation(
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("USER", "ASSISTANT"), version="v1", sep_style="TWO", sep=" ", sep2="</s>"),
    "llava_llama_2": RefConversation(
        system="You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        roles=("USER", "ASSISTANT"), version="llama_v2", sep_style="LLAMA_2", sep="<s>", sep2="</s>"),
    "mistral_instruct": RefConversation(
        system="", roles=("USER", "ASSISTANT"), version="llama_v2", sep_style="LLAMA_2", sep="",
        sep2="</s>"),
    "chatml_direct": RefConversation(
        system="<|im_start|>system\nAnswer the questions.",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt", sep_style="MPT",
        sep="<|im_end|>"),
    "plain": RefConversation(system="", roles=("", ""), sep_style="PLAIN", sep="\n"),
    "qwen_1_5": RefConversation(  # LLaVA-NeXT's conv_qwen; its labels: tests/test_data_text_qwen.py
        system="<|im_start|>system\nYou are a helpful assistant.", roles=("<|im_start|>user", "<|im_start|>assistant"),
        version="qwen", sep_style="CHATML", sep="<|im_end|>"),
}


def ref_tokenizer_image_token(prompt, tokenizer):
  prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

  def insert_separator(chunks, sep):
    return [ele for sublist in zip(chunks, [sep] * len(chunks)) for ele in sublist][:-1]

  input_ids, offset = [], 0
  if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    input_ids.append(prompt_chunks[0][0])
  for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
    input_ids.extend(x[offset:])
  return torch.tensor(input_ids, dtype=torch.long)


def ref_preprocess_multimodal(source):
  for sentence in source:
    if "<image>" in sentence["value"]:
      sentence["value"] = sentence["value"].replace("<image>", "").strip()
      sentence["value"] = "<image>" + "\n" + sentence["value"]
      sentence["value"] = sentence["value"].strip()
  return source


def _ref_tokenize(texts, tokenizer, has_image, max_length):
  if has_image:
    return torch.stack([ref_tokenizer_image_token(p, tokenizer) for p in texts], dim=0)
  return tokenizer(texts, return_tensors="pt", padding="longest", max_length=max_length,
                   truncation=True).input_ids


def _ref_apply_template(conv, source):
  roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
  if roles[source[0]["from"]] != conv.roles[0]:
    source = source[1:]
  conv.messages = []
  for j, sentence in enumerate(source):
    role = roles[sentence["from"]]
    assert role == conv.roles[j % 2]
    conv.messages.append([role, sentence["value"]])
  return conv.get_prompt()


def ref_preprocess(source, tokenizer, version, has_image, max_length):
  """Returns (input_ids, labels, mismatch) of one sample, before image expansion."""
  conv = copy.deepcopy(REF_TEMPLATES[version])
  pad_token_id = tokenizer.unk_token_id  # train.py: tokenizer.pad_token = tokenizer.unk_token
  legacy = getattr(tokenizer, "legacy", False)
  tok_len = (lambda s: len(ref_tokenizer_image_token(s, tokenizer))) if has_image else (
      lambda s: len(tokenizer(s).input_ids))

  if conv.sep_style == "PLAIN":
    assert len(source) == 2 and "<image>" in source[0]["value"]
    source[0]["value"] = "<image>"
    prompt = source[0]["value"] + source[1]["value"] + conv.sep
    input_ids = ref_tokenizer_image_token(prompt, tokenizer)
    target = input_ids.clone()
    target[:len(ref_tokenizer_image_token(source[0]["value"], tokenizer))] = IGNORE_INDEX
    return input_ids, target, False

  prompt = _ref_apply_template(conv, source)
  input_ids = _ref_tokenize([prompt], tokenizer, has_image, max_length)[0]
  target = input_ids.clone()
  total_len = int(target.ne(pad_token_id).sum())

  if conv.sep_style == "TWO":  # preprocess_v1
    sep = conv.sep + conv.roles[1] + ": "
    rounds = prompt.split(conv.sep2)
    cur_len = 1
  elif conv.sep_style == "LLAMA_2":  # preprocess_llama_2
    sep = "[/INST] "
    rounds = prompt.split(conv.sep2)
    cur_len = 1
  else:  # preprocess_mpt
    sep = conv.sep + conv.roles[1]
    pieces = prompt.split(conv.sep)
    rounds = [conv.sep.join(pieces[:3])]
    for conv_idx in range(3, len(pieces), 2):
      rounds.append(conv.sep.join(pieces[conv_idx:conv_idx + 2]))
    cur_len = 0
  target[:cur_len] = IGNORE_INDEX
  for i, rou in enumerate(rounds):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = tok_len(rou)
    if conv.sep_style == "MPT":
      instruction_len = tok_len(parts[0]) - 1
      if i != 0 and legacy:
        round_len += 1
        instruction_len += 1
    else:
      instruction_len = tok_len(parts[0]) - 2
      if conv.sep_style == "TWO" and i != 0 and not tokenizer.legacy:
        round_len -= 1
        instruction_len -= 1
    target[cur_len:cur_len + instruction_len] = IGNORE_INDEX
    cur_len += round_len
  target[cur_len:] = IGNORE_INDEX
  mismatch = cur_len < max_length and cur_len != total_len
  if mismatch:
    target[:] = IGNORE_INDEX
  return input_ids, target, mismatch


def ref_sample(record, tokenizer, version, max_length, image_token_index):
  """The dataset item, the collator's truncation and the model's image splice."""
  has_image = "image" in record
  source = copy.deepcopy(record["conversations"])
  if has_image:
    source = ref_preprocess_multimodal(source)
  input_ids, labels, mismatch = ref_preprocess(source, tokenizer, version, has_image, max_length)
  input_ids, labels = input_ids[:max_length], labels[:max_length]  # collator
  ids, labs = input_ids.tolist(), labels.tolist()
  cuts = [-1] + [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] + [len(ids)]
  new_ids, new_labels = [], []
  for k in range(len(cuts) - 1):
    new_ids += ids[cuts[k] + 1:cuts[k + 1]]
    new_labels += labs[cuts[k] + 1:cuts[k + 1]]
    if k < len(cuts) - 2:
      new_ids += [image_token_index] * NUM_IMAGE_TOKENS
      new_labels += [IGNORE_INDEX] * NUM_IMAGE_TOKENS
  return np.array(new_ids[:max_length]), np.array(new_labels[:max_length]), mismatch


# ---------------------------------------------------------------- tokenizers and samples


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  lines = synthetic.tokenizer_training_text(seed=1)
  out = {}
  for name, legacy, special in (("llama_legacy", True, ()), ("llama", False, ()),
                                ("chatml", False, ("<|im_start|>", "<|im_end|>")),
                                ("chatml_legacy", True, ("<|im_start|>", "<|im_end|>"))):
    folder = synthetic.build_tokenizer(str(root / name), lines=lines, legacy=legacy,
                                       special_tokens=special)
    out[name] = transformers.AutoTokenizer.from_pretrained(folder)
    assert out[name].legacy == legacy
    out[name].pad_token = out[name].unk_token  # as train.py does
  return out


def h(value):
  return {"from": "human", "value": value}


def g(value):
  return {"from": "gpt", "value": value}


LONG_REPLY = ("The image shows a large red circle near the top left corner on a white background, and "
              "a small blue square below it; there is nothing else in the picture, which is bright.")
SAMPLES = {
    "single": {"image": "a.png", "conversations": [h("<image>\nWhat colour is the shape?"), g("Red.")]},
    "tag_at_end": {"image": "a.png", "conversations": [h("What shape is this?\n<image>"),
                                                       g("A blue circle on a white background.")]},
    "tag_inside": {"image": "a.png", "conversations": [h("Look at <image> and name the colour."),
                                                       g("Green.")]},
    "multi_turn": {"image": "a.png", "conversations": [
        h("<image>\nWhat colour is the shape?"), g("Red."), h("What shape is this?"), g("Square."),
        h("What colour is the background?"), g("The background is white.")]},
    "leading_reply": {"image": "a.png", "conversations": [
        g("Hello."), h("<image>\nWhat is in the picture?"), g("A yellow star.")]},
    "long": {"image": "a.png", "conversations": [h("Describe the image in detail.\n<image>"),
                                                 g(LONG_REPLY)]},
    "text_only": {"conversations": [h("What colour do you get by mixing red and yellow?"), g("Orange.")]},
    "text_multi_turn": {"conversations": [h("How many sides does a triangle have?"), g("Three."),
                                          h("And a square?"), g("Four, all of the same length.")]},
}
PLAIN_SAMPLES = ("single", "tag_at_end", "tag_inside", "long")
CASES = [("plain", "llama"), ("plain", "llama_legacy"), ("vicuna_v1", "llama"),
         ("vicuna_v1", "llama_legacy"), ("llava_v1", "llama"), ("llava_v1", "llama_legacy"),
         ("llava_llama_2", "llama"), ("llava_llama_2", "llama_legacy"), ("mistral_instruct", "llama"),
         ("mistral_instruct", "llama_legacy"), ("chatml_direct", "chatml"),
         ("chatml_direct", "chatml_legacy")]


def _ours(record, tokenizer, template, max_length, image_token_index):
  return text.preprocess_conversation(record["conversations"], tokenizer, template, NUM_IMAGE_TOKENS,
                                      max_length, image_token_index, has_image="image" in record,
                                      sample_id="x")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("template,tok_name", CASES)
def test_ids_and_labels_equal_reference(tokenizers, template, tok_name):
  tokenizer = tokenizers[tok_name]
  image_token_index = len(tokenizer)
  names = PLAIN_SAMPLES if template == "plain" else list(SAMPLES)
  compared = 0
  for name in names:
    record = SAMPLES[name]
    full_ids, _, full_mismatch = ref_sample(record, tokenizer, template, 1 << 20, image_token_index)
    n = len(full_ids)
    image_end = (np.flatnonzero(full_ids == image_token_index).max() + 1 if "image" in record
                 else n // 2)
    # Untruncated; cut inside the last reply; cut a few tokens after the image.
    for max_length in (1 << 20, n - 3, image_end + 2):
      if full_mismatch:
        with pytest.raises(text.TokenizationMismatchError):
          _ours(record, tokenizer, template, max_length, image_token_index)
        continue
      ref_ids, ref_labels, mismatch = ref_sample(record, tokenizer, template, max_length,
                                                 image_token_index)
      assert not mismatch
      ids, labels = _ours(record, tokenizer, template, max_length, image_token_index)
      assert ids.dtype == np.int32 and labels.dtype == np.int32
      np.testing.assert_array_equal(ids, ref_ids, err_msg=f"{name} max_length={max_length}")
      np.testing.assert_array_equal(labels, ref_labels, err_msg=f"{name} max_length={max_length}")
      compared += 1
  if template != "chatml_direct":
    # The comparison must not be vacuous: these templates are consistent for LLaMA tokenizers.
    assert compared == 3 * len(names)


def test_chatml_reference_rule_is_off_by_one_with_a_bos_tokenizer(tokenizers):
  # The upstream preprocess_mpt starts counting at 0, so with a tokenizer that adds BOS
  # the rounds never add up and the reference masks every sample (LLaVA issue #1706).
  with pytest.raises(text.TokenizationMismatchError) as err:
    _ours(SAMPLES["single"], tokenizers["chatml"], "chatml_direct", 4096, 1000)
  assert err.value.total - err.value.counted == 1
  assert err.value.reason == text.SkipReason.TOKENIZATION_MISMATCH


# llava_onevision_hf is no LLaVA template but llava-hf's chat template: tests/test_onevision_template.py checks it.
LLAVA_TEMPLATES = [t for t in conversation.TEMPLATES if t not in ("plain", "llava_onevision_hf")]


@pytest.mark.parametrize("template", LLAVA_TEMPLATES)
def test_prompt_strings_equal_reference(template):
  for name, record in SAMPLES.items():
    source = copy.deepcopy(record["conversations"])
    if "image" in record:
      source = ref_preprocess_multimodal(source)
    expected = _ref_apply_template(copy.deepcopy(REF_TEMPLATES[template]), source)
    if source[0]["from"] == "gpt":
      source = source[1:]
    turns = text.move_image_to_front([(s["from"], s["value"]) for s in source])
    tpl = conversation.get_template(template)
    roles = {"human": tpl.roles[0], "gpt": tpl.roles[1]}
    assert tpl.render([(roles[s], v) for s, v in turns]) == expected, name


@pytest.mark.parametrize("template", LLAVA_TEMPLATES)
def test_generation_prompt_equals_reference(template):
  conv = copy.deepcopy(REF_TEMPLATES[template])
  conv.messages = [[conv.roles[0], "<image>\nWhat colour is the shape?"], [conv.roles[1], "Red."],
                   [conv.roles[0], "What shape is it?"], [conv.roles[1], None]]
  ours = conversation.get_template(template).generation_prompt(
      ["What colour is the shape? <image>", "Red.", "What shape is it?"], image=True)
  assert ours == conv.get_prompt()


def test_generation_prompt_encodes_like_the_training_prefix(tokenizers):
  # The ids of a generation prompt are a prefix of the trained sample's ids: the model
  # continues exactly where its training replies began.
  tok = tokenizers["llama"]
  tpl = conversation.get_template("vicuna_v1")
  ids, labels = _ours(SAMPLES["single"], tok, "vicuna_v1", 4096, 900)
  prompt = text.encode_prompt(tpl.generation_prompt(["What colour is the shape?"], image=True), tok,
                              NUM_IMAGE_TOKENS, 900)
  first_target = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
  np.testing.assert_array_equal(prompt, ids[:len(prompt)])
  assert len(prompt) in (first_target, first_target - 1)  # "ASSISTANT:" vs "ASSISTANT: " + reply
  ref = ref_tokenizer_image_token(tpl.generation_prompt(["<image> Hi"], image=True), tok).tolist()
  expanded = [t for x in ref for t in ([900] * NUM_IMAGE_TOKENS if x == IMAGE_TOKEN_INDEX else [x])]
  np.testing.assert_array_equal(
      text.encode_prompt(tpl.generation_prompt(["<image> Hi"], image=True), tok, NUM_IMAGE_TOKENS, 900),
      expanded)


def test_stop_strings_follow_the_reference_rule():
  assert conversation.get_template("vicuna_v1").stop_str == "</s>"
  assert conversation.get_template("llava_llama_2").stop_str == "<s>"
  assert conversation.get_template("chatml_direct").stop_str == "<|im_end|>"
  assert conversation.get_template("mistral_instruct").stop_str is None


def test_plain_generation_prompt_is_the_image_tag():
  assert conversation.get_template("plain").generation_prompt(["Describe."], image=True) == "<image>"


def test_image_tag_moves_to_front():
  assert text.move_image_to_front([("human", "Look at <image> now"), ("gpt", "ok")]) == [
      ("human", "<image>\nLook at  now"), ("gpt", "ok")]
  assert text.move_image_to_front([("human", "<image>")]) == [("human", "<image>")]


def test_tokenizer_image_token_equals_reference(tokenizers):
  tok = tokenizers["llama"]
  for prompt in ("<image>\nhi", "a <image> b <image>", "<image>", "no image", ""):
    assert text.tokenizer_image_token(prompt, tok) == ref_tokenizer_image_token(prompt, tok).tolist()


@pytest.mark.parametrize("conversations,has_image,reason", [
    ([h("<image>\nQ?"), h("Q2?")], True, text.SkipReason.BAD_CONVERSATION),
    ([h("<image>\nQ?")], True, text.SkipReason.BAD_CONVERSATION),
    ([h("<image>\nQ?"), g("A."), h("Q2?")], True, text.SkipReason.BAD_CONVERSATION),
    ([h("<image>\nQ?"), {"from": "robot", "value": "A."}], True, text.SkipReason.BAD_CONVERSATION),
    ([h("<image>\nQ?"), g("  ")], True, text.SkipReason.BAD_CONVERSATION),
    ([h("Q?"), g("A.")], True, text.SkipReason.IMAGE_WITHOUT_TAG),
    ([h("<image>\nQ?"), g("A.")], False, text.SkipReason.TAG_WITHOUT_IMAGE),
    ([h("<image>\nQ?"), g("A."), h("<image> again?"), g("B.")], True,
     text.SkipReason.MISPLACED_IMAGE_TAG),
    ([h("Q?"), g("<image> A.")], True, text.SkipReason.MISPLACED_IMAGE_TAG),
    ("not a list", True, text.SkipReason.MALFORMED_RECORD),
    ([{"from": "human"}], True, text.SkipReason.MALFORMED_RECORD),
])
def test_bad_conversations_raise_with_reason(tokenizers, conversations, has_image, reason):
  with pytest.raises(text.DataError) as err:
    text.preprocess_conversation(conversations, tokenizers["llama"], "vicuna_v1", 5, 512, 700,
                                 has_image=has_image, sample_id="s-1")
  assert err.value.reason == reason
  assert err.value.sample_id == "s-1" and "s-1" in str(err.value)


def test_separator_inside_a_message_is_a_mismatch(tokenizers):
  # " ASSISTANT: " inside the user text splits the round in three; the reference stops
  # counting there and would train on the sample with all labels masked.
  record = {"image": "a.png", "conversations": [h("<image>\nSay ASSISTANT: hi"), g("Hi.")]}
  _, _, mismatch = ref_sample(record, tokenizers["llama"], "vicuna_v1", 4096, 900)
  assert mismatch
  with pytest.raises(text.TokenizationMismatchError):
    _ours(record, tokenizers["llama"], "vicuna_v1", 4096, 900)


@pytest.mark.parametrize("cut", [1, 3])
def test_truncation_into_the_image_is_reported(tokenizers, cut):
  ids, _ = _ours(SAMPLES["single"], tokenizers["llama"], "vicuna_v1", 4096, 900)
  image_start = int(np.flatnonzero(ids == 900)[0])
  with pytest.raises(text.DataError) as err:
    _ours(SAMPLES["single"], tokenizers["llama"], "vicuna_v1", image_start + cut - 1, 900)
  assert err.value.reason == text.SkipReason.IMAGE_TRUNCATED
