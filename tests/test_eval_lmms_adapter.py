"""The lmms-eval backend (llava_jax/eval/lmms_eval_adapter.py) without lmms-eval: requests are built as lmms-eval 0.7
builds them (a stand-in of its `Instance`, a task_dict of documents), and the oracle is transformers'
LlavaForConditionalGeneration holding the same weights (each answer greedy and alone; log-probabilities from its
logits)."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import hf_tiny
from llava_jax.data.synthetic import build_tokenizer
from llava_jax.eval import lmms_eval_adapter
from llava_jax.eval.lmms_eval_adapter import LlavaJax

TASK, SPLIT = "toy", "test"


@dataclasses.dataclass
class Instance:
  """lmms-eval 0.7's lmms_eval.api.instance.Instance, reduced to what a model backend reads."""
  request_type: str
  arguments: tuple
  idx: int
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def args(self):
    return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)


def doc_to_visual(doc):
  return [] if doc["image"] is None else [doc["image"]]


def request(kind, context, second, doc_id, idx=0):
  return Instance(kind, (context, second, doc_to_visual, doc_id, TASK, SPLIT), idx)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
  """A random transformers LLaVA saved with a tokenizer and a 28-px CLIP processor, and the backend made from that
  folder the way lmms-eval makes it (`create_from_arg_string`)."""
  folder = str(tmp_path_factory.mktemp("lmms_ckpt"))
  build_tokenizer(folder)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  tokenizer.add_tokens(["<image>"], special_tokens=True)  # as llava-hf adds it: one past the tokenizer's ids
  tokenizer.save_pretrained(folder)
  vocab = len(tokenizer)
  hf = hf_tiny.llava_model(text=hf_tiny.text_config(vocab_size=vocab, max_position_embeddings=512))
  hf.config.image_token_id = hf.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
  hf.save_pretrained(folder)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
               "crop_size": {"height": 28, "width": 28}, "resample": 3}, f)
  from llava_jax import load_hf_checkpoint

  ours = LlavaJax.create_from_arg_string("batch_size=2", {"model": load_hf_checkpoint(folder)})
  rng = np.random.default_rng(0)
  ours.task_dict = {TASK: {SPLIT: [{"image": Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8))},
                                   {"image": None},
                                   {"image": Image.fromarray(rng.integers(0, 255, (50, 20, 3), np.uint8))}]}}
  return hf, ours


def hf_inputs(ours, text, doc_id, continuation=""):
  image = ours.task_dict[TASK][SPLIT][doc_id]["image"]
  proc = ours.processor
  inputs = proc(proc.prompt([text], image=image is not None) + continuation, None if image is None else [image])
  kwargs = dict(input_ids=torch.as_tensor(inputs["input_ids"], dtype=torch.long),
                attention_mask=torch.as_tensor(inputs["attention_mask"], dtype=torch.long))
  if image is not None:
    kwargs["pixel_values"] = hf_tiny.to_torch_pixels(inputs["pixel_values"])
  return kwargs


def transformers_answer(hf, ours, text, doc_id, new_tokens) -> str:
  kwargs = hf_inputs(ours, text, doc_id)
  eos = ours.processor.tokenizer.eos_token_id
  with torch.no_grad():
    tokens = hf.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)[0, kwargs["input_ids"].shape[1]:].numpy()
  cut = np.flatnonzero(tokens == eos)
  return ours.processor.decode(tokens[:cut[0]] if len(cut) else tokens).strip()


def test_runs_without_lmms_eval():
  if importlib.util.find_spec("lmms_eval") is not None:
    pytest.skip("lmms-eval is installed: the backend subclasses its base class")
  assert LlavaJax.__mro__[1] is lmms_eval_adapter._StandInBase  # noqa: SLF001
  with pytest.raises(ImportError):
    lmms_eval_adapter.manifest()


def test_generate_until(backend):
  hf, ours = backend
  question, text_only = "What is in the image?", "Name a colour."
  answer = transformers_answer(hf, ours, question, 0, 4)
  assert answer  # the stop-string request below needs something to cut
  stop = answer[-1]
  requests = [request("generate_until", "<image>\n" + question, {"until": [], "max_new_tokens": 4, "temperature": 0},
                      0),
              request("generate_until", text_only, {"max_new_tokens": 4, "do_sample": False}, 1),
              request("generate_until", question, {"until": stop, "max_new_tokens": 4}, 0),
              request("generate_until", question, {"until": ["", "never appears"], "max_new_tokens": 2}, 2)]
  got = ours.generate_until(requests)
  assert got == [answer,  # the "<image>" tag in the context is where LLaVA puts it anyway: removed, then re-added
                 transformers_answer(hf, ours, text_only, 1, 4),
                 answer[:answer.index(stop)],  # text before the first stop string
                 transformers_answer(hf, ours, question, 2, 2)]  # its own max_new_tokens; "" stops nothing


def test_sampling_is_refused(backend):
  _, ours = backend
  with pytest.raises(NotImplementedError, match="greedily"):
    ours.generate_until([request("generate_until", "Hi", {"temperature": 0.7}, 1)])
  with pytest.raises(NotImplementedError):
    ours.generate_until_multi_round([])


def test_loglikelihood(backend):
  hf, ours = backend
  question = "What is in the image?"
  got = ours.loglikelihood([request("loglikelihood", question, " a red square", 0),
                            request("loglikelihood", "Say hello.", lambda doc: " hello there", 1)])
  for (logprob, greedy), (text, doc_id, continuation) in zip(got, [(question, 0, " a red square"),
                                                                  ("Say hello.", 1, " hello there")]):
    context_len = hf_inputs(ours, text, doc_id)["input_ids"].shape[1]
    full = hf_inputs(ours, text, doc_id, continuation)
    with torch.no_grad():
      logits = hf(**full, position_ids=(full["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits[0].double()
    target = full["input_ids"][0, context_len:]
    assert len(target) > 0
    step = torch.log_softmax(logits[context_len - 1:-1], dim=-1)
    assert logprob == pytest.approx(float(step[torch.arange(len(target)), target].sum()), abs=2e-3)
    assert greedy == bool((step.argmax(-1) == target).all())
