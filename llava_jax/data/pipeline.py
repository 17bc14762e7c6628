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
(batch size, workers, hosts): grain's state is per worker, and `set_state` raises
`DataStateMismatchError` naming the setting that differs.

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

  LLaVA-NeXT (`anyres` set, from the model's config: `AnyresLayout.from_config`): each image is
  its anyres tiles (base tile first) padded with zero tiles to P = `anyres.max_tiles` (the
  pinpoints' maximum), so shapes never depend on the image sizes; its "<image>" becomes that
  image's own `anyres.num_image_tokens(size)` tokens; `num_image_tokens` is not used:
    pixel_values    [B, P, H, W, 3] (padded) or [B, M, P, H, W, 3] (packed)
    image_feature_rows [B, L] int32  for each image token, the row of the flattened tile features
                                  [S * P * per_tile, D] it takes, or `image_newline`'s (S = B or
                                  B * M image slots, slot s = b or b * M + k; numbered by
                                  `data/layout.py`), 0 elsewhere: what `Llava.embed` gathers with
    image_sizes     [B, 2] or [B, M, 2] int32  (height, width) of each slot's image, 0 if none

  LLaVA-OneVision (`anyres` a `OneVisionLayout`): as LLaVA-NeXT, but each image token mixes up to
  four feature rows (the bilinear shrink of a large grid; a newline or an unshrunk feature takes
  one, weight 1 in tap 0), so:
    image_feature_rows    [B, L, 4] int32    the four rows of each image token, numbered as above
    image_feature_weights [B, L, 4] float32  their weights, 0 elsewhere
  A record may list several images (`"image": [..]`): each then takes its base tile only (one
  tile, then zero tiles; pps^2 + 1 tokens), each in its own image slot, so padded batches then
  carry M = `max_images_per_sample` slots: pixel_values [B, M, P, H, W, 3], image_mask [B, M],
  image_sizes [B, M, 2]. Records with more images than a row's slots are skipped (malformed).
  With `max_frames` > 0, a record of one video (`"video"`: a folder of frame files under
  image_dir, read in name order, or a list of frame files; a "<video>" tag in its text) gets its
  frames, sampled uniformly down to F = `max_frames`, each one tile pooled to half a side, and
  every batch carries (zeros in rows without a video; more videos a sample: malformed):
    pixel_values_videos   [B, F, H, W, 3] float32  row b's video frames, then zero frames
    video_feature_rows    [B, L, 4] int32    each video token's rows: row b's frame f tile is
                                  slot b * F + f of the batch's B * F (newline: one past them)
    video_feature_weights [B, L, 4] float32  their weights, 0 elsewhere

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
samples left with no target token after truncation, image paths that resolve outside
`image_dir` (unless `allow_images_outside_dir`), and images whose header shows more than
`max_image_pixels` (padded to square for "pad"), refused before decoding. With
`strict=True` the first one raises `text.DataError` instead.

Failing loudly: `DataIterator` raises `DataStallError` (a `DataError`) with the counts
per reason, the first ids and what to check when `max_consecutive_skips` samples in a
row are skipped, when the skipped fraction exceeds `max_skip_fraction` (from
`min_samples_for_fraction` samples on), or when the data ends with every sample
skipped. It raises `DataInterrupted` when `should_stop()` / `request_stop()` asks it
to stop while it reads past skipped samples, and `skip_summary()` gives the counts as
scalars for metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from llava_jax.data import image as image_lib
from llava_jax.data.layout import AnyresLayout, ImageLayout, OneVisionLayout, SingleTileLayout
from llava_jax.data.collate import MAX_SKIPS_PER_BATCH, BatchIterDataset, Collate, pad_token_id
from llava_jax.data.ordering import Blocks, EpochOrder
from llava_jax.data.preprocess import DEFAULT_MAX_IMAGE_PIXELS, Preprocess
from llava_jax.data.iterator import DataInterrupted, DataIterator, DataStallError, DataStateMismatchError
from llava_jax.data.records import LlavaJsonSource, record_modality_length

__all__ = ["DataConfig", "DataInterrupted", "DataIterator", "DataStallError", "DataStateMismatchError",
           "make_dataset", "make_iterator", "make_source"]

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
  aspect_ratio: str = "pad"              # "pad" (LLaVA-1.5), "crop", or "anyres" (LLaVA-NeXT, with `anyres`)
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
  max_consecutive_skips: int = 1000      # this many skipped samples in a row stop the run; 0 = no limit
  max_skip_fraction: float = 0.1         # a larger skipped fraction of the samples seen stops the run; 1 = no limit
  min_samples_for_fraction: int = 200    # ... checked once this many samples were seen
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decoded (and, for "pad", padded) pixels; larger: skipped
  allow_images_outside_dir: bool = False  # let "image" paths resolve outside image_dir ("../", absolute, symlinks)
  anyres: AnyresLayout | OneVisionLayout | None = None  # NeXT / OneVision tiling (the model's); None: one tile
  max_images_per_sample: int = 1         # OneVision, padded: image slots per row for records of several images
  max_frames: int = 0                    # OneVision: frame slots of a row's one video ("video" records); 0: none
  video_token_index: int | None = None   # OneVision: the model's video token (with max_frames)

  def __post_init__(self):
    if self.batch_size < 1 or self.max_length < 2 or self.max_images_per_row < 1:
      raise ValueError("batch_size, max_length and max_images_per_row must be positive")
    if self.num_image_tokens < 1 or self.num_image_tokens >= self.max_length:
      raise ValueError(f"num_image_tokens={self.num_image_tokens} must be in [1, max_length)")
    if self.aspect_ratio not in ("pad", "crop", "square", "anyres"):
      raise ValueError(f"aspect_ratio must be 'pad', 'crop' or 'anyres', got {self.aspect_ratio!r}")
    if (self.aspect_ratio == "anyres") != (self.anyres is not None):
      raise ValueError(f"aspect_ratio={self.aspect_ratio!r} with anyres={self.anyres}: 'anyres' is LLaVA-NeXT's "
                       "tiling and needs the model's geometry (a model with image_grid_pinpoints), and only it (the "
                       "trainer's --config.data.aspect_ratio)")
    if self.max_images_per_sample < 1 or (self.max_images_per_sample > 1 and
                                          not isinstance(self.anyres, OneVisionLayout)):
      raise ValueError(f"max_images_per_sample={self.max_images_per_sample}: several images a sample are "
                       "LLaVA-OneVision's (anyres a OneVisionLayout); 1 otherwise")
    if self.max_frames < 0 or (self.max_frames and (not isinstance(self.anyres, OneVisionLayout) or
                                                    self.video_token_index is None)):
      raise ValueError(f"max_frames={self.max_frames}: videos are LLaVA-OneVision's (anyres a OneVisionLayout, "
                       "with video_token_index); 0 otherwise")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError("num_epochs must be None (forever) or positive")
    if self.max_consecutive_skips < 0 or self.min_samples_for_fraction < 1:
      raise ValueError(f"max_consecutive_skips={self.max_consecutive_skips} must be >= 0 (0: no limit) and "
                       f"min_samples_for_fraction={self.min_samples_for_fraction} >= 1")
    if not 0.0 <= self.max_skip_fraction <= 1.0:  # also refuses NaN
      raise ValueError(f"max_skip_fraction={self.max_skip_fraction} must be in [0, 1] (1: no limit)")
    if self.max_image_pixels < 1:
      raise ValueError(f"max_image_pixels={self.max_image_pixels} must be positive")

  @property
  def layout(self) -> ImageLayout:
    """The image layout batches follow: `anyres`, else one tile of `num_image_tokens` per image."""
    return self.anyres if self.anyres is not None else SingleTileLayout(self.num_image_tokens)


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


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(this host's index, the number of hosts): as given, else JAX's."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} with process_count={process_count}")
  return process_index, process_count


def make_dataset(config: DataConfig, tokenizer, image_processor: image_lib.ImageProcessorConfig | dict,
                 *, process_index: int | None = None, process_count: int | None = None,
                 source=None) -> grain.IterDataset:
  """The grain pipeline; its batches still carry the list of skipped samples and their `SkipRuns`.

  A batch of skipped samples only (at most `MAX_SKIPS_PER_BATCH` or
  `max_consecutive_skips` of them) holds only those two keys.

  Use `make_iterator` unless you compose further grain stages yourself.
  `process_index` / `process_count` default to JAX's; tests pass them to act as hosts.
  """
  process_index, process_count = _process_layout(process_index, process_count)
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
                          aspect_ratio=config.aspect_ratio, image_dir=config.image_dir, strict=config.strict,
                          max_image_pixels=config.max_image_pixels,
                          allow_images_outside_dir=config.allow_images_outside_dir, anyres=config.anyres,
                          max_images=config.max_images_per_row if config.packing else config.max_images_per_sample,
                          max_frames=config.max_frames, video_token_index=config.video_token_index)
  factory = _SampleFactory(source, config, preprocess, lengths, process_index, process_count)
  anyres = config.anyres
  if anyres is not None and image_processor.output_size != (anyres.tile, anyres.tile):
    raise ValueError(f"the image processor's crop {image_processor.output_size} differs from the anyres tile "
                     f"{anyres.tile} (the vision tower's image size)")
  collate = Collate(config.batch_size, config.max_length, config.packing, config.max_images_per_row,
                    pad_token_id(tokenizer), image_processor.output_size,
                    layout=config.layout, image_token_index=config.image_token_index,
                    max_images_per_sample=config.max_images_per_sample, max_frames=config.max_frames,
                    video_token_index=-1 if config.video_token_index is None else config.video_token_index)
  # A batch closes after at most this many skips, so the iterator sees a stall as it grows.
  max_skips = min(MAX_SKIPS_PER_BATCH, config.max_consecutive_skips or MAX_SKIPS_PER_BATCH)
  ds = BatchIterDataset(factory, collate, max_skips)
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


def make_iterator(config: DataConfig, tokenizer, image_processor: image_lib.ImageProcessorConfig | dict,
                  *, process_index: int | None = None, process_count: int | None = None,
                  source=None, should_stop: Callable[[], bool] | None = None) -> DataIterator:
  """The pipeline's entry point: a resumable iterator of fixed-shape batches.

  `should_stop` (e.g. the trainer's preemption flag) is polled while the iterator reads
  past skipped samples; when it returns True, `next()` raises `DataInterrupted`.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  dataset = make_dataset(config, tokenizer, image_processor, process_index=process_index,
                         process_count=process_count, source=source)
  return DataIterator(dataset, config, process_count=process_count, should_stop=should_stop)
