"""The grain pipeline: batch contract, exact resume, host sharding, bad samples."""

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import ordering, pipeline, synthetic, text

IMAGE_SIZE = 32
NUM_IMAGE_TOKENS = 4
PROCESSOR = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return synthetic.write_shapes_corpus(str(tmp_path_factory.mktemp("shapes")), num_train=100, num_eval=4)


def _config(paths, tokenizer, **kw):
  defaults = dict(json_path=paths["stage2"], image_dir=paths["image_dir"], max_length=160, batch_size=4,
                  num_image_tokens=NUM_IMAGE_TOKENS, image_token_index=len(tokenizer), seed=3)
  defaults.update(kw)
  return pipeline.DataConfig(**defaults)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def _rows(batches):
  """(token ids without padding) per real row, in order."""
  out = []
  for batch in batches:
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
      if mask.any():
        out.append(tuple(ids[mask == 1].tolist()))
  return out


def test_batch_contract(corpus, tokenizer):
  cfg = _config(corpus, tokenizer, num_epochs=1)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  batches = list(it)
  assert it.num_skipped == 0
  n_records = len(json.load(open(corpus["stage2"])))
  assert len(_rows(batches)) == n_records
  image_token = cfg.image_token_index
  saw_text_only = False
  for batch in batches:
    assert batch["input_ids"].shape == (4, 160) and batch["input_ids"].dtype == np.int32
    assert batch["labels"].shape == (4, 160) and batch["labels"].dtype == np.int32
    assert batch["attention_mask"].dtype == np.int32
    assert batch["pixel_values"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["pixel_values"].dtype == np.float32
    assert batch["image_mask"].shape == (4,) and batch["image_mask"].dtype == bool
    for b in range(4):
      mask = batch["attention_mask"][b]
      n = int(mask.sum())
      assert (mask[:n] == 1).all() and (mask[n:] == 0).all()  # right padding
      assert (batch["input_ids"][b, n:] == tokenizer.unk_token_id).all()
      assert (batch["labels"][b, n:] == text.IGNORE_INDEX).all()
      n_image = int((batch["input_ids"][b] == image_token).sum())
      if batch["image_mask"][b]:
        assert n_image == NUM_IMAGE_TOKENS
        assert np.abs(batch["pixel_values"][b]).sum() > 0
      else:
        assert n_image == 0 and not batch["pixel_values"][b].any()
        saw_text_only |= n > 0
      assert (batch["labels"][b][batch["input_ids"][b] == image_token] == text.IGNORE_INDEX).all()
  assert saw_text_only


def test_rows_equal_preprocess_conversation(corpus, tokenizer):
  cfg = _config(corpus, tokenizer, num_epochs=1, shuffle=False)
  batches = list(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1))
  records = json.load(open(corpus["stage2"]))
  for i, record in enumerate(records[:8]):
    batch, row = batches[i // 4], i % 4
    ids, labels = text.preprocess_conversation(
        record["conversations"], tokenizer, cfg.template, NUM_IMAGE_TOKENS, cfg.max_length,
        cfg.image_token_index, has_image="image" in record)
    np.testing.assert_array_equal(batch["input_ids"][row, :len(ids)], ids)
    np.testing.assert_array_equal(batch["labels"][row, :len(ids)], labels)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_same_batches(corpus, tokenizer, packing):
  cfg = _config(corpus, tokenizer, packing=packing, max_length=320)
  reference = _take(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1), 32)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  first = _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  _take(it, 3)  # running on must not matter
  it.close()
  resumed = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  resumed.set_state(state)
  _assert_batches_equal(first + _take(resumed, 27), reference)  # crosses an epoch boundary


def test_state_round_trips_through_grain_checkpoint_handler(corpus, tokenizer, tmp_path):
  import grain  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  cfg = _config(corpus, tokenizer)
  reference = _take(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1), 6)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  first = _take(it, 2)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), it)
  resumed = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), resumed)
  _assert_batches_equal(first + _take(resumed, 4), reference)


def test_resume_with_worker_processes(corpus, tokenizer):
  # Workers take whole batches (blocks) of the order, so with no skipped sample the
  # batches do not depend on the number of workers either.
  reference = _take(pipeline.make_iterator(_config(corpus, tokenizer), tokenizer, PROCESSOR,
                                           process_index=0, process_count=1), 12)
  cfg = _config(corpus, tokenizer, num_workers=2)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  first = _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  resumed.set_state(state)
  rest = _take(resumed, 7)
  resumed.close()
  _assert_batches_equal(first + rest, reference)


@pytest.mark.parametrize("group", [False, True])
def test_two_hosts_see_disjoint_samples_covering_the_epoch(corpus, tokenizer, group):
  cfg = _config(corpus, tokenizer, num_epochs=1, group_by_modality_length=group)
  one_host = collections.Counter(_rows(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0,
                                                              process_count=1)))
  hosts = [collections.Counter(_rows(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=h,
                                                            process_count=2))) for h in range(2)]
  assert sum(hosts[0].values()) > 0 and sum(hosts[1].values()) > 0
  # As multisets (a few texts repeat in the corpus): each sample on exactly one host.
  assert hosts[0] + hosts[1] == one_host
  assert sum(one_host.values()) == len(json.load(open(corpus["stage2"])))


def test_epochs_are_reshuffled(corpus, tokenizer):
  cfg = _config(corpus, tokenizer, num_epochs=2)
  rows = _rows(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1))
  half = len(rows) // 2
  assert collections.Counter(rows[:half]) == collections.Counter(rows[half:])
  assert rows[:half] != rows[half:]


def test_group_by_modality_length_batches_one_modality(corpus, tokenizer):
  cfg = _config(corpus, tokenizer, num_epochs=1, group_by_modality_length=True, batch_size=2)
  batches = list(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1))
  real = [b["image_mask"][b["attention_mask"].any(1)] for b in batches]
  mixed = [m for m in real if m.any() and not m.all()]
  assert len(mixed) <= 1  # only the leftover megabatch may mix


def test_modality_grouped_order_is_llava_like():
  rng = np.random.default_rng(0)
  lengths = np.array([5, -3, 7, 2, -9, 4, 4, -1, 8, 3, -2, 6, 1, -4], np.int64)
  order = ordering.modality_length_grouped_indices(lengths, batch_size=2, world_size=2, rng=rng)
  assert sorted(order) == list(range(len(lengths)))
  megabatches = [order[i:i + 4] for i in range(0, len(order), 4)]
  for mega in megabatches[:-1]:
    assert len({bool(lengths[i] > 0) for i in mega}) == 1
    # split_to_even_chunks: the longest two go to different chunks of 2.
    top2 = sorted(mega, key=lambda i: -abs(lengths[i]))[:2]
    assert (mega.index(top2[0]) < 2) != (mega.index(top2[1]) < 2)


def test_packing_contract(corpus, tokenizer):
  cfg = _config(corpus, tokenizer, num_epochs=1, packing=True, max_length=400, max_images_per_row=3)
  batches = list(pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1))
  unpacked = _rows(list(pipeline.make_iterator(_config(corpus, tokenizer, num_epochs=1), tokenizer,
                                               PROCESSOR, process_index=0, process_count=1)))
  segments = []
  image_token = cfg.image_token_index
  for batch in batches:
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image_mask"].shape == (4, 3)
    for b in range(4):
      seg, pos = batch["segment_ids"][b], batch["positions"][b]
      assert ((seg > 0) == (batch["attention_mask"][b] == 1)).all()
      n_images = 0
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        assert batch["labels"][b, where[0]] == text.IGNORE_INDEX
        ids = batch["input_ids"][b, where]
        segments.append(tuple(ids.tolist()))
        n_images += int((ids == image_token).sum()) // NUM_IMAGE_TOKENS
      assert batch["image_mask"][b].sum() == n_images
      assert batch["image_mask"][b, :n_images].all()
      assert not batch["pixel_values"][b, n_images:].any()
  assert segments == unpacked  # same samples, same order
  assert sum(int(b["segment_ids"].max(1).sum()) for b in batches) > len(batches) * 4  # really packed


def test_jsonl_equals_json(corpus, tokenizer, tmp_path):
  records = json.load(open(corpus["stage2"]))
  path = tmp_path / "stage2.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
  a = list(pipeline.make_iterator(_config(corpus, tokenizer, num_epochs=1), tokenizer, PROCESSOR,
                                  process_index=0, process_count=1))
  b = list(pipeline.make_iterator(_config(corpus, tokenizer, num_epochs=1, json_path=str(path)), tokenizer,
                                  PROCESSOR, process_index=0, process_count=1))
  _assert_batches_equal(a, b)


# ------------------------------------------------------------------------------ bad samples


def _h(v):
  return {"from": "human", "value": v}


def _g(v):
  return {"from": "gpt", "value": v}


@pytest.fixture(scope="module")
def bad_corpus(corpus, tmp_path_factory):
  """100 JSONL lines, 10 of them bad in known ways; returns (path, expected counts)."""
  root = tmp_path_factory.mktemp("bad")
  image_dir = corpus["image_dir"]
  good = json.load(open(corpus["stage2"]))[:90]
  png = open(os.path.join(image_dir, good[0].get("image") or "train_000000.png"), "rb").read()
  (root / "truncated.png").write_bytes(png[:len(png) // 2])
  (root / "not_an_image.png").write_text("hello")
  (root / "empty.png").write_bytes(b"")
  Image.new("RGB", (8, 8)).save(root / "ok.png")
  for name in ("truncated.png", "not_an_image.png", "empty.png", "ok.png"):
    os.replace(root / name, os.path.join(image_dir, "bad_" + name))
  q = [_h("<image>\nWhat colour is the shape?"), _g("Red.")]
  bad = [
      ("missing_image", {"id": "b0", "image": "nope.png", "conversations": q}),
      ("unreadable_image", {"id": "b1", "image": "bad_truncated.png", "conversations": q}),
      ("unreadable_image", {"id": "b2", "image": "bad_not_an_image.png", "conversations": q}),
      ("empty_image", {"id": "b3", "image": "bad_empty.png", "conversations": q}),
      ("malformed_record", '{"id": "b4", "conversations": [oops'),
      ("bad_conversation", {"id": "b5", "image": "bad_ok.png",
                            "conversations": [_h("<image>\nQ?"), _h("Q again?")]}),
      ("bad_conversation", {"id": "b6", "image": "bad_ok.png", "conversations": [_h("<image>\nQ?")]}),
      ("image_tag_without_image", {"id": "b7", "conversations": q}),
      ("image_without_tag", {"id": "b8", "image": "bad_ok.png", "conversations": [_h("Q?"), _g("A.")]}),
      ("tokenization_mismatch", {"id": "b9", "image": "bad_ok.png",
                                 "conversations": [_h("<image>\nSay ASSISTANT: hi"), _g("Hi.")]}),
  ]
  lines = [json.dumps(r) for r in good]
  for k, (_, record) in enumerate(bad):
    lines.insert(9 * k + 4, record if isinstance(record, str) else json.dumps(record))
  path = root / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path), collections.Counter(reason for reason, _ in bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(corpus, tokenizer, bad_corpus, num_workers):
  path, expected = bad_corpus
  cfg = _config(corpus, tokenizer, json_path=path, num_epochs=1, num_workers=num_workers)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  rows = _rows(list(it))
  it.close()
  assert len(rows) == 90
  assert dict(it.skip_counts) == dict(expected)
  ids = {reason: sorted(v) for reason, v in it.skipped_ids.items()}
  assert ids["unreadable_image"] == ["b1", "b2"] and ids["tokenization_mismatch"] == ["b9"]
  assert ids["bad_conversation"] == ["b5", "b6"] and ids["missing_image"] == ["b0"]
  # The malformed line has no readable id: it is named by file and line.
  assert ids["malformed_record"] == [f"{path}:41"]
  it.log_summary()


def test_skip_counts_survive_resume(corpus, tokenizer, bad_corpus):
  path, expected = bad_corpus
  cfg = _config(corpus, tokenizer, json_path=path, num_epochs=1, shuffle=False)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  first = _take(it, 10)
  state = json.loads(json.dumps(it.get_state()))
  resumed = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(_rows(first + rest)) == 90
  assert dict(resumed.skip_counts) == dict(expected)


def test_no_empty_batch_when_only_bad_samples_are_left(corpus, tokenizer, tmp_path):
  records = json.load(open(corpus["stage2"]))[:4]
  records += [{"id": "x1", "image": "nope.png", "conversations": records[0]["conversations"]},
              {"id": "x2", "conversations": [_h("Q?")]}]
  path = tmp_path / "tail.json"
  path.write_text(json.dumps(records))
  cfg = _config(corpus, tokenizer, json_path=str(path), num_epochs=1, shuffle=False)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 1 and batches[0]["attention_mask"].any(1).all()
  assert dict(it.skip_counts) == {"missing_image": 1, "bad_conversation": 1}


def test_config_is_checked():
  with pytest.raises(ValueError):
    pipeline.DataConfig(json_path="x.json", num_image_tokens=600, max_length=512)
  with pytest.raises(ValueError):
    pipeline.DataConfig(json_path="x.json", aspect_ratio="stretch")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_strict_raises_at_the_first_bad_sample(corpus, tokenizer, bad_corpus, num_workers):
  path, _ = bad_corpus
  cfg = _config(corpus, tokenizer, json_path=path, num_epochs=1, shuffle=False, strict=True,
                num_workers=num_workers)
  it = pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  with pytest.raises(text.DataError) as err:
    list(it)
  assert err.value.sample_id == "b0" and err.value.reason == text.SkipReason.MISSING_IMAGE
  assert "nope.png" in str(err.value)
  it.close()
