"""A `llava_jax` model backend for lmms-eval (0.7.x), importable without lmms-eval.

lmms-eval cannot be a dependency here (docs/EVALUATION.md says why: it requires torchvision, whose only build for
torch 2.13 on this index is a CUDA one that fails to load against the CPU torch and then breaks transformers' image
processors). Its users register this class with lmms-eval themselves, in any of three ways:

  # 1. an entry point in their own package (lmms-eval 0.7 reads the group "lmms_eval.models"):
  #      [project.entry-points."lmms_eval.models"]
  #      llava_jax = "llava_jax.eval.lmms_eval_adapter:manifest"
  # 2. in Python, before lmms-eval resolves the model name:
  #      from lmms_eval.models import MODEL_REGISTRY_V2
  #      MODEL_REGISTRY_V2.register_manifest(llava_jax.eval.lmms_eval_adapter.manifest())
  # 3. then: lmms-eval --model llava_jax --model_args pretrained=CKPT,batch_size=8 --tasks ...

With lmms-eval importable, `LlavaJax` subclasses its `lmms` base class; without it, a stand-in base with the same
attributes (`task_dict`, `rank`, `world_size`, `create_from_arg_string`), so the request handling is testable here.
`generate_until` answers through `llava-jax eval`'s runner (batched greedy decoding over a bucketed KV cache, data-
parallel over the local devices, LLaVA-NeXT's image sizes included); `loglikelihood` scores a continuation with one
forward pass per request.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile

import numpy as np

from llava_jax.eval.tasks import Question

MODEL_NAME = "llava_jax"
IMAGE_TAG = "<image>"
log = logging.getLogger(__name__)


class _StandInBase:
  """The part of lmms-eval's `lmms` base class this backend relies on, for use without lmms-eval."""
  is_simple = True

  def __init__(self):
    self._rank, self._world_size, self.task_dict = 0, 1, {}

  @property
  def rank(self):
    return self._rank

  @property
  def world_size(self):
    return self._world_size

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    args = dict(item.split("=", 1) for item in arg_string.split(",") if item.strip())
    args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
    return cls(**args)


def _base_class():
  try:
    from lmms_eval.api.model import lmms  # pylint: disable=import-outside-toplevel
  except ImportError:
    return _StandInBase
  return lmms


def manifest():
  """lmms-eval's registration record for this backend (the payload of an "lmms_eval.models" entry point)."""
  from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=import-outside-toplevel

  return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LlavaJax")


def _flatten_visuals(visuals) -> list:
  """doc_to_visual's result (an image, a list of them, or nested lists, as tasks return it) -> a flat list."""
  if visuals is None:
    return []
  if not isinstance(visuals, (list, tuple)):
    return [visuals]
  return [v for item in visuals for v in _flatten_visuals(item)]


class LlavaJax(_base_class()):
  """lmms-eval's "simple" model interface over a llava-jax checkpoint (LLaVA-1.5 or NeXT), greedy decoding only."""
  is_simple = True

  def __init__(self, pretrained: str | None = None, template: str | None = None, batch_size=8, max_new_tokens=1024,
               prompt_bucket=32, dtype: str | None = None, model=None, processor=None, **unused):
    super().__init__()
    if unused:
      log.warning("llava_jax backend ignores model_args %s", sorted(unused))
    if model is None:
      if pretrained is None:
        raise ValueError("the llava_jax backend needs pretrained=CKPT (a llava-jax checkpoint directory)")
      from llava_jax import load_checkpoint  # pylint: disable=import-outside-toplevel

      model = load_checkpoint(pretrained, dtype=dtype)
    if processor is None:
      from llava_jax.processor import Processor  # pylint: disable=import-outside-toplevel

      processor = Processor.from_model(model, template=template)
    self.model, self.processor = model, processor
    self.batch_size, self.default_max_new_tokens = int(batch_size), int(max_new_tokens)
    self.prompt_bucket = int(prompt_bucket)

  # -- requests -----------------------------------------------------------------------------------------------------

  def _unpack(self, request):
    """A request's (context, second argument, its document's images); args are lmms-eval's
    (context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split)."""
    context, second, doc_to_visual, doc_id, task, split = request.args
    visuals = _flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
    if len(visuals) > 1:
      raise ValueError(f"llava_jax answers with one image per question; {task} doc {doc_id} has {len(visuals)}")
    image = visuals[0].convert("RGB") if visuals else None
    return context.replace(IMAGE_TAG, "").strip(), second, image

  @staticmethod
  def _greedy_settings(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[int, list[str]]:
    """(max_new_tokens, stop strings) of a request's generation kwargs; sampling is refused, not ignored."""
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
      raise NotImplementedError("the llava_jax backend decodes greedily (temperature 0, do_sample False)")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens), [s for s in until if s]

  def generate_until(self, requests) -> list[str]:
    """Greedy answers, cut at the first of each request's `until` strings, in request order. Requests with the same
    max_new_tokens are answered together through the runner's batches; a question whose image cannot be read
    gets "" (and is logged)."""
    from llava_jax.eval.runner import generate_answers, read_answers  # pylint: disable=import-outside-toplevel
    from llava_jax.decoding import stop_at  # pylint: disable=import-outside-toplevel

    groups, stops = {}, []
    for index, request in enumerate(requests):
      text, gen_kwargs, image = self._unpack(request)
      max_new_tokens, until = self._greedy_settings(dict(gen_kwargs or {}), self.default_max_new_tokens)
      stops.append(until)
      groups.setdefault(max_new_tokens, []).append(Question(index, text, text, None if image is None else
                                                            (lambda image=image: image)))
    answers = [""] * len(requests)
    for max_new_tokens, questions in groups.items():
      with tempfile.TemporaryDirectory() as out:
        report = generate_answers(self.model, self.processor, questions, out, batch_size=self.batch_size,
                                  max_new_tokens=max_new_tokens, prompt_bucket=self.prompt_bucket, progress=False,
                                  model_id=MODEL_NAME, process_index=0, process_count=1)
        for error in report["image_errors"]:
          log.warning("llava_jax: no answer for request %s: %s", error["question_id"], error["error"])
        for path in glob.glob(os.path.join(out, "answers*.jsonl")):
          for record in read_answers(path):
            answers[record["question_id"]] = record["text"]
    return [stop_at(text, until)[0] for text, until in zip(answers, stops)]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(sum of the continuation tokens' log-probabilities, whether greedy decoding would produce them) given the
    context as the user turn, one forward pass each; the continuation's tokens are those the full prompt has past
    the context's, as lmms-eval's llava_hf splits them."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    results = []
    for request in requests:
      text, continuation, image = self._unpack(request)
      if not isinstance(continuation, str):  # doc_to_target given as a function of the document
        _, _, _, doc_id, task, split = request.args
        continuation = continuation(self.task_dict[task][split][doc_id])
      images = None if image is None else [image]
      prompt = self.processor.prompt([text], image=image is not None)
      context_len = self.processor(prompt, images)["input_ids"].shape[1]
      inputs = self.processor(prompt + continuation, images)
      ids = inputs["input_ids"]
      pixels = None if inputs["pixel_values"] is None else jnp.asarray(inputs["pixel_values"])
      logits = self.model(jnp.asarray(ids), pixels, jnp.asarray(inputs["attention_mask"]),
                          image_sizes=inputs.get("image_sizes"))
      logprobs = np.asarray(jax.nn.log_softmax(logits[0, context_len - 1:-1].astype(jnp.float32)), np.float64)
      target = np.asarray(ids[0, context_len:])
      chosen = logprobs[np.arange(len(target)), target]
      results.append((float(chosen.sum()), bool((logprobs.argmax(-1) == target).all())))
    return results

  def generate_until_multi_round(self, requests):
    raise NotImplementedError("multi-round generation is not implemented by the llava_jax backend")

