"""Conversation templates, with the strings of LLaVA's `llava/conversation.py`.

Each template turns a list of (role, message) pairs into one prompt string exactly
as the reference `Conversation.get_prompt()` does, because the model was trained on
those strings byte for byte: a different space or separator is a different prompt.

Only the templates LLaVA-1.5 / 1.6 / OneVision were trained with are kept (OneVision's
from LLaVA-NeXT's `llava/conversation.py`):

  plain            stage 1 (feature alignment): "<image>" + caption + "\\n"
  vicuna_v1        LLaVA-1.5 on Vicuna (the default of the reference)
  llava_v1         same separators as vicuna_v1, "human" in the system prompt
  llava_llama_2    LLaMA-2 chat wrapping with LLaVA's system prompt
  mistral_instruct LLaVA-1.6 Mistral: [INST] wrapping, no system prompt
  chatml_direct    LLaVA-1.6 34B (Nous-Hermes-2-Yi): ChatML markers
  qwen_1_5         LLaVA-OneVision (Qwen2): ChatML with a system turn, LLaVA-NeXT's `conv_qwen`

and, for inference only, the prompt format of a checkpoint that ships its own chat template:

  llava_onevision_hf  llava-hf's LLaVA-OneVision chat template (no system turn, "role " then the
                      media tags, "\n" + text, "<|im_end|>" with no newline)
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence

DEFAULT_IMAGE_TOKEN = "<image>"


class SeparatorStyle(enum.Enum):
  """How turns are joined; also selects the label-masking rule in `text.py`."""
  TWO = "two"          # system sep role: msg sep role: msg sep2 ...
  LLAMA_2 = "llama_2"  # [INST] <<SYS>>..<</SYS>> msg [/INST] reply </s>
  MPT = "mpt"          # system sep role msg sep role msg sep ...  (ChatML)
  PLAIN = "plain"      # msg sep msg sep2 ... with no system and no roles
  CHATML = "chatml"    # system sep \n role \n msg sep \n ...  (LLaVA-NeXT's; labels by `preprocess_qwen`)
  CHATML_HF = "chatml_hf"  # role + " " + tags + "\n" + text + sep ...  (llava-hf's OneVision; inference only)


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation format (the reference's `Conversation` without its state)."""
  name: str
  system: str
  roles: tuple[str, str]
  style: SeparatorStyle
  sep: str
  sep2: str | None = None
  version: str = ""

  def with_system(self, text: str) -> "Template":
    """This template with a chat's system message as its system prompt. The ChatML styles of the reference keep
    the turn's header inside `system` ("<|im_start|>system\n..."), so the text goes after that header."""
    if self.style in (SeparatorStyle.MPT, SeparatorStyle.CHATML):
      return dataclasses.replace(self, system="<|im_start|>system\n" + text)
    return dataclasses.replace(self, system=text)

  def render(self, messages: Sequence[tuple[str, str | None]]) -> str:
    """Joins (role, message) pairs into the prompt, as `get_prompt()` does.

    A message of None (or "") adds only the role header: that is how the reference
    builds a generation prompt ending with the assistant's turn.
    """
    if self.style == SeparatorStyle.TWO:
      seps = (self.sep, self.sep2)
      out = self.system + seps[0]
      for i, (role, message) in enumerate(messages):
        if message:
          out += role + ": " + message + seps[i % 2]
        else:
          out += role + ":"
      return out
    if self.style == SeparatorStyle.MPT:
      out = self.system + self.sep
      for role, message in messages:
        out += role + message + self.sep if message else role
      return out
    if self.style == SeparatorStyle.CHATML:
      out = self.system + self.sep + "\n" if self.system else ""
      for role, message in messages:
        out += role + "\n" + message + self.sep + "\n" if message else role + "\n"
      return out
    if self.style == SeparatorStyle.CHATML_HF:  # `system`: the text alone, as a chat's system message gives it
      out = "<|im_start|>system \n" + self.system + self.sep if self.system else ""
      for role, message in messages:
        if not message:
          out += role + "\n"
          continue
        tags, text = split_media_tags(message)
        out += role + " " + tags + ("\n" + text if text else "") + self.sep
      return out
    if self.style == SeparatorStyle.LLAMA_2:
      out = ""
      for i, (role, message) in enumerate(messages):
        if i == 0 and (not message or role != self.roles[0]):
          raise ValueError("a LLaMA-2 prompt starts with a non-empty user message")
        if not message:
          continue
        if i == 0 and self.system:
          message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
        if i % 2 == 0:
          out += self.sep + f"[INST] {message} [/INST]"
        else:
          out += " " + message + " " + self.sep2
      # The reference strips with str.lstrip, i.e. a character set, not a prefix.
      return out.lstrip(self.sep)
    if self.style == SeparatorStyle.PLAIN:
      seps = (self.sep, self.sep2)
      out = self.system
      for i, (_, message) in enumerate(messages):
        if message:
          out += message + (seps[i % 2] or "")
      return out
    raise ValueError(f"unknown separator style {self.style}")

  @property
  def stop_str(self) -> str | None:
    """Text that ends a reply, by the reference's rule (`sep2` for TWO, else `sep`).

    Generation also stops at the EOS token, which is what ends replies in practice.
    """
    stop = self.sep2 if self.style == SeparatorStyle.TWO else self.sep
    return stop or None

  def generation_prompt(self, turns: Sequence[str], image: bool = False) -> str:
    """Prompt for generation: alternating user/assistant texts, ending with a user turn.

    The assistant header is appended with no message, so the model writes the reply.
    With `image=True` the first user turn gets the reference's "<image>\\n" prefix
    (any "<image>" tag already in it is moved there). `plain` gives just "<image>",
    the context its stage-1 training saw before a caption.
    """
    if len(turns) % 2 != 1:
      raise ValueError("turns must alternate user/assistant and end with a user turn")
    if self.style == SeparatorStyle.PLAIN:
      # Stage-1 training drops the user text and sees "<image>" + caption.
      return DEFAULT_IMAGE_TOKEN if image else ""
    turns = list(turns)
    if image:
      turns[0] = DEFAULT_IMAGE_TOKEN + "\n" + turns[0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    messages = [(self.roles[i % 2], t) for i, t in enumerate(turns)]
    messages.append((self.roles[1], None))
    return self.render(messages)


_LEADING_TAGS = re.compile(r"\s*((?:<image>|<video>)\s*)+")


def split_media_tags(message: str) -> tuple[str, str]:
  """(the leading "<image>" / "<video>" tags joined, the text after them): llava-hf's chat template writes a
  message's media parts first, back to back, then its text on a new line."""
  m = _LEADING_TAGS.match(message)
  if not m:
    return "", message
  return "".join(re.findall(r"<image>|<video>", m.group(0))), message[m.end():]


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. "
                         "You are able to understand the visual content that the user provides, "
                         "and assist the user with a variety of tasks using natural language.")

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", roles=("", ""), style=SeparatorStyle.PLAIN, sep="\n"),
    "vicuna_v1": Template("vicuna_v1", system=_VICUNA_SYSTEM, roles=("USER", "ASSISTANT"),
                          style=SeparatorStyle.TWO, sep=" ", sep2="</s>", version="v1"),
    "llava_v1": Template("llava_v1", system=_LLAVA_V1_SYSTEM, roles=("USER", "ASSISTANT"),
                         style=SeparatorStyle.TWO, sep=" ", sep2="</s>", version="v1"),
    "llava_llama_2": Template("llava_llama_2", system=_LLAVA_LLAMA_2_SYSTEM, roles=("USER", "ASSISTANT"),
                              style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>", version="llama_v2"),
    "mistral_instruct": Template("mistral_instruct", system="", roles=("USER", "ASSISTANT"),
                                 style=SeparatorStyle.LLAMA_2, sep="", sep2="</s>", version="llama_v2"),
    "chatml_direct": Template("chatml_direct", system="<|im_start|>system\nAnswer the questions.",
                              roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
                              style=SeparatorStyle.MPT, sep="<|im_end|>", version="mpt"),
    # LLaVA-NeXT's conv_qwen ("qwen_1_5" and "qwen_2" there), what every LLaVA-OneVision stage past 1 used.
    "qwen_1_5": Template("qwen_1_5", system="<|im_start|>system\nYou are a helpful assistant.",
                         roles=("<|im_start|>user", "<|im_start|>assistant"), style=SeparatorStyle.CHATML,
                         sep="<|im_end|>", version="qwen"),
    # What llava-hf's LLaVA-OneVision checkpoints' chat_template.json renders (transformers'
    # `LlavaOnevisionProcessor.apply_chat_template`): no system turn, and not the format the model was trained on.
    "llava_onevision_hf": Template("llava_onevision_hf", system="", roles=("<|im_start|>user", "<|im_start|>assistant"),
                                   style=SeparatorStyle.CHATML_HF, sep="<|im_end|>", version="qwen"),
}
# The reference's other names for the same templates.
_ALIASES = {"v1": "vicuna_v1", "v0_plain": "plain", "mistral_direct": "chatml_direct", "qwen_2": "qwen_1_5"}


def get_template(name: str | Template) -> Template:
  """Looks a template up by name (the reference's `--version` values work too)."""
  if isinstance(name, Template):
    return name
  key = _ALIASES.get(name, name)
  if key not in TEMPLATES:
    raise KeyError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[key]
