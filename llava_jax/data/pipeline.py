"""The grain input pipeline: LLaVA JSON/JSONL (or TFDS) + images -> fixed-shape batches.

Stages, per host:

  records (JSON list, JSONL, or a TFDS data source)
    -> order: a permutation per epoch from (seed, epoch), or LLaVA's
       `group_by_modality_length` order; epochs repeat (or `num_epochs`)
    -> host shard: the global order is cut into blocks of `batch_size`, dealt round
       robin to the hosts, so hosts see disjoint samples that together cover an epoch
    -> worker shard: the same, over the host's blocks, one worker per block
    -> preprocess (in the worker, `read_threads` threads): text, then image
    -> batch (or pack) into fixed shapes; bad samples are skipped here
    -> `mp_prefetch` over `num_workers` processes (0 = in this process)

`make_iterator` wraps it in a `DataIterator`, which counts and logs skipped samples
and whose `get_state()` (a JSON-serialisable dict, grain's iterator state plus the
counts) restores the exact position with `set_state()`. Restore with the same config
(batch size, workers, hosts): grain's state is per worker.

Batch contract (numpy arrays; B = `batch_size` rows per host, L = `max_length`,
H, W = the processor's crop size, M = `max_images_per_row`):

  Padded (default), one sample per row, right-padded:
    input_ids       [B, L] int32  token ids; `pad_id` after the sample; each image is
                                  `num_image_tokens` copies of `image_token_index`
    labels          [B, L] int32  next-token targets at the same positions as HF
                                  (the model shifts): -100 on system/user text, image
                                  tokens, padding
    attention_mask  [B, L] int32  1 on the sample's tokens, 0 on padding
    pixel_values    [B, H, W, 3]  float32, CLIP-normalised; zeros where no image
    image_mask      [B]     bool  the row has an image (False: text-only row, which
                                  then has no image tokens)

  Packed (`packing=True`): several samples per row, left to right, greedily in
  order (a sample that does not fit starts the next row):
    input_ids, labels, attention_mask  [B, L] as above; labels are also -100 at the
                                  first token of every sample, so no sample is trained
                                  to predict the next one
    segment_ids     [B, L] int32  1, 2, ... per sample in the row, 0 on padding;
                                  attention must stay within a segment (causal)
    positions       [B, L] int32  0, 1, ... restarting at each sample; 0 on padding
    pixel_values    [B, M, H, W, 3] float32  the row's images in order: the k-th run of
                                  image tokens in row b is image pixel_values[b, k]
    image_mask      [B, M]  bool  slot k of row b holds an image

At the end of a finite run (`num_epochs` set) the last batch is filled up with empty
rows (attention_mask all 0, labels all -100, no image). The model must not produce
NaN for such rows; they carry no loss. A batch with no sample at all is never
returned. With several hosts, train for a number of steps with `num_epochs=None`:
skipped samples and packing make hosts' batch counts differ at the end of a finite
run.

Skipped samples (see `text.SkipReason`): missing, unreadable or empty image files,
malformed JSONL lines or records, conversations that do not alternate or lack a reply,
"<image>" tags that do not match the image, tokenization mismatches (where the
reference silently masks the whole sample), image tokens cut by `max_length`, and
samples left with no target token after truncation. With `strict=True` the first one
raises `text.DataError` instead.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data import text as text_lib
from llava_jax.data.text import DataError, SkipReason

log = logging.getLogger(__name__)

_SKIP = "_skip"       # key of a skipped-sample marker travelling through the pipeline
_SKIPPED = "_skipped"  # key of a batch's list of (reason, id, message) of skipped samples


@dataclasses.dataclass
class DataConfig:
  """What the pipeline reads and how it batches (`json_path`, `image_dir` as in the CLI)."""
  json_path: str | Sequence[str] = ""   # LLaVA JSON (a list) or JSONL (".jsonl"); several are concatenated
  image_dir: str = ""                    # "image" fields are relative to it
  tfds_name: str = ""                    # instead of json_path: "llava_pretrain" or "llava_instruct"
  tfds_data_dir: str | None = None
  tfds_split: str = "train"
  template: str = "vicuna_v1"            # conversation.TEMPLATES; "plain" for stage 1
  max_length: int = 2048
  batch_size: int = 16                   # rows per host
  num_image_tokens: int = 576            # image features per image
  image_token_index: int = 32000
  aspect_ratio: str = "pad"              # "pad" (LLaVA-1.5) or "crop"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None          # None: repeat forever
  group_by_modality_length: bool = False
  packing: bool = False
  max_images_per_row: int = 4            # packing only
  num_workers: int = 0                   # preprocessing processes; 0 = this process
  read_threads: int = 2                  # threads per process
  worker_buffer: int = 2                 # batches buffered per worker
  strict: bool = False                   # raise at the first bad sample

  def __post_init__(self):
    if self.batch_size < 1 or self.max_length < 2 or self.max_images_per_row < 1:
      raise ValueError("batch_size, max_length and max_images_per_row must be positive")
    if self.num_image_tokens < 1 or self.num_image_tokens >= self.max_length:
      raise ValueError(f"num_image_tokens={self.num_image_tokens} must be in [1, max_length)")
    if self.aspect_ratio not in ("pad", "crop", "square"):
      raise ValueError(f"aspect_ratio must be 'pad' or 'crop', got {self.aspect_ratio!r}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError("num_epochs must be None (forever) or positive")


# ------------------------------------------------------------------------------ sources


class LlavaJsonSource:
  """Random access to LLaVA records from JSON lists and JSONL files.

  JSON lists are parsed once here and kept as compact JSON bytes (cheap to send to
  worker processes); JSONL files are indexed by line offset and read on demand. A
  JSONL line that is not valid JSON comes back as a malformed-record marker.
  """

  def __init__(self, paths: str | Sequence[str]):
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths or not all(paths):
      raise ValueError("json_path is empty")
    self._parts = []  # (kind, path, data, offsets)
    json_lengths = []  # modality lengths of JSON-list records, computed while they are parsed
    for path in paths:
      if path.endswith(".jsonl"):
        offsets = [0]
        with open(path, "rb") as f:
          for line in f:
            offsets.append(offsets[-1] + len(line))
        starts = np.asarray(offsets, np.int64)
        keep = np.diff(starts) > 1  # drop empty lines ("\n")
        self._parts.append(("jsonl", path, None, (starts[:-1][keep], starts[1:][keep])))
      else:
        with open(path) as f:
          records = json.load(f)
        if not isinstance(records, list):
          raise ValueError(f"{path}: a LLaVA JSON file holds a list of records")
        blobs = [json.dumps(r, ensure_ascii=False).encode() for r in records]
        json_lengths.append(np.array([record_modality_length(r) if isinstance(r, dict) else -1
                                      for r in records], np.int64))
        ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        data = np.frombuffer(b"".join(blobs), np.uint8)
        self._parts.append(("json", path, data, (starts, ends)))
    self._sizes = np.cumsum([len(p[3][0]) for p in self._parts])
    self._json_lengths = json_lengths
    self._fds: dict[str, int] = {}

  def __len__(self) -> int:
    return int(self._sizes[-1]) if len(self._sizes) else 0

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"] = {}  # file descriptors stay in their process
    return state

  def _raw(self, index: int) -> tuple[bytes, str]:
    part = int(np.searchsorted(self._sizes, index, side="right"))
    local = index - (int(self._sizes[part - 1]) if part else 0)
    kind, path, data, (starts, ends) = self._parts[part]
    start, end = int(starts[local]), int(ends[local])
    if kind == "json":
      return data[start:end].tobytes(), f"{path}[{local}]"
    fd = self._fds.get(path)
    if fd is None:  # Reading threads may race here; keep one descriptor, close the other.
      opened = os.open(path, os.O_RDONLY)
      fd = self._fds.setdefault(path, opened)
      if fd != opened:
        os.close(opened)
    return os.pread(fd, end - start, start), f"{path}:{local + 1}"

  def __getitem__(self, index: int) -> dict:
    raw, where = self._raw(index)
    try:
      record = json.loads(raw)
    except ValueError as e:
      return {_SKIP: SkipReason.MALFORMED_RECORD.value, "id": where, "message": f"not JSON: {e}"}
    if not isinstance(record, dict):
      return {_SKIP: SkipReason.MALFORMED_RECORD.value, "id": where, "message": "not a JSON object"}
    record.setdefault("id", where)
    return record

  def modality_lengths(self) -> np.ndarray:
    """LLaVA's `modality_lengths`: word count, negative for text-only samples."""
    out, json_parts = [], iter(self._json_lengths)
    for kind, _, _, (starts, _) in self._parts:
      if kind == "json":
        out.append(next(json_parts))
      else:  # JSONL: parse each line once
        base = len(np.concatenate(out)) if out else 0
        out.append(np.array([record_modality_length(self[base + i]) for i in range(len(starts))], np.int64))
    return np.concatenate(out)


def record_modality_length(record: dict) -> int:
  """Words in all turns (at least 1), negated when the record has no image."""
  try:
    n = sum(len(turn["value"].split()) for turn in record["conversations"])
  except (KeyError, TypeError, AttributeError):
    n = 1
  n = max(n, 1)
  return n if "image" in record else -n


# ------------------------------------------------------------------------------ order


def _length_grouped(lengths: np.ndarray, batch_size: int, world_size: int,
                    rng: np.random.Generator) -> list[int]:
  """LLaVA's `get_length_grouped_indices`: shuffled megabatches sorted by length."""
  indices = rng.permutation(len(lengths)).tolist()
  size = world_size * batch_size
  out = []
  for start in range(0, len(indices), size):
    mega = sorted(indices[start:start + size], key=lambda i: lengths[i], reverse=True)
    for chunk in _even_chunks(mega, lengths, world_size):
      out.extend(chunk)
  return out


def _even_chunks(indices: list[int], lengths, num_chunks: int) -> list[list[int]]:
  """LLaVA's `split_to_even_chunks`: give each index to the shortest unfilled chunk."""
  if len(indices) % num_chunks:
    return [indices[i::num_chunks] for i in range(num_chunks)]
  per_chunk = len(indices) // num_chunks
  chunks = [[] for _ in range(num_chunks)]
  totals = [0.0] * num_chunks
  for index in indices:
    shortest = totals.index(min(totals))
    chunks[shortest].append(index)
    totals[shortest] += lengths[index]
    if len(chunks[shortest]) == per_chunk:
      totals[shortest] = float("inf")
  return chunks


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    rng: np.random.Generator) -> list[int]:
  """LLaVA's `get_modality_length_grouped_indices` with a numpy generator.

  Image samples (positive lengths) and text-only samples (negative) go to separate
  megabatches of `world_size * batch_size`, each sorted by length and split evenly;
  the megabatches are shuffled and the two leftovers go at the end (or first, when
  together they fill a megabatch).
  """
  lengths = np.asarray(lengths)
  if np.all(lengths > 0) or np.all(lengths < 0):
    return _length_grouped(np.abs(lengths), batch_size, world_size, rng)
  mm = np.flatnonzero(lengths > 0)
  lang = np.flatnonzero(lengths < 0)
  mm_order = [int(mm[i]) for i in _length_grouped(lengths[mm], batch_size, world_size, rng)]
  lang_order = [int(lang[i]) for i in _length_grouped(-lengths[lang], batch_size, world_size, rng)]
  size = world_size * batch_size
  mm_mega = [mm_order[i:i + size] for i in range(0, len(mm_order), size)]
  lang_mega = [lang_order[i:i + size] for i in range(0, len(lang_order), size)]
  extra = mm_mega[-1] + lang_mega[-1]
  mega = mm_mega[:-1] + lang_mega[:-1]
  mega = [mega[i] for i in rng.permutation(len(mega))]
  if len(extra) >= size:
    mega = [extra[:size]] + mega
    extra = extra[size:]
  if extra:
    mega.append(extra)
  return [i for m in mega for i in m]


class _EpochOrder(grain.MapDataset):
  """Repeats the parent, visiting each epoch in its own seeded order."""

  def __init__(self, parent: grain.MapDataset, *, seed: int, shuffle: bool, num_epochs: int | None,
               lengths: np.ndarray | None, batch_size: int, world_size: int):
    super().__init__(parent)
    self._n = len(parent)
    self._seed, self._shuffle, self._num_epochs = seed, shuffle, num_epochs
    self._lengths, self._batch_size, self._world_size = lengths, batch_size, world_size
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize if self._num_epochs is None else self._n * self._num_epochs

  def __str__(self) -> str:
    return "EpochOrder"

  def _order(self, epoch: int) -> np.ndarray | None:
    if not self._shuffle and self._lengths is None:
      return None
    with self._lock:
      order = self._cache.get(epoch)
      if order is None:
        rng = np.random.default_rng([self._seed, epoch])
        if self._lengths is not None:
          order = np.asarray(modality_length_grouped_indices(
              self._lengths, self._batch_size, self._world_size, rng), np.int64)
        else:
          order = rng.permutation(self._n)
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = order
    return order

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    order = self._order(epoch)
    return self._parent[int(order[i]) if order is not None else i]


class _Blocks(grain.MapDataset):
  """Blocks `index`, `index + count`, ... of size `block` of the parent, concatenated."""

  def __init__(self, parent: grain.MapDataset, *, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count

  def __len__(self) -> int:
    total = len(self._parent)
    if total >= sys.maxsize // 2:
      return sys.maxsize
    full, rest = divmod(total, self._block)
    mine = max(0, (full - self._index + self._count - 1) // self._count) * self._block
    if rest and full % self._count == self._index:
      mine += rest
    return mine

  def __str__(self) -> str:
    return f"Blocks({self._index}/{self._count} of {self._block})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    blk, offset = divmod(index, self._block)
    return self._parent[(blk * self._count + self._index) * self._block + offset]


# ------------------------------------------------------------------------------ preprocess


class Preprocess:
  """Record -> example (ids, labels, pixels), or a skipped-sample marker."""

  def __init__(self, config: DataConfig, tokenizer, image_config: image_lib.ImageProcessorConfig):
    self._config = config
    self._tokenizer = tokenizer
    self._image_config = image_config
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_lock"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __call__(self, record: dict) -> dict:
    try:
      return self._process(record)
    except DataError as e:
      if self._config.strict:
        raise
      return {_SKIP: e.reason.value, "id": str(e.sample_id), "message": str(e)}

  def _load_image(self, record: dict, sample_id) -> Image.Image:
    if "image_bytes" in record:  # TFDS records carry the encoded file
      data, where = record["image_bytes"], record.get("image", "<bytes>")
      if data is None:
        raise DataError(SkipReason.MISSING_IMAGE, f"{where}: not found when the dataset was built",
                        sample_id)
      if not data:
        raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: zero bytes", sample_id)
      handle = io.BytesIO(data)
    else:
      where = os.path.join(self._config.image_dir, record["image"])
      if not os.path.isfile(where):
        raise DataError(SkipReason.MISSING_IMAGE, f"{where}: no such file", sample_id)
      if os.path.getsize(where) == 0:
        raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: zero bytes", sample_id)
      handle = where
    try:
      with Image.open(handle) as img:
        img.load()  # decodes now, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(SkipReason.UNREADABLE_IMAGE, f"{where}: {e}", sample_id) from None
    if img.width == 0 or img.height == 0:
      raise DataError(SkipReason.EMPTY_IMAGE, f"{where}: {img.width}x{img.height}", sample_id)
    return img

  def _process(self, record: dict) -> dict:
    if _SKIP in record:
      raise DataError(SkipReason(record[_SKIP]), record["message"], record["id"])
    sample_id = record.get("id")
    image_name = record.get("image")
    has_image = "image" in record
    if has_image and not (isinstance(image_name, str) and image_name):
      raise DataError(SkipReason.MALFORMED_RECORD, f"'image' must be a file name, got {image_name!r}",
                      sample_id)
    cfg = self._config
    with self._lock:  # HF fast tokenizers are not safe to share between threads
      input_ids, labels = text_lib.preprocess_conversation(
          record.get("conversations"), self._tokenizer, cfg.template, cfg.num_image_tokens,
          cfg.max_length, cfg.image_token_index, has_image=has_image, sample_id=sample_id)
    if not has_image and np.any(input_ids == cfg.image_token_index):
      raise DataError(SkipReason.TAG_WITHOUT_IMAGE, "text-only sample tokenizes to the image token",
                      sample_id)
    if np.all(labels == text_lib.IGNORE_INDEX):
      raise DataError(SkipReason.NO_TARGETS, "every label is masked (reply truncated away?)", sample_id)
    pixels = None
    if has_image:
      img = self._load_image(record, sample_id)
      try:
        pixels = image_lib.preprocess_image(img, self._image_config, cfg.aspect_ratio)
      except (OSError, ValueError) as e:  # e.g. a colour mode Pillow cannot convert to RGB
        raise DataError(SkipReason.UNREADABLE_IMAGE, f"{record['image']}: {e}", sample_id) from None
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "id": str(sample_id)}


# ------------------------------------------------------------------------------ batching


def pad_token_id(tokenizer) -> int:
  """The padding id: the tokenizer's pad, else unk (what LLaVA sets), else 0."""
  for name in ("pad_token_id", "unk_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  return 0


class _Collate:
  """Rows of examples -> one fixed-shape batch (see the module docstring)."""

  def __init__(self, config: DataConfig, pad_id: int, image_size: tuple[int, int]):
    self.config, self.pad_id, self.image_size = config, pad_id, image_size

  def fits(self, row: list[dict], example: dict) -> bool:
    used = sum(len(e["input_ids"]) for e in row)
    images = sum(e["pixel_values"] is not None for e in row)
    return (used + len(example["input_ids"]) <= self.config.max_length and
            images + (example["pixel_values"] is not None) <= self.config.max_images_per_row)

  def __call__(self, rows: list[list[dict]], skipped: list[tuple[str, str, str]]) -> dict:
    cfg = self.config
    b, length = cfg.batch_size, cfg.max_length
    h, w = self.image_size
    batch = {
        "input_ids": np.full((b, length), self.pad_id, np.int32),
        "labels": np.full((b, length), text_lib.IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
    }
    if cfg.packing:
      m = cfg.max_images_per_row
      batch.update(segment_ids=np.zeros((b, length), np.int32), positions=np.zeros((b, length), np.int32),
                   pixel_values=np.zeros((b, m, h, w, 3), np.float32), image_mask=np.zeros((b, m), bool))
    else:
      batch.update(pixel_values=np.zeros((b, h, w, 3), np.float32), image_mask=np.zeros((b,), bool))
    for r, row in enumerate(rows):
      start, slot = 0, 0
      for segment, ex in enumerate(row, 1):
        n = len(ex["input_ids"])
        end = start + n
        batch["input_ids"][r, start:end] = ex["input_ids"]
        batch["labels"][r, start:end] = ex["labels"]
        batch["attention_mask"][r, start:end] = 1
        if cfg.packing:
          batch["labels"][r, start] = text_lib.IGNORE_INDEX
          batch["segment_ids"][r, start:end] = segment
          batch["positions"][r, start:end] = np.arange(n, dtype=np.int32)
          if ex["pixel_values"] is not None:
            batch["pixel_values"][r, slot] = ex["pixel_values"]
            batch["image_mask"][r, slot] = True
            slot += 1
        elif ex["pixel_values"] is not None:
          batch["pixel_values"][r] = ex["pixel_values"]
          batch["image_mask"][r] = True
        start = end
    batch[_SKIPPED] = list(skipped)
    return batch


class _BatchIterator(grain.DatasetIterator):
  """Drops skipped-sample markers (keeping them for the batch) and fills rows."""

  def __init__(self, parent: grain.DatasetIterator, collate: _Collate):
    super().__init__(parent)
    self._collate = collate
    self._pending = None        # an example read but left for the next batch (packing)
    self._pending_state = None  # the parent's state before that example was read

  def __next__(self) -> dict:
    packing = self._collate.config.packing
    batch_size = self._collate.config.batch_size
    rows: list[list[dict]] = []
    skipped: list[tuple[str, str, str]] = []
    while True:
      if self._pending is not None:
        example, state_before = self._pending, self._pending_state
        self._pending = self._pending_state = None
      else:
        state_before = self._parent.get_state() if packing else None
        try:
          example = next(self._parent)
        except StopIteration:
          break
      if _SKIP in example:
        skipped.append((example[_SKIP], example["id"], example["message"]))
        continue
      if not packing:
        rows.append([example])
        if len(rows) == batch_size:
          break
      elif rows and self._collate.fits(rows[-1], example):
        rows[-1].append(example)
      elif len(rows) < batch_size:
        rows.append([example])
      else:
        self._pending, self._pending_state = example, state_before
        break
    if not rows and not skipped:
      raise StopIteration
    return self._collate(rows, skipped)

  def get_state(self) -> dict[str, Any]:
    if self._pending is not None:
      return {"parent": self._pending_state}
    return {"parent": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._pending = self._pending_state = None
    self._parent.set_state(state["parent"])

  def __str__(self) -> str:
    return "LlavaBatch"


class _BatchIterDataset(grain.IterDataset):
  """Batches a sample dataset made by `make_samples(worker_index, worker_count)`.

  It rebuilds its parent when `mp_prefetch` gives it a worker slice, so that workers
  split the host's stream by whole batches (blocks) rather than by sample: a
  worker's batch is then one block of the order, as with no workers.
  """

  def __init__(self, make_samples: Callable[[int, int], grain.IterDataset], collate: _Collate):
    super().__init__(make_samples(0, 1))
    self._make_samples = make_samples
    self._collate = collate

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._parents = (self._make_samples(sl.start or 0, sl.step or 1),)

  def __iter__(self) -> grain.DatasetIterator:
    return _BatchIterator(self._parent.__iter__(), self._collate)

  def __str__(self) -> str:
    return "LlavaBatchDataset"


@dataclasses.dataclass
class _SampleFactory:
  """Picklable recipe of the per-sample part of the pipeline."""
  source: Any
  config: DataConfig
  preprocess: Preprocess
  lengths: np.ndarray | None
  process_index: int
  process_count: int

  def __call__(self, worker_index: int, worker_count: int) -> grain.IterDataset:
    cfg = self.config
    ds = grain.MapDataset.source(self.source)
    ds = _EpochOrder(ds, seed=cfg.seed, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
                     lengths=self.lengths, batch_size=cfg.batch_size, world_size=self.process_count)
    if self.process_count > 1:
      ds = _Blocks(ds, block=cfg.batch_size, index=self.process_index, count=self.process_count)
    if worker_count > 1:
      ds = _Blocks(ds, block=cfg.batch_size, index=worker_index, count=worker_count)
    ds = ds.map(self.preprocess)
    buffer = max(2 * cfg.batch_size, cfg.read_threads)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=buffer))


def make_source(config: DataConfig):
  """The record source the config names (JSON/JSONL files or a TFDS dataset)."""
  if config.tfds_name:
    from llava_jax.data import tfds_llava  # pylint: disable=import-outside-toplevel
    return tfds_llava.RecordSource(config.tfds_name, data_dir=config.tfds_data_dir,
                                   split=config.tfds_split)
  return LlavaJsonSource(config.json_path)


def make_dataset(config: DataConfig, tokenizer, image_processor: image_lib.ImageProcessorConfig | dict,
                 *, process_index: int | None = None, process_count: int | None = None,
                 source=None) -> grain.IterDataset:
  """The grain pipeline; its batches still carry the list of skipped samples.

  Use `make_iterator` unless you compose further grain stages yourself.
  `process_index` / `process_count` default to JAX's; tests pass them to act as hosts.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} with process_count={process_count}")
  if isinstance(image_processor, dict):
    image_processor = image_lib.ImageProcessorConfig.from_dict(image_processor)
  source = make_source(config) if source is None else source
  if len(source) == 0:
    raise ValueError("the data source is empty")
  lengths = None
  if config.group_by_modality_length:
    lengths = (source.modality_lengths() if hasattr(source, "modality_lengths") else
               np.array([record_modality_length(source[i]) for i in range(len(source))]))
  factory = _SampleFactory(source, config, Preprocess(config, tokenizer, image_processor), lengths,
                           process_index, process_count)
  collate = _Collate(config, pad_token_id(tokenizer), image_processor.output_size)
  ds = _BatchIterDataset(factory, collate)
  if config.num_workers > 0:
    _allow_unparsed_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                     per_worker_buffer_size=config.worker_buffer))
  return ds


def _allow_unparsed_absl_flags() -> None:
  """grain 0.2.18 reads an absl flag in `mp_prefetch` when JAX is loaded, which fails
  outside `absl.app` (google/grain#1355, fixed upstream by #1362): use the defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class DataIterator(grain.DatasetIterator):
  """Batches, with skipped samples counted per reason and logged with their ids.

  `get_state()` returns a JSON-serialisable dict (grain's state and the counts);
  `set_state()` resumes exactly there. Being a grain `DatasetIterator`, it also works
  with `grain.checkpoint.CheckpointSave/Restore` and Orbax's checkpointables.
  """

  MAX_IDS_KEPT = 1000  # ids remembered per reason (counts are exact regardless)
  LOGGED_PER_REASON = 20

  def __init__(self, dataset: grain.IterDataset):
    super().__init__(iter(dataset))
    self.skip_counts: dict[str, int] = collections.Counter()
    self.skipped_ids: dict[str, list[str]] = collections.defaultdict(list)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self._count_skipped(batch.pop(_SKIPPED))
    while not batch["attention_mask"].any():  # only skipped samples were left at the end
      batch = next(self._parent)
      self._count_skipped(batch.pop(_SKIPPED))
    return batch

  def _count_skipped(self, skipped) -> None:
    for reason, sample_id, message in skipped:
      self.skip_counts[reason] += 1
      ids = self.skipped_ids[reason]
      if len(ids) < self.MAX_IDS_KEPT:
        ids.append(sample_id)
      if self.skip_counts[reason] <= self.LOGGED_PER_REASON:
        log.warning("skipped %s", message)
      elif self.skip_counts[reason] in (100, 1000, 10000, 100000):
        log.warning("%d samples skipped for %s so far", self.skip_counts[reason], reason)

  @property
  def num_skipped(self) -> int:
    return sum(self.skip_counts.values())

  def log_summary(self) -> None:
    """One log line per reason: the count and the first ids."""
    for reason, count in sorted(self.skip_counts.items()):
      log.warning("skipped %d samples for %s, e.g. %s", count, reason, self.skipped_ids[reason][:10])

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._parent.get_state(), "skip_counts": dict(self.skip_counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["grain"])
    self.skip_counts = collections.Counter(state.get("skip_counts", {}))
    self.skipped_ids = collections.defaultdict(list)

  def __str__(self) -> str:
    return "LlavaDataIterator"


def make_iterator(config: DataConfig, tokenizer, image_processor: image_lib.ImageProcessorConfig | dict,
                  *, process_index: int | None = None, process_count: int | None = None,
                  source=None) -> DataIterator:
  """The pipeline's entry point: a resumable iterator of fixed-shape batches."""
  return DataIterator(make_dataset(config, tokenizer, image_processor, process_index=process_index,
                                   process_count=process_count, source=source))
