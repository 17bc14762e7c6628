"""TFDS builders: JSON + images -> ArrayRecord -> the same batches as from JSON."""

import json
import os
import shutil

import numpy as np
import pytest
import transformers

from llava_jax.data import pipeline, synthetic
from llava_jax.data import records as records_lib

tfds = pytest.importorskip("tensorflow_datasets")
from llava_jax.data import tfds_llava  # noqa: E402  pylint: disable=g-import-not-at-top

PROCESSOR = {"size": 32, "crop_size": 32}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  paths = synthetic.write_shapes_corpus(str(root / "shapes"), num_train=30, num_eval=2)
  manual = root / "manual"
  shutil.copytree(paths["image_dir"], manual / "images")
  records = json.load(open(paths["stage1"]))
  records[3]["image"] = "does_not_exist.png"
  (manual / "images" / "empty.png").write_bytes(b"")
  records[7]["image"] = "empty.png"
  (manual / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
  data_dir = str(root / "data")
  builder = tfds_llava.LlavaPretrain(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  tok = transformers.AutoTokenizer.from_pretrained(synthetic.build_tokenizer(str(root / "tok")))
  json_path = str(root / "stage1.json")
  with open(json_path, "w") as f:
    json.dump(records, f)
  return data_dir, json_path, str(manual / "images"), tok, records


def _config(tok, **kw):
  return pipeline.DataConfig(template="plain", max_length=64, batch_size=4, num_image_tokens=3,
                             image_token_index=len(tok), num_epochs=1, **kw)


def test_records_round_trip(built):
  data_dir, _, _, _, records = built
  source = tfds_llava.RecordSource("llava_pretrain", data_dir=data_dir)
  assert len(source) == len(records)
  for i in (0, 5, 7, len(records) - 1):
    got = source[i]
    assert got["id"] == records[i]["id"] and got["conversations"] == records[i]["conversations"]
    with open(os.path.join(os.path.dirname(data_dir), "manual", "images", records[i]["image"]), "rb") as f:
      assert got["image_bytes"] == f.read()
  assert source[3]["image_bytes"] is None and source[3]["image"] == "does_not_exist.png"
  np.testing.assert_array_equal(source.modality_lengths(),
                                [records_lib.record_modality_length(r) for r in records])


def test_tfds_batches_equal_json_batches(built):
  data_dir, json_path, image_dir, tok, _ = built
  from_json = pipeline.make_iterator(_config(tok, json_path=json_path, image_dir=image_dir), tok, PROCESSOR,
                                     process_index=0, process_count=1)
  from_tfds = pipeline.make_iterator(_config(tok, tfds_name="llava_pretrain", tfds_data_dir=data_dir), tok,
                                     PROCESSOR, process_index=0, process_count=1)
  a, b = list(from_json), list(from_tfds)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  assert dict(from_tfds.skip_counts) == dict(from_json.skip_counts) == {"missing_image": 1, "empty_image": 1}
