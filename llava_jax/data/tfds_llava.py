"""TFDS builders `llava_pretrain` and `llava_instruct`: LLaVA JSON + images -> ArrayRecord.

Reading hundreds of thousands of small image files is slow on network disks; these
builders pack each record and its encoded image file into ArrayRecord shards, which
`tfds.data_source` (and so the grain pipeline, `DataConfig.tfds_name`) reads by index.
TensorFlow is not needed: the features are plain text and bytes.

The manual directory holds what LLaVA's scripts point at:

  llava_pretrain   blip_laion_cc_sbu_558k.json and images/ (LLaVA-Pretrain, unzipped)
  llava_instruct   llava_v1_5_mix665k.json and the image folders it names
                   (coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images,
                   vg/VG_100K, vg/VG_100K_2)

If the named JSON file is absent and the directory has exactly one *.json / *.jsonl
file, that one is used (handy for one's own data). Build with

  builder = tfds_llava.LlavaInstruct(data_dir=DATA_DIR)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR))

Records keep their order (no shuffling on write) so that `modality_lengths`, stored in
the dataset's metadata, line up with the indices for `group_by_modality_length`.
Records are stored as they are: bad ones are found and counted by the pipeline, as
with JSON input (a missing image file is kept as a record without image bytes).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from llava_jax.data.records import record_modality_length, skip_record
from llava_jax.data.text import SkipReason

log = logging.getLogger(__name__)

try:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
except ImportError:  # The rest of the package works without TFDS.
  tfds = None


def _iter_records(path: str):
  """(key, record or None, raw text) per record of a JSON list or JSONL file."""
  if path.endswith(".jsonl"):
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError:
          record = None
        yield f"{os.path.basename(path)}:{n}", record, line
  else:
    with open(path) as f:
      records = json.load(f)
    for n, record in enumerate(records):
      yield f"{os.path.basename(path)}[{n}]", record, None


if tfds is not None:

  class _LlavaBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared logic of the two builders; `JSON_FILE` and `IMAGE_SUBDIR` differ."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    JSON_FILE = ""
    IMAGE_SUBDIR = ""
    # No checksums file to look for next to the code; looking for it imports the
    # `importlib_resources` backport, which tensorflow-datasets 4.9.10 does not
    # install on Python >= 3.9.
    code_path = None

    def __init__(self, *, file_format: str = "array_record", **kwargs):
      # ArrayRecord: random access for `tfds.data_source`, and no TensorFlow needed.
      super().__init__(file_format=file_format, **kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=__doc__,
          features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(),
              "image": tfds.features.Text(),  # relative path, "" for text-only
              "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file
              "image_missing": tfds.features.Tensor(shape=(), dtype=np.bool_),  # not found at build
              "conversations": tfds.features.Text(),  # JSON text (the raw line if malformed)
          }),
          metadata=tfds.core.MetadataDict(),
          disable_shuffling=True,  # keep record order, so metadata lengths match indices
      )

    def _json_path(self, manual_dir: str) -> str:
      path = os.path.join(manual_dir, self.JSON_FILE)
      if os.path.exists(path):
        return path
      found = [f for f in os.listdir(manual_dir) if f.endswith((".json", ".jsonl"))]
      if len(found) == 1:
        return os.path.join(manual_dir, found[0])
      raise FileNotFoundError(f"{manual_dir} needs {self.JSON_FILE} (or exactly one .json/.jsonl file)")

    def _split_generators(self, dl_manager):
      manual_dir = os.fspath(dl_manager.manual_dir)
      image_root = os.path.join(manual_dir, self.IMAGE_SUBDIR)
      if not os.path.isdir(image_root):
        image_root = manual_dir
      return {"train": self._generate_examples(self._json_path(manual_dir), image_root)}

    def _generate_examples(self, json_path: str, image_root: str):
      lengths = []
      for index, (where, record, raw) in enumerate(_iter_records(json_path)):
        example = {"id": where, "image": "", "image_bytes": b"", "image_missing": False,
                   "conversations": raw or ""}
        if isinstance(record, dict):
          example["id"] = str(record.get("id", where))
          example["conversations"] = json.dumps(record.get("conversations"), ensure_ascii=False)
          image = record.get("image")
          if "image" in record:
            example["image"] = image if isinstance(image, str) else json.dumps(image)
            path = os.path.join(image_root, example["image"])
            if isinstance(image, str) and os.path.isfile(path):
              with open(path, "rb") as f:
                example["image_bytes"] = f.read()
            else:
              example["image_missing"] = True
              log.warning("%s: image %s not found; stored without it", example["id"], path)
          lengths.append(record_modality_length(record))
        else:
          example["conversations"] = raw if raw is not None else json.dumps(record)
          lengths.append(-1)
        yield index, example
      self.info.metadata["modality_lengths"] = lengths

  class LlavaPretrain(_LlavaBuilder):
    """LLaVA-Pretrain (558k BLIP-captioned LAION/CC/SBU images), stage 1."""
    name = "llava_pretrain"
    JSON_FILE = "blip_laion_cc_sbu_558k.json"
    IMAGE_SUBDIR = "images"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put blip_laion_cc_sbu_558k.json and the unzipped images/ folder here."

  class LlavaInstruct(_LlavaBuilder):
    """LLaVA-1.5 instruction mixture (llava_v1_5_mix665k), stage 2."""
    name = "llava_instruct"
    JSON_FILE = "llava_v1_5_mix665k.json"
    IMAGE_SUBDIR = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put llava_v1_5_mix665k.json here with coco/, gqa/, ocr_vqa/, "
                                    "textvqa/ and vg/ image folders.")


class RecordSource:
  """A TFDS split as the pipeline's record source (random access, picklable).

  Records come back in the JSON shape with the image file's bytes under
  "image_bytes"; for a record whose image was not found at build time that is None,
  and the pipeline reports a missing image.
  """

  def __init__(self, name: str, data_dir: str | None = None, split: str = "train"):
    if tfds is None:
      raise ImportError("reading TFDS data needs `pip install tensorflow-datasets`")
    self._name, self._data_dir, self._split = name, data_dir, split
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      self._source = tfds.data_source(self._name, data_dir=self._data_dir, split=self._split)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # each process opens its own readers
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._open()[index]
    text = lambda key: example[key].decode() if isinstance(example[key], bytes) else str(example[key])
    sample_id = text("id")
    try:
      conversations = json.loads(text("conversations"))
    except ValueError:
      return skip_record(SkipReason.MALFORMED_RECORD, sample_id, "not JSON")
    record = {"id": sample_id, "conversations": conversations}
    image = text("image")
    if image:
      record["image"] = image
      record["image_bytes"] = None if example["image_missing"] else bytes(example["image_bytes"])
    return record

  def modality_lengths(self) -> np.ndarray:
    """LLaVA's modality lengths, from the metadata written at build time."""
    builder = tfds.builder(self._name, data_dir=self._data_dir)
    lengths = builder.info.metadata.get("modality_lengths") if builder.info.metadata else None
    if lengths is None or len(lengths) != len(self):
      raise ValueError(f"{self._name} has no modality_lengths metadata for {len(self)} records")
    return np.asarray(lengths, np.int64)
