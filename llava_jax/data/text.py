"""Conversation -> (input_ids, labels), position by position as LLaVA's `train.py`.

The reference builds the prompt string with the template, tokenizes it with
`tokenizer_image_token` (one IMAGE_TOKEN_INDEX = -200 per "<image>"), and masks the
labels by re-tokenizing each round and each instruction and counting tokens, with
fixed corrections: -2 (BOS and the space that merges into the reply's first token)
for vicuna/llama-2, -1 for ChatML, and a one-token shift on later rounds that
depends on the tokenizer's `legacy` flag. When those counts do not add up to the
length of the whole prompt it prints "tokenization mismatch" and trains on the
sample with every label masked. We keep its arithmetic (the model learned from
exactly those labels) but raise `TokenizationMismatchError` instead, so that the
pipeline skips and counts the sample.

LLaVA-OneVision's `qwen_1_5` follows LLaVA-NeXT's `preprocess_qwen` instead: turn by
turn, with its quirk that "\\n" (id 198), <|im_start|> and <|im_end|> are targets in
every turn, system and user turns included (`_qwen_ids_and_labels`). Several "<image>"
tags (records of several images), in one user turn or in several, stay where they are
and each becomes the placeholder of the next image in order, as the reference's
`preprocess_multimodal` leaves them; the older templates keep one tag in one turn.

After masking, the single -200 placeholder is expanded to `num_image_tokens` copies
of `image_token_index` (the HF / our model convention: one id per image feature; for
LLaVA-NeXT a count per image, which depends on its size: `expand_image_tokens`),
with ignored labels, and the result is truncated to `max_length`, which is where the
reference truncates too (after splicing in the image features).

Two places where we are stricter than the reference, both reported as `DataError`:
the length check also runs on sequences longer than `max_length` (the reference
skips it there and may train on misaligned labels), and samples that would crash or
misbehave in the reference (non-alternating turns, a missing reply, an unknown role,
"<image>" tags that do not match the image) are rejected with a reason.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np

from llava_jax.config import IGNORE_INDEX  # re-exported: the data side's name for it
from llava_jax.data.conversation import DEFAULT_IMAGE_TOKEN, SeparatorStyle, Template, get_template

# The reference's IMAGE_TOKEN_INDEX: a placeholder that exists only inside this module.
IMAGE_PLACEHOLDER = -200


class SkipReason(str, enum.Enum):
  """Why a sample was skipped; the values are the keys of the pipeline's counts."""
  MALFORMED_RECORD = "malformed_record"      # JSONL line that is not JSON, or a record of the wrong shape
  MISSING_IMAGE = "missing_image"            # the image file does not exist
  UNREADABLE_IMAGE = "unreadable_image"      # truncated, corrupt or not an image
  EMPTY_IMAGE = "empty_image"                # zero bytes, or zero width / height
  BAD_CONVERSATION = "bad_conversation"      # roles do not alternate, no reply, empty message
  TAG_WITHOUT_IMAGE = "image_tag_without_image"
  IMAGE_WITHOUT_TAG = "image_without_tag"
  MISPLACED_IMAGE_TAG = "misplaced_image_tag"  # "<image>" in several turns or in a reply
  TOKENIZATION_MISMATCH = "tokenization_mismatch"
  IMAGE_TRUNCATED = "image_truncated"        # max_length cuts off (part of) the image tokens
  NO_TARGETS = "no_targets"                  # every label is masked (e.g. reply truncated away)
  IMAGE_OUTSIDE_DIR = "image_outside_dir"    # the image path resolves outside image_dir ("../", absolute, symlink)
  IMAGE_TOO_LARGE = "image_too_large"        # decoded or padded-to-square pixels over the budget


class DataError(ValueError):
  """A sample that cannot be trained on; `reason` says why, `sample_id` which one."""

  def __init__(self, reason: SkipReason, message: str, sample_id: Any = None):
    super().__init__(f"sample {sample_id!r} skipped ({reason.value}): {message}")
    self.reason = reason
    self.message = message
    self.sample_id = sample_id

  def __reduce__(self):  # Worker processes send errors back pickled.
    return DataError, (self.reason, self.message, self.sample_id)


class TokenizationMismatchError(DataError):
  """The reference's per-round token counts disagree with the whole prompt's."""

  def __init__(self, counted: int, total: int, sample_id: Any = None):
    super().__init__(SkipReason.TOKENIZATION_MISMATCH,
                     f"rounds add up to {counted} tokens but the prompt has {total}; the reference "
                     "would mask the whole sample", sample_id)
    self.counted = counted
    self.total = total

  def __reduce__(self):
    return TokenizationMismatchError, (self.counted, self.total, self.sample_id)


def tokenizer_image_token(text: str, tokenizer) -> list[int]:
  """Tokenizes `text` with one IMAGE_PLACEHOLDER per "<image>", as `mm_utils` does."""
  return _encode_many(tokenizer, [text])[0]


def encode_prompt(prompt: str, tokenizer, num_image_tokens: int, image_token_index: int) -> np.ndarray:
  """Token ids (int32) of a prompt, each "<image>" as `num_image_tokens` image ids.

  For generation: `encode_prompt(template.generation_prompt(turns, image=True), ...)`
  gives what the model saw before each reply in training.
  """
  ids = np.asarray(tokenizer_image_token(prompt, tokenizer), np.int64)
  is_image = ids == IMAGE_PLACEHOLDER
  out = np.repeat(ids, np.where(is_image, num_image_tokens, 1))
  out[np.repeat(is_image, np.where(is_image, num_image_tokens, 1))] = image_token_index
  return out.astype(np.int32)


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """`tokenizer_image_token` over many texts with one (batched, faster) tokenizer call."""
  chunks = [t.split(DEFAULT_IMAGE_TOKEN) for t in texts]
  flat = [c for cs in chunks for c in cs]
  encoded = tokenizer(flat, add_special_tokens=True)["input_ids"]
  bos = tokenizer.bos_token_id
  out, k = [], 0
  for cs in chunks:
    pieces = encoded[k:k + len(cs)]
    k += len(cs)
    # Each chunk is tokenized alone, so each starts with BOS; the reference keeps the
    # first one and drops the first token of every chunk when the first starts with BOS.
    skip = 1 if bos is not None and pieces[0] and pieces[0][0] == bos else 0
    ids = [bos] if skip else []
    for j, piece in enumerate(pieces):
      if j:
        ids.append(IMAGE_PLACEHOLDER)
      ids.extend(piece[skip:])
    out.append(ids)
  return out


def move_image_to_front(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """`preprocess_multimodal`: a turn with "<image>" becomes "<image>\\n" + its text."""
  out = []
  for speaker, value in turns:
    if DEFAULT_IMAGE_TOKEN in value:
      value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
    out.append((speaker, value))
  return out


def move_image_to_front_next(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """LLaVA-NeXT's `preprocess_multimodal` (OneVision trained with it): only a turn with exactly one "<image>"
  that does not already start with it is rewritten; "<image>What?" and several tags stay as written."""
  out = []
  for speaker, value in turns:
    if value.count(DEFAULT_IMAGE_TOKEN) == 1 and not value.startswith(DEFAULT_IMAGE_TOKEN):
      value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
    out.append((speaker, value))
  return out


def _check_turns(conversations, template: Template, sample_id) -> list[tuple[str, str]]:
  """Validates the turns; returns (speaker, value) pairs from the first human turn."""
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise DataError(SkipReason.MALFORMED_RECORD, "'conversations' must be a non-empty list", sample_id)
  turns = []
  for turn in conversations:
    if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(
        turn.get("value"), str):
      raise DataError(SkipReason.MALFORMED_RECORD, "each turn needs string 'from' and 'value'", sample_id)
    turns.append((turn["from"], turn["value"]))
  if template.style != SeparatorStyle.PLAIN and turns[0][0] == "gpt":
    turns = turns[1:]  # The reference skips a leading reply.
  for i, (speaker, value) in enumerate(turns):
    expected = ("human", "gpt")[i % 2]
    if speaker != expected:
      raise DataError(SkipReason.BAD_CONVERSATION,
                      f"turn {i} is from {speaker!r}, expected {expected!r} (turns must alternate)", sample_id)
    if not value.strip():
      raise DataError(SkipReason.BAD_CONVERSATION, f"turn {i} is empty", sample_id)
  if len(turns) < 2 or len(turns) % 2:
    raise DataError(SkipReason.BAD_CONVERSATION, "the conversation does not end with a reply", sample_id)
  if template.style == SeparatorStyle.PLAIN and len(turns) != 2:
    raise DataError(SkipReason.BAD_CONVERSATION, "the plain template takes one caption turn pair", sample_id)
  return turns


def _check_image_tags(turns, has_image: bool, template: Template, sample_id) -> None:
  tagged = [i for i, (_, value) in enumerate(turns) if DEFAULT_IMAGE_TOKEN in value]
  if not has_image:
    if tagged:
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "text contains <image> but the sample has no image",
                      sample_id)
    if template.style == SeparatorStyle.PLAIN:
      raise DataError(SkipReason.BAD_CONVERSATION, "the plain template needs an image", sample_id)
    return
  if not tagged:
    raise DataError(SkipReason.IMAGE_WITHOUT_TAG, "the sample has an image but no <image> tag", sample_id)
  if template.style == SeparatorStyle.CHATML:  # LLaVA-NeXT: every tag stays where it is, images taken in order
    if any(turns[i][0] != "human" for i in tagged):
      raise DataError(SkipReason.MISPLACED_IMAGE_TAG, "<image> must appear in user turns only", sample_id)
    return
  if len(tagged) > 1 or turns[tagged[0]][0] != "human":
    raise DataError(SkipReason.MISPLACED_IMAGE_TAG, "<image> must appear in exactly one user turn", sample_id)


def _mask_rounds(ids, encoded_rounds, start: int, instruction_offset: int, later_shift: int,
                 pad_id, sample_id) -> np.ndarray:
  """The reference's masking loop over (round, instruction) token lists."""
  labels = np.asarray(ids, dtype=np.int64)
  cur = start
  labels[:cur] = IGNORE_INDEX
  for i, (round_ids, instruction_ids) in enumerate(encoded_rounds):
    round_len = len(round_ids)
    instruction_len = len(instruction_ids) + instruction_offset
    if i != 0:
      round_len += later_shift
      instruction_len += later_shift
    # Python slice semantics on purpose (negative ends wrap), exactly like torch.
    labels[cur:cur + instruction_len] = IGNORE_INDEX
    cur += round_len
  labels[cur:] = IGNORE_INDEX
  total = len(ids) if pad_id is None else sum(1 for t in ids if t != pad_id)
  if cur != total:
    raise TokenizationMismatchError(cur, total, sample_id)
  return labels


def _split_rounds(prompt: str, template: Template) -> tuple[list[tuple[str, str]], str]:
  """Rounds and their instruction parts, as each `preprocess_*` splits the prompt."""
  if template.style == SeparatorStyle.MPT:
    pieces = prompt.split(template.sep)
    rounds = [template.sep.join(pieces[:3])]  # system + first user + first reply
    rounds += [template.sep.join(pieces[k:k + 2]) for k in range(3, len(pieces), 2)]
    sep = template.sep + template.roles[1]
  else:
    rounds = prompt.split(template.sep2)
    sep = template.sep + template.roles[1] + ": " if template.style == SeparatorStyle.TWO else "[/INST] "
  out = []
  for rnd in rounds:
    if rnd == "":
      break
    parts = rnd.split(sep)
    if len(parts) != 2:
      break
    out.append((rnd, parts[0] + sep))
  return out, sep


# `preprocess_qwen` unmasks these ids wherever they occur: Qwen2's "\n" by its literal id, which the reference
# hard-codes (whatever the tokenizer), and the tokenizer's <|im_start|> / <|im_end|>.
QWEN_NEWLINE_ID = 198


def _chatml_ids(tokenizer) -> list[int]:
  """The ids of <|im_start|> and <|im_end|> (the reference's `additional_special_tokens_ids`)."""
  markers = ["<|im_start|>", "<|im_end|>"]
  ids = tokenizer.convert_tokens_to_ids(markers)
  if any(i is None or tokenizer.convert_ids_to_tokens(i) != m for i, m in zip(ids, markers)):
    raise ValueError(f"the qwen_1_5 template needs a tokenizer with {markers} as tokens (a Qwen2 one)")
  return ids


def _qwen_ids_and_labels(turns, template: Template, tokenizer):
  """LLaVA-NeXT's `preprocess_qwen`: each turn (the system one first) tokenized alone as
  "<|im_start|>role\\n" + text + "<|im_end|>\\n" (no BOS), system and user turns masked, assistant turns kept
  whole (their "<|im_start|>assistant\\n" header too). Then, a quirk kept on purpose because the released
  models learned from it: every id 198 ("\\n" in Qwen2's vocabulary), <|im_start|> and <|im_end|> is
  unmasked, in system and user turns as well. "<image>" (a special token there) becomes the placeholder, its
  label ignored (tags sit in user turns only). The reference has no round-count check, so no
  `TokenizationMismatchError` here."""
  end = template.sep + "\n"
  texts = [(False, template.system + end)]
  texts += [(speaker == "gpt", template.roles[speaker == "gpt"] + "\n" + value + end) for speaker, value in turns]
  chunks = [t.split(DEFAULT_IMAGE_TOKEN) for _, t in texts]
  encoded = iter(tokenizer([c for cs in chunks for c in cs], add_special_tokens=False)["input_ids"])
  unmasked = {QWEN_NEWLINE_ID, *_chatml_ids(tokenizer)}
  ids, labels = [], []
  for (trained, _), cs in zip(texts, chunks):
    turn = []
    for j in range(len(cs)):
      turn += ([IMAGE_PLACEHOLDER] if j else []) + list(next(encoded))
    ids += turn
    labels += [t if trained or t in unmasked else IGNORE_INDEX for t in turn]
  return ids, np.asarray(labels, dtype=np.int64)


def _reference_ids_and_labels(turns, template: Template, tokenizer, sample_id):
  """Token ids and labels with the -200 placeholder, before expansion and truncation."""
  if template.style == SeparatorStyle.CHATML:
    return _qwen_ids_and_labels(turns, template, tokenizer)
  if template.style == SeparatorStyle.PLAIN:
    # preprocess_plain: the user text is dropped, "<image>" + caption + "\n".
    prompt = DEFAULT_IMAGE_TOKEN + turns[1][1] + template.sep
    ids, instruction = _encode_many(tokenizer, [prompt, DEFAULT_IMAGE_TOKEN])
    labels = np.asarray(ids, dtype=np.int64)
    labels[:len(instruction)] = IGNORE_INDEX
    return ids, labels
  role = {"human": template.roles[0], "gpt": template.roles[1]}
  prompt = template.render([(role[speaker], value) for speaker, value in turns])
  rounds, _ = _split_rounds(prompt, template)
  encoded = _encode_many(tokenizer, [prompt] + [text for pair in rounds for text in pair])
  ids, encoded_rounds = encoded[0], list(zip(encoded[1::2], encoded[2::2]))
  # The reference sets pad = unk, so its "total length" leaves out unk tokens.
  pad_id = getattr(tokenizer, "unk_token_id", None)
  # `tokenizers` >= 0.14 is always true with transformers 5, so only `legacy` matters.
  if template.style == SeparatorStyle.TWO:
    shift = 0 if getattr(tokenizer, "legacy", True) else -1
    labels = _mask_rounds(ids, encoded_rounds, 1, -2, shift, pad_id, sample_id)
  elif template.style == SeparatorStyle.LLAMA_2:
    labels = _mask_rounds(ids, encoded_rounds, 1, -2, 0, pad_id, sample_id)
  else:
    shift = 1 if getattr(tokenizer, "legacy", False) else 0
    labels = _mask_rounds(ids, encoded_rounds, 0, -1, shift, pad_id, sample_id)
  return ids, labels


VIDEO_TAG = "<video>"


def video_tag_as_image(conversations, sample_id: Any = None):
  """A video record's turns with its one "<video>" tag read as the "<image>" placeholder (a video's tokens are
  image-like: expanded in its place, labels ignored); an "<image>" tag beside it, or several videos, is refused."""
  values = [turn.get("value") for turn in conversations or [] if isinstance(turn, dict)]
  texts = [v for v in values if isinstance(v, str)]
  if any(DEFAULT_IMAGE_TOKEN in v for v in texts):
    raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "a video record's text holds <image>", sample_id)
  tags = sum(v.count(VIDEO_TAG) for v in texts)
  if tags != 1:
    raise DataError(SkipReason.MALFORMED_RECORD, f"{tags} <video> tags; a video record takes exactly one video",
                    sample_id)
  return [dict(turn, value=turn["value"].replace(VIDEO_TAG, DEFAULT_IMAGE_TOKEN))
          if isinstance(turn, dict) and isinstance(turn.get("value"), str) else turn for turn in conversations]


def conversation_tokens(conversations: Sequence[dict], tokenizer, template: str | Template, *,
                        has_image: bool | None = None, sample_id: Any = None) -> tuple[np.ndarray, np.ndarray, bool]:
  """The first half of `preprocess_conversation`: (ids, labels, has_image) with one IMAGE_PLACEHOLDER per image,
  before expansion and truncation. Split out so that LLaVA-NeXT, whose image token count depends on the image's
  size, can read the image between the two halves while text errors still come first."""
  template = get_template(template)
  if template.style == SeparatorStyle.CHATML_HF:
    raise ValueError(f"template {template.name!r} renders llava-hf's chat template for inference; train "
                     "LLaVA-OneVision with 'qwen_1_5'")
  turns = _check_turns(conversations, template, sample_id)
  if has_image is None:
    has_image = any(DEFAULT_IMAGE_TOKEN in value for _, value in turns)
  _check_image_tags(turns, has_image, template, sample_id)
  if has_image:
    turns = (move_image_to_front_next if template.style == SeparatorStyle.CHATML else move_image_to_front)(turns)
  ids, labels = _reference_ids_and_labels(turns, template, tokenizer, sample_id)
  return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), has_image


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, num_image_tokens: int | Sequence[int], max_length: int,
                        image_token_index: int, *, sample_id: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """The second half: each IMAGE_PLACEHOLDER becomes its image's count of `image_token_index` (ignored labels),
  then truncation to `max_length`. `num_image_tokens` is one count for every image (LLaVA-1.5) or one per image
  in order (LLaVA-NeXT: `AnyresLayout.num_image_tokens(size)`). An image cut by `max_length` is a DataError."""
  is_image = ids == IMAGE_PLACEHOLDER
  n_images = int(is_image.sum())
  counts = ([int(num_image_tokens)] * n_images if np.ndim(num_image_tokens) == 0 else
            [int(c) for c in num_image_tokens])
  if len(counts) != n_images:
    raise DataError(SkipReason.IMAGE_WITHOUT_TAG if len(counts) > n_images else SkipReason.TAG_WITHOUT_IMAGE,
                    f"{n_images} <image> tags for {len(counts)} images", sample_id)
  repeats = np.ones(len(ids), np.int64)
  repeats[is_image] = counts
  expanded_image = np.repeat(is_image, repeats)
  input_ids = np.repeat(ids, repeats)
  input_ids[expanded_image] = image_token_index
  labels = np.repeat(labels, repeats)
  labels[expanded_image] = IGNORE_INDEX
  if expanded_image[:max_length].sum() != sum(counts):
    # The model needs one token per image feature; a partial image cannot be spliced in.
    raise DataError(SkipReason.IMAGE_TRUNCATED,
                    f"max_length={max_length} cuts off (some of) the {sum(counts)} image tokens", sample_id)
  return input_ids[:max_length].astype(np.int32), labels[:max_length].astype(np.int32)


def preprocess_conversation(conversations: Sequence[dict], tokenizer, template: str | Template,
                            num_image_tokens: int | Sequence[int], max_length: int, image_token_index: int, *,
                            has_image: bool | None = None,
                            sample_id: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and labels (int32 numpy, length <= max_length) of one LLaVA sample.

  Args:
    conversations: the record's "conversations": [{"from": "human"|"gpt", "value": str}].
    tokenizer: a Hugging Face tokenizer (LLaMA-style: adds BOS).
    template: a name from `conversation.TEMPLATES` or a `Template`.
    num_image_tokens: image features per image (576 for CLIP ViT-L/14 at 336 px), or a list with one count per
      image (LLaVA-NeXT, where the count depends on the image's size).
    max_length: truncation length, applied after the image tokens are expanded.
    image_token_index: the id that stands for one image feature (32000 in llava-hf).
    has_image: whether the sample has an image; default: whether any turn has "<image>".
    sample_id: carried into errors.

  Raises:
    DataError: the sample must be skipped (see `SkipReason`); `TokenizationMismatchError`
      where the reference would have masked all labels.
  """
  ids, labels, _ = conversation_tokens(conversations, tokenizer, template, has_image=has_image,
                                       sample_id=sample_id)
  return expand_image_tokens(ids, labels, num_image_tokens, max_length, image_token_index, sample_id=sample_id)
