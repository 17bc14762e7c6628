"""The grain input pipeline: LLaVA JSON/JSONL (or TFDS) + images -> fixed-shape batches.

Stages, per host (this module assembles them; each has its own module):

  records (JSON list, JSONL, or a TFDS data source)                                    [records, tfds_llava]
    -> order: a permutation per epoch from (seed, epoch), or LLaVA's                   [ordering]
       `group_by_modality_length` order; epochs repeat (or `num_epochs`)
    -> host shard: the global order is cut into blocks of `batch_size`, dealt round    [ordering]
       robin to the hosts, so hosts see disjoint samples that together cover an epoch
    -> worker shard: the same, over the host's blocks, one worker per block            [ordering]
    -> preprocess (in the worker, `read_threads` threads): text, then image            [preprocess]
    -> batch (or pack) into fixed shapes; bad samples are skipped here                 [collate]
    -> `mp_prefetch` over `num_workers` processes (0 = in this process)                [pipeline]

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
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llava_jax.data import image as image_lib
from llava_jax.data.collate import BatchIterDataset, Collate, pad_token_id
from llava_jax.data.ordering import Blocks, EpochOrder
from llava_jax.data.preprocess import Preprocess
from llava_jax.data.records import SKIPPED_KEY, LlavaJsonSource, record_modality_length

log = logging.getLogger(__name__)


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
    ds = EpochOrder(ds, seed=cfg.seed, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
                    lengths=self.lengths, batch_size=cfg.batch_size, world_size=self.process_count)
    if self.process_count > 1:
      ds = Blocks(ds, block=cfg.batch_size, index=self.process_index, count=self.process_count)
    if worker_count > 1:
      ds = Blocks(ds, block=cfg.batch_size, index=worker_index, count=worker_count)
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
  preprocess = Preprocess(tokenizer, image_processor, template=config.template, max_length=config.max_length,
                          num_image_tokens=config.num_image_tokens, image_token_index=config.image_token_index,
                          aspect_ratio=config.aspect_ratio, image_dir=config.image_dir, strict=config.strict)
  factory = _SampleFactory(source, config, preprocess, lengths, process_index, process_count)
  collate = Collate(config.batch_size, config.max_length, config.packing, config.max_images_per_row,
                    pad_token_id(tokenizer), image_processor.output_size)
  ds = BatchIterDataset(factory, collate)
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
    self._count_skipped(batch.pop(SKIPPED_KEY))
    while not batch["attention_mask"].any():  # only skipped samples were left at the end
      batch = next(self._parent)
      self._count_skipped(batch.pop(SKIPPED_KEY))
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
