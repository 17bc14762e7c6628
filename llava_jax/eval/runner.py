"""`llava-jax eval`: answer a task's questions with greedy decoding, then score the answers file as the reference does.

Generation is batched greedy decoding over a bucketed KV cache (`llava_jax.decoding.decode_loop`: prefill and decode
step in one compiled loop; fixed batch rows, prompts padded to length buckets, so a run compiles once per bucket),
with the batch rows split over a 1-D "data" mesh of this process's devices and the parameters replicated. Questions
are split across processes (`jax.process_index()` takes every `jax.process_count()`-th one); each process appends its
answers to its own part file, flushed after every batch, and process 0 merges the parts into OUT/answers.jsonl in
question order. Rerunning into the same OUT reads the answers file and the parts first and skips every question
already answered, so a killed run resumes. LLaVA-NeXT and OneVision checkpoints get anyres tiles and `image_sizes`
(`_batch_inputs`; OneVision's feature rows carry taps, with their weights).
"""

from __future__ import annotations

import glob
import json
import os
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.eval.inputs import EvalInputError, is_torn, log, read_jsonl
from llava_jax.eval.tasks import Question, Task, answer_key, get_task
from llava_jax.padding import left_pad, round_up

ANSWERS = "answers.jsonl"
METRICS = "metrics.json"
RUN_REPORT = "run.json"


# -- answers files ------------------------------------------------------------------------------------------------


ANSWER_FIELDS = {"question_id": (int, str), "text": str}  # what resuming and scoring need of our own records


def read_answers(path: str) -> list[dict]:
  """Answer records of one of our answers files (merged or part). A last line cut short by a killed run is dropped
  with a warning (that question is answered again); any other bad line is an error naming the file and line."""
  if not os.path.exists(path):
    return []
  try:
    return read_jsonl(path, ANSWER_FIELDS, torn_tail_ok=True)
  except EvalInputError as e:
    raise EvalInputError(f"{e}; this is an answers file of an earlier run: fix or delete that line and rerun "
                         "(a deleted answer is generated again)") from None


def _mend_torn_tail(path: str):
  """Before appending to our part file: a last record cut short by a kill is cut off (logged; its question is in
  this run's share again), and a whole record missing only its newline gets one, so the next starts a line."""
  if not os.path.exists(path) or not os.path.getsize(path):
    return
  with open(path, "rb+") as f:
    content = f.read()
    if content.endswith(b"\n"):
      return
    start = content.rfind(b"\n") + 1
    if is_torn(content[start:]):
      log.warning("%s: dropping a last line cut short (%d bytes, a killed run?); its question is answered again",
                  path, len(content) - start)
      f.truncate(start)
    else:
      f.write(b"\n")


def check_settings(*, batch_size, max_new_tokens, prompt_bucket, limit=None):
  """Why: a zero or negative count used to fail deep inside `range()` or the decode loop, or silently answer
  nothing (or all but the last question, as a `[:-1]` slice); `max_new_tokens` None means the task's default."""
  settings = (("batch_size", batch_size, 1, False), ("max_new_tokens", max_new_tokens, 1, True),
              ("prompt_bucket", prompt_bucket, 1, False), ("limit", limit, 0, True))
  for name, value, least, optional in settings:
    if value is None and optional:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
      allowed = f"an integer >= {least}" + (" or None" if optional else "")
      raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _part_path(out: str, index: int, count: int) -> str:
  return os.path.join(out, f"answers.part{index:05d}-of-{count:05d}.jsonl")


def answered_keys(out: str) -> set[str]:
  """Keys of the answers already in OUT: the merged file and every part file, of any process count."""
  files = [os.path.join(out, ANSWERS)] + sorted(glob.glob(os.path.join(out, "answers.part*-of-*.jsonl")))
  return {answer_key(r) for path in files for r in read_answers(path)}


def merge_answers(out: str, questions: list[Question]) -> list[dict]:
  """answers.jsonl <- its records and the parts', one per question, in question order (records for questions not
  in the task keep their place after them); the parts are removed. Run by process 0 only."""
  parts = sorted(glob.glob(os.path.join(out, "answers.part*-of-*.jsonl")))
  by_key = {}
  for path in [os.path.join(out, ANSWERS)] + parts:
    for record in read_answers(path):
      by_key.setdefault(answer_key(record), record)
  ordered = [by_key.pop(q.key) for q in questions if q.key in by_key] + list(by_key.values())
  tmp = os.path.join(out, ANSWERS + ".tmp")
  with open(tmp, "w") as f:
    for record in ordered:
      f.write(json.dumps(record) + "\n")
  os.replace(tmp, os.path.join(out, ANSWERS))
  for path in parts:
    os.remove(path)
  return ordered


# -- generation ---------------------------------------------------------------------------------------------------


class ImagePathError(ValueError):
  """A question's image path that leaves the task's image folder."""


def _load_image(image):
  from PIL import Image

  if callable(image):
    return image()
  with Image.open(image) as im:
    return im.convert("RGB")


def _data_mesh(devices=None):
  devices = list(jax.local_devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices), ("data",))


def replicate(model, mesh):
  """Puts every parameter, whole, on every device of `mesh` (evaluation is data-parallel only)."""
  from flax import nnx

  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  return model


def generate_answers(model, processor, questions: list[Question], out: str, *, batch_size: int = 8,
                     max_new_tokens: int = 128, prompt_bucket: int = 32, model_id: str = "llava-jax",
                     devices=None, progress: bool = True, process_index: int | None = None,
                     process_count: int | None = None, eos_token_id: int | None = None) -> dict:
  """Answers the questions of `questions` not yet in OUT, this process's share of them, into its part file.
  Returns counts and the image errors (a missing or unreadable image skips its question; the rest goes on)."""
  from tqdm import tqdm

  from flax import nnx

  check_settings(batch_size=batch_size, max_new_tokens=max_new_tokens, prompt_bucket=prompt_bucket)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  os.makedirs(out, exist_ok=True)
  done = answered_keys(out)
  todo = [q for q in questions if q.key not in done][index::count]
  # Similar lengths share a batch (less padding, fewer buckets); answers do not depend on the order.
  todo.sort(key=lambda q: len(q.text))
  mesh = _data_mesh(devices)
  rows = round_up(batch_size, mesh.size)
  replicate(model, mesh)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  pad = processor.tokenizer.eos_token_id
  eos = pad if eos_token_id is None else eos_token_id  # benchmarks pass -1: never stop early
  errors, answered, start = [], 0, time.time()
  bar = tqdm(total=len(todo), unit="q", disable=not progress, desc="answering")
  part_path = _part_path(out, index, count)
  _mend_torn_tail(part_path)
  with open(part_path, "a") as part:
    for begin in range(0, len(todo), rows):
      batch, images = [], []
      for q in todo[begin:begin + rows]:
        try:
          if q.image_error is not None:  # a path out of the image folder: skipped and counted as a missing image
            raise ImagePathError(q.image_error)
          images.append(None if q.image is None else _load_image(q.image))
          batch.append(q)
        except Exception as e:  # noqa: BLE001 (any unreadable image: count it, go on)
          errors.append({"question_id": q.question_id, "image": q.image if isinstance(q.image, str) else "<inline>",
                         "error": f"{type(e).__name__}: {e}"})
      bar.update(len(todo[begin:begin + rows]) - len(batch))
      if not batch:
        continue
      real = len(batch)
      batch, images = batch + [batch[0]] * (rows - real), images + [images[0]] * (rows - real)  # static rows
      prompts = [processor.prompt([q.text], image=im is not None) for q, im in zip(batch, images)]
      ids, mask, images = _batch_inputs(model, processor, prompts, images, rows, prompt_bucket, pad, batch_sharding)
      graphdef, state = nnx.split(model)
      tokens = np.asarray(_greedy(graphdef, state, jax.device_put(ids, batch_sharding),
                                  jax.device_put(mask, batch_sharding), images, max_new_tokens=max_new_tokens,
                                  eos_id=eos, pad_id=pad))
      for q, row in zip(batch[:real], tokens[:real]):
        cut = np.flatnonzero(row == eos)
        text = processor.decode(row[:cut[0]] if len(cut) else row).strip()
        record = {"question_id": q.question_id, "prompt": q.prompt, "text": text, "answer_id": uuid.uuid4().hex,
                  "model_id": model_id, "metadata": {}}
        record.update(q.extra)
        part.write(json.dumps(record) + "\n")
      part.flush()
      answered += real
      bar.update(real)
  bar.close()
  seconds = time.time() - start
  return {"questions": len(questions), "already_answered": sum(q.key in done for q in questions),
          "answered_now": answered,
          "image_errors": errors, "seconds": seconds, "questions_per_second": answered / seconds if seconds else 0.0}


def _batch_inputs(model, processor, prompts, images, rows: int, bucket: int, pad: int, batch_sharding):
  """Token ids, mask and `image_inputs` of one batch at a fixed shape: `rows` image slots (real images first, in
  row order; the slots of text-only rows blank) so mixed batches compile once per prompt bucket.

  LLaVA-NeXT (anyres) images are tiled to the geometry's most tiles per image and placed by `image_sizes`; the
  feature rows are computed for the real images, then moved to the batch's `rows` image slots (the layout's
  `with_blank_slots`). OneVision's rows hold several taps a token ([B, T, taps]) and their weights, which stay as
  computed: only the newline's row moves with the slot count."""
  from llava_jax.decoding import image_inputs
  from llava_jax.models.llava import image_layout

  present = [im for im in images if im is not None]
  anyres = processor.anyres
  if anyres is not None:
    inputs = processor(prompts, present or None, max_tiles=anyres.max_tiles)
  else:
    inputs = processor(prompts, present or None)
  ids, mask = _pad_to_bucket(inputs["input_ids"], inputs["attention_mask"], bucket, pad)
  if not present:
    return ids, mask, image_inputs(model, ids)
  arrays = inputs["pixel_values"]
  pixels = np.zeros((rows,) + arrays.shape[1:], np.float32)
  image_mask = np.zeros((rows,), bool)
  pixels[:len(present)], image_mask[:len(present)] = arrays, True
  if anyres is None:
    return ids, mask, image_inputs(model, ids, jax.device_put(jnp.asarray(pixels), batch_sharding),
                                   jax.device_put(jnp.asarray(image_mask), batch_sharding))
  out = image_inputs(model, ids, arrays, None, inputs["image_sizes"])
  feature_rows = image_layout(model.config).with_blank_slots(
      out["image_feature_rows"], ids == model.config.image_token_index, len(present), rows, tiles=arrays.shape[1])
  out["pixel_values"] = jax.device_put(jnp.asarray(pixels), batch_sharding)
  out["image_feature_rows"] = jax.device_put(jnp.asarray(feature_rows), batch_sharding)
  if out.get("image_feature_weights") is not None:  # OneVision
    out["image_feature_weights"] = jax.device_put(jnp.asarray(out["image_feature_weights"]), batch_sharding)
  return ids, mask, out


def _greedy(graphdef, state, input_ids, attention_mask, images, *, max_new_tokens, eos_id, pad_id):
  """Greedy decoding: `llava_jax.decoding.decode_loop` at temperature 0 on the batch arrays as the caller put them
  (row-sharded over the mesh; `generate`'s host-side padding would undo that). A test checks every batched row
  against `generate` on that question alone."""
  from llava_jax.decoding import Sampling, decode_loop, seed_array

  return decode_loop(graphdef, state, input_ids, attention_mask, images, seed_array(0),
                     max_new_tokens=max_new_tokens, sampling=Sampling(), eos_ids=(eos_id,), pad_id=pad_id)


def _pad_to_bucket(input_ids, attention_mask, bucket: int, pad_id: int):
  """Left-pads to a multiple of `bucket` here, so the arrays handed to the decode loop already have their final
  shape."""
  return left_pad(input_ids, pad_id, bucket, masks=attention_mask)


# -- the command --------------------------------------------------------------------------------------------------


def format_table(task: str, metrics: dict) -> str:
  """metrics.json as a two-column table; nested names joined with '/'."""
  rows = []

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    elif isinstance(value, float):
      rows.append((prefix, f"{value:.4f}" if abs(value) <= 1 else f"{value:.2f}"))
    else:
      rows.append((prefix, str(value)))

  walk("", metrics)
  width = max([len(r[0]) for r in rows] + [len(task)])
  lines = [f"{task:<{width}}  value", f"{'-' * width}  -----"] + [f"{k:<{width}}  {v}" for k, v in rows]
  return "\n".join(lines)


def evaluate(task: str | Task, data: str, out: str, *, ckpt: str | None = None, answers: str | None = None,
             model=None, processor=None, template: str | None = None, batch_size: int = 8,
             max_new_tokens: int | None = None, prompt_bucket: int = 32, dtype: str | None = None,
             limit: int | None = None, progress: bool = True, devices=None, print_fn=print) -> dict:
  """Generate-then-score (`ckpt`, or a loaded `model` + `processor`) or score-only (`answers`); writes
  OUT/answers.jsonl, OUT/metrics.json (and OUT/run.json after generating) and returns the metrics."""
  check_settings(batch_size=batch_size, max_new_tokens=max_new_tokens, prompt_bucket=prompt_bucket, limit=limit)
  task = get_task(task) if isinstance(task, str) else task
  os.makedirs(out, exist_ok=True)
  merged = os.path.join(out, ANSWERS)
  if answers is not None:
    if not os.path.isfile(answers):
      raise FileNotFoundError(f"answers file {answers} not found")
    records = read_jsonl(answers, task.answer_fields)  # someone's file: every line must be whole
    if os.path.abspath(answers) != os.path.abspath(merged):
      with open(merged, "w") as f:
        for record in records:
          f.write(json.dumps(record) + "\n")
  else:
    if model is None:
      if ckpt is None:
        raise ValueError("give --ckpt (generate, then score) or --answers (score an existing answers file)")
      from llava_jax.checkpoint import load_checkpoint
      from llava_jax.processor import Processor

      model = load_checkpoint(ckpt, dtype=dtype)
      processor = Processor.from_model(model, template=template)
    questions = task.questions(data)[:limit]
    report = generate_answers(model, processor, questions, out, batch_size=batch_size,
                              max_new_tokens=task.max_new_tokens if max_new_tokens is None else max_new_tokens,
                              prompt_bucket=prompt_bucket,
                              model_id=os.path.basename(os.path.normpath(ckpt)) if ckpt else "llava-jax",
                              devices=devices, progress=progress)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("llava_jax_eval_answers_written")
    if jax.process_index() != 0:
      return {}
    records = merge_answers(out, questions)
    with open(os.path.join(out, RUN_REPORT), "w") as f:
      json.dump(report, f, indent=1)
    if report["image_errors"]:
      print_fn(f"{len(report['image_errors'])} question(s) skipped for a missing or unreadable image, e.g. "
               f"{report['image_errors'][0]}; see {os.path.join(out, RUN_REPORT)}")
    print_fn(f"answered {report['answered_now']} question(s) in {report['seconds']:.1f}s "
             f"({report['questions_per_second']:.2f} questions/s); {report['already_answered']} were already answered")
  metrics = task.score(data, records, out)
  with open(os.path.join(out, METRICS), "w") as f:
    json.dump(metrics, f, indent=1)
  print_fn(format_table(task.name, metrics))
  return metrics
