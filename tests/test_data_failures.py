"""Data failures: the pipeline fails loudly and holds bounded memory; image paths and sizes are checked;
tokenizers never become Hub requests; a resume with other settings is a named error."""

import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib

import grain
import numpy as np
import pytest
import transformers
from PIL import Image, ImageFile

from llava_jax import hub
from llava_jax.data import collate, image, pipeline, preprocess, records, synthetic, text

IMAGE_SIZE = 16
NUM_IMAGE_TOKENS = 2
PROCESSOR = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return synthetic.write_shapes_corpus(str(tmp_path_factory.mktemp("shapes")), num_train=40, num_eval=2,
                                       min_size=8, max_size=12)


def _config(paths, tokenizer, **kw):
  defaults = dict(json_path=paths["stage1"], image_dir=paths["image_dir"], template="plain", max_length=64,
                  batch_size=4, num_image_tokens=NUM_IMAGE_TOKENS, image_token_index=len(tokenizer), seed=1)
  defaults.update(kw)
  return pipeline.DataConfig(**defaults)


def _iterator(cfg, tokenizer, **kw):
  return pipeline.make_iterator(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1, **kw)


@contextlib.contextmanager
def _deadline(seconds):
  """Fails the test instead of hanging when the pipeline spins (the defect these tests reproduce)."""
  def on_alarm(signum, frame):
    raise TimeoutError(f"no answer from the pipeline within {seconds} s")
  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _real_rows(batches):
  return sum(int(b["attention_mask"].any(1).sum()) for b in batches)


# ------------------------------------------------------------------------------ never spin silently


@pytest.mark.parametrize("num_workers", [0, 2])
def test_all_bad_corpus_stops_with_counts_by_reason(corpus, tokenizer, tmp_path, num_workers):
  # Stage 1 with a mistyped image_dir: every sample is skipped, forever (num_epochs=None).
  typo = str(tmp_path / "imagse")
  cfg = _config(corpus, tokenizer, image_dir=typo, shuffle=False, max_consecutive_skips=25,
                num_workers=num_workers)
  it = _iterator(cfg, tokenizer)
  with _deadline(60), pytest.raises(pipeline.DataStallError) as err:
    next(it)
  it.close()
  # A batch closes after max_consecutive_skips skips, so the first one seen holds exactly 25.
  assert err.value.counts == {"missing_image": 25}
  assert err.value.samples_seen == 25
  assert isinstance(err.value, text.DataError)
  message = str(err.value)
  assert "25 samples in a row were skipped (max_consecutive_skips=25)" in message
  assert "missing_image: 25" in message
  assert f"image_dir={typo!r}" in message
  if num_workers == 0:  # no shuffle, one stream: the first records in file order
    first = [r["id"] for r in json.load(open(corpus["stage1"]))[:5]]
    assert err.value.first_ids == {"missing_image": first}
    assert str(first) in message


def test_finite_all_bad_corpus_stops_at_its_end(corpus, tokenizer, tmp_path):
  cfg = _config(corpus, tokenizer, image_dir=str(tmp_path / "nothing"), num_epochs=1)
  it = _iterator(cfg, tokenizer)
  with _deadline(60), pytest.raises(pipeline.DataStallError, match="the data ended and every sample was skipped"):
    list(it)
  assert it.skip_counts == {"missing_image": 40}


def test_seq_len_too_short_for_the_template_names_max_length(corpus, tokenizer):
  # Under vicuna_v1 the system prompt alone is longer than 12 tokens: image tokens are cut
  # (image samples) or no reply survives (text-only samples).
  cfg = _config(corpus, tokenizer, json_path=corpus["stage2"], template="vicuna_v1", max_length=12,
                max_consecutive_skips=30)
  it = _iterator(cfg, tokenizer)
  with _deadline(60), pytest.raises(pipeline.DataStallError) as err:
    next(it)
  assert set(err.value.counts) <= {"image_truncated", "no_targets"}
  assert sum(err.value.counts.values()) == 30
  assert "max_length=12 (the trainer's data.seq_len)" in str(err.value)


def test_mistyped_image_dir_in_stage2_stops_by_fraction(corpus, tokenizer, tmp_path):
  # Text-only rows (1 in 11 of stage2) still pass, so skips never run long in a row; the
  # fraction limit must stop the run.
  stage2 = json.load(open(corpus["stage2"]))
  text_only = sum("image" not in r for r in stage2)
  assert 0 < text_only < len(stage2) // 5
  cfg = _config(corpus, tokenizer, json_path=corpus["stage2"], template="vicuna_v1", max_length=160,
                image_dir=str(tmp_path / "typo"), max_consecutive_skips=1000, max_skip_fraction=0.1,
                min_samples_for_fraction=100)
  it = _iterator(cfg, tokenizer)
  returned = []
  with _deadline(60), pytest.raises(pipeline.DataStallError) as err:
    for _ in range(1000):
      returned.append(next(it))
  assert returned and not any(b["image_mask"].any() for b in returned)  # only text-only rows came through
  skipped = err.value.counts["missing_image"]
  assert set(err.value.counts) == {"missing_image"}
  assert err.value.samples_seen >= 100 and skipped > 0.1 * err.value.samples_seen
  assert err.value.samples_seen - skipped >= _real_rows(returned)  # the last batch read is not returned
  assert f"{skipped / err.value.samples_seen:.1%} of the samples were skipped" in str(err.value)


def test_some_bad_samples_under_the_limits_do_not_stop(corpus, tokenizer, tmp_path):
  # 2 bad of 42 (4.8%) over 3 epochs: 126 samples seen, 6 skipped, never 2 in a row.
  good = json.load(open(corpus["stage1"]))
  bad = [dict(good[0], id=f"bad{i}", image="missing.png") for i in range(2)]
  path = tmp_path / "mixed.json"
  path.write_text(json.dumps(good[:20] + bad[:1] + good[20:] + bad[1:]))
  cfg = _config(corpus, tokenizer, json_path=str(path), num_epochs=3, shuffle=False, max_consecutive_skips=2,
                max_skip_fraction=0.05, min_samples_for_fraction=10)
  it = _iterator(cfg, tokenizer)
  assert _real_rows(list(it)) == 120
  assert it.skip_summary() == {"skipped/missing_image": 6, "skipped/total": 6, "skipped/fraction": 6 / 126,
                               "samples_seen": 126}


def _example(n):
  return {"input_ids": np.arange(1, n + 1, dtype=np.int32), "labels": np.arange(1, n + 1, dtype=np.int32),
          "pixel_values": None, "id": f"good{n}"}


def _skip(k):
  return records.skip_record(text.SkipReason.BAD_CONVERSATION, f"bad{k}", "no reply")


def _batches_of(items, batch_size, max_skips, packing=False, max_length=8):
  collator = collate.Collate(batch_size, max_length, packing, 2, 0, (IMAGE_SIZE, IMAGE_SIZE))
  return collate.BatchIterDataset(lambda w, c: grain.MapDataset.source(items).to_iter_dataset(), collator,
                                  max_skips)


def test_skip_runs_follow_the_stream_order():
  g = _example(3)
  items = [g, _skip(0), _skip(1), _skip(2), _skip(3), g, g]  # batch_size 2, at most 3 skips per batch
  batches = list(_batches_of(items, 2, 3))
  assert [b[records.SKIP_RUNS_KEY] for b in batches] == [records.SkipRuns(1, 0, 3, 3), records.SkipRuns(2, 1, 1, 0)]
  assert [len(b[records.SKIPPED_KEY]) for b in batches] == [3, 1]
  # Packing (max_length 6): two 3-token samples fill the only row; the third waits for the next batch.
  items = [g, _skip(0), g, _skip(1), _skip(2), g]
  batches = list(_batches_of(items, 1, 10, packing=True, max_length=6))
  assert [b[records.SKIP_RUNS_KEY] for b in batches] == [records.SkipRuns(2, 0, 2, 2), records.SkipRuns(1, 0, 0, 0)]


@pytest.mark.parametrize("limit,stops", [(4, True), (5, False)])
def test_consecutive_skips_are_counted_across_batches(limit, stops):
  # 1 sample, 4 skips split over two batches (3 | 1), then 2 samples: 4 skips in a row.
  items = [_example(3), _skip(0), _skip(1), _skip(2), _skip(3), _example(3), _example(3)]
  cfg = pipeline.DataConfig(batch_size=2, max_length=8, num_image_tokens=1, max_consecutive_skips=limit)
  it = pipeline.DataIterator(_batches_of(items, 2, 3), cfg)
  if stops:
    with pytest.raises(pipeline.DataStallError, match="4 samples in a row"):
      list(it)
  else:
    assert _real_rows(list(it)) == 3
    assert it.consecutive_skips == 0 and it.samples_seen == 7


# ------------------------------------------------------------------------------ stop hook and memory


def _all_bad_forever(corpus, tokenizer, tmp_path, **kw):
  """No usable sample and no limit: the pipeline would read skipped samples forever."""
  cfg = _config(corpus, tokenizer, image_dir=str(tmp_path / "typo"), max_consecutive_skips=0,
                max_skip_fraction=1.0, **kw)
  return cfg


def test_stop_flag_from_another_thread_interrupts_the_skip_loop(corpus, tokenizer, tmp_path):
  stop = threading.Event()
  it = _iterator(_all_bad_forever(corpus, tokenizer, tmp_path), tokenizer, should_stop=stop.is_set)
  timer = threading.Timer(0.5, stop.set)
  timer.start()
  started = time.monotonic()
  with _deadline(60), pytest.raises(pipeline.DataInterrupted):
    next(it)
  assert time.monotonic() - started < 30
  assert it.num_skipped > 0
  state = json.loads(json.dumps(it.get_state()))  # consistent, can be saved
  assert state["skip_counts"] == {"missing_image": it.num_skipped}
  assert state["samples_seen"] == it.num_skipped == state["consecutive_skips"]


def test_request_stop_interrupts_too(corpus, tokenizer, tmp_path):
  it = _iterator(_all_bad_forever(corpus, tokenizer, tmp_path), tokenizer)
  threading.Timer(0.3, it.request_stop).start()
  with _deadline(60), pytest.raises(pipeline.DataInterrupted):
    next(it)


def test_memory_stays_bounded_after_thousands_of_skips(corpus, tokenizer, tmp_path):
  cfg = _all_bad_forever(corpus, tokenizer, tmp_path)
  # Below the iterator, each batch holds at most MAX_SKIPS_PER_BATCH skips (before: one endless list).
  ds = pipeline.make_dataset(cfg, tokenizer, PROCESSOR, process_index=0, process_count=1)
  with _deadline(60):
    first = next(iter(ds))
  assert len(first[records.SKIPPED_KEY]) == collate.MAX_SKIPS_PER_BATCH
  assert set(first) == {records.SKIPPED_KEY, records.SKIP_RUNS_KEY}  # no arrays for a batch of skips
  holder = {}
  it = _iterator(cfg, tokenizer, should_stop=lambda: holder["it"].num_skipped >= 3000)
  holder["it"] = it
  with _deadline(90), pytest.raises(pipeline.DataInterrupted):
    next(it)
  assert it.num_skipped >= 3000
  assert {reason: len(ids) for reason, ids in it.skipped_ids.items()} == {"missing_image": it.MAX_IDS_KEPT}
  assert len(json.dumps(it.get_state())) < 4000


# ------------------------------------------------------------------------------ image paths and sizes


def _qa(image_name, sample_id):
  record = {"id": sample_id, "conversations": [{"from": "human", "value": "<image>"},
                                               {"from": "gpt", "value": "A red square."}]}
  if image_name is not None:
    record["image"] = image_name
  return record


def _run(tmp_path, tokenizer, recs, image_dir, **kw):
  path = tmp_path / f"corpus{len(os.listdir(tmp_path))}.json"
  path.write_text(json.dumps(recs))
  cfg = pipeline.DataConfig(json_path=str(path), image_dir=str(image_dir), template="plain", max_length=64,
                            batch_size=2, num_image_tokens=NUM_IMAGE_TOKENS, image_token_index=len(tokenizer),
                            num_epochs=1, shuffle=False, **kw)
  it = _iterator(cfg, tokenizer)
  rows = _real_rows(list(it))
  return rows, dict(it.skip_counts), it


def test_image_paths_must_stay_inside_image_dir(tokenizer, tmp_path):
  image_dir = tmp_path / "images"
  (image_dir / "sub").mkdir(parents=True)
  outside = tmp_path / "secret.png"
  for where in (outside, image_dir / "ok.png", image_dir / "sub" / "inner.png"):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(where)
  os.symlink(outside, image_dir / "link_out.png")
  os.symlink(image_dir / "sub" / "inner.png", image_dir / "link_in.png")
  recs = [_qa("ok.png", "ok"), _qa("../secret.png", "dotdot"), _qa(str(outside), "absolute"),
          _qa("link_out.png", "symlink"), _qa("sub/../../secret.png", "nested"), _qa("link_in.png", "inner"),
          _qa("sub/../ok.png", "ok2")]
  rows, counts, it = _run(tmp_path, tokenizer, recs, image_dir)
  assert rows == 3 and counts == {"image_outside_dir": 4}
  assert sorted(it.skipped_ids["image_outside_dir"]) == ["absolute", "dotdot", "nested", "symlink"]
  rows, counts, _ = _run(tmp_path, tokenizer, recs, image_dir, allow_images_outside_dir=True)
  assert rows == 7 and counts == {}


def test_image_dir_that_is_a_symlink_still_works(tokenizer, tmp_path):
  real = tmp_path / "real_images"
  real.mkdir()
  Image.new("RGB", (8, 8)).save(real / "a.png")
  os.symlink(real, tmp_path / "images")
  rows, counts, _ = _run(tmp_path, tokenizer, [_qa("a.png", "a")], tmp_path / "images")
  assert rows == 1 and counts == {}


def _png_header_only(width, height):
  """A PNG whose header declares width x height (8-bit grey) but that holds one row of data: a few dozen bytes."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
          + chunk(b"IEND", b""))


def test_huge_canvas_in_a_tiny_file_is_skipped_without_decoding(tokenizer, tmp_path, monkeypatch):
  image_dir = tmp_path / "images"
  image_dir.mkdir()
  Image.new("RGB", (8, 8)).save(image_dir / "ok.png")
  (image_dir / "bomb.png").write_bytes(_png_header_only(20000, 20000))  # 4e8 pixels: PIL's own limit refuses it
  (image_dir / "big.png").write_bytes(_png_header_only(9000, 9000))     # 8.1e7: under PIL's, over our 6.4e7
  assert os.path.getsize(image_dir / "bomb.png") < 200
  decoded = []
  original_load = ImageFile.ImageFile.load

  def spy_load(self):
    decoded.append(os.path.basename(getattr(self, "filename", "") or "?"))
    return original_load(self)
  monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
  recs = [_qa("ok.png", "ok"), _qa("bomb.png", "bomb"), _qa("big.png", "big")]
  rows, counts, it = _run(tmp_path, tokenizer, recs, image_dir)
  assert rows == 1
  assert counts == {"image_too_large": 2}
  assert sorted(it.skipped_ids["image_too_large"]) == ["big", "bomb"]
  assert set(decoded) == {"ok.png"}  # the big ones were judged from their header alone
  with pytest.raises(text.DataError, match="decompression-bomb"):
    preprocess.load_image({"image": "bomb.png"}, str(image_dir), "bomb")
  with pytest.raises(text.DataError, match="9000x9000 = 81000000 pixels, over max_image_pixels=64000000"):
    preprocess.load_image({"image": "big.png"}, str(image_dir), "big")
  assert set(decoded) == {"ok.png"}


def test_pixel_budget_counts_the_padded_square(tokenizer, tmp_path):
  image_dir = tmp_path / "images"
  image_dir.mkdir()
  Image.new("RGB", (100, 4), (10, 200, 10)).save(image_dir / "thin.png")  # 400 pixels, 100 x 100 padded
  Image.new("RGB", (40, 30)).save(image_dir / "box.png")                  # 1200 pixels, 40 x 40 padded
  recs = [_qa("thin.png", "thin"), _qa("box.png", "box")]
  # Budget 5000: thin padded (10000) is over, box padded (1600) is under.
  rows, counts, it = _run(tmp_path, tokenizer, recs, image_dir, max_image_pixels=5000)
  assert rows == 1 and counts == {"image_too_large": 1} and it.skipped_ids["image_too_large"] == ["thin"]
  # "crop" does not pad: only the decoded pixels count.
  rows, counts, _ = _run(tmp_path, tokenizer, recs, image_dir, max_image_pixels=5000, aspect_ratio="crop")
  assert rows == 2 and counts == {}
  # Budget 1000: box's 1200 decoded pixels are over too, whatever the aspect ratio.
  rows, counts, _ = _run(tmp_path, tokenizer, recs, image_dir, max_image_pixels=1000, aspect_ratio="crop")
  assert counts == {"image_too_large": 1}
  with pytest.raises(text.DataError, match="100x4 padded to square is 100x100 = 10000 pixels"):
    preprocess.load_image({"image": "thin.png"}, str(image_dir), "thin", max_pixels=5000, padded_to_square=True)


# ------------------------------------------------------------------------------ tokenizer without the Hub


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a network connection was attempted")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tokenizer_path_that_is_not_a_folder_is_a_named_error(no_network, tmp_path, monkeypatch):
  def not_called(*args, **kwargs):
    raise AssertionError("transformers was asked to load a path that is not a folder")
  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", not_called)
  started = time.monotonic()
  for path in ("lmsys/vicuna-7b-v1.5", str(tmp_path / "missing"), ""):
    with pytest.raises(FileNotFoundError, match="is not a local folder") as err:
      hub.load_tokenizer(path)
    assert repr(path) in str(err.value)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="exists but is not a folder"):
    hub.load_tokenizer(str(tmp_path / "tokenizer.json"))
  with pytest.raises(FileNotFoundError, match="'org/repo' is not a local folder"):
    image.ImageProcessorConfig.from_pretrained("org/repo")
  assert time.monotonic() - started < 1.0


def test_tokenizer_from_a_local_folder_loads_local_files_only(no_network, tokenizer_dir, tokenizer, monkeypatch):
  calls = []
  original = transformers.AutoTokenizer.from_pretrained

  def spy(path, **kwargs):
    calls.append(kwargs)
    return original(path, **kwargs)
  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
  loaded = hub.load_tokenizer(tokenizer_dir)
  assert calls == [{"local_files_only": True}]
  assert loaded("a red square").input_ids == tokenizer("a red square").input_ids
  hub.load_tokenizer(tokenizer_dir, allow_hub=True)  # a folder stays local even when the Hub is allowed
  assert calls[-1] == {"local_files_only": True}


# ------------------------------------------------------------------------------ resume with other settings


@pytest.mark.parametrize("keep_layout", [True, False])
def test_resume_with_another_worker_count_is_a_named_error(corpus, tokenizer, keep_layout):
  it = _iterator(_config(corpus, tokenizer), tokenizer)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  if not keep_layout:  # a state saved before the layout was recorded: told from the state's shape
    del state["layout"]
  other = _iterator(_config(corpus, tokenizer, num_workers=2), tokenizer)
  with pytest.raises(pipeline.DataStateMismatchError, match="num_workers=0 when saved, 2 now"):
    other.set_state(state)
  other.close()


def test_resume_with_another_batch_size_is_a_named_error(corpus, tokenizer):
  it = _iterator(_config(corpus, tokenizer), tokenizer)
  next(it)
  state = it.get_state()
  other = _iterator(_config(corpus, tokenizer, batch_size=8), tokenizer)
  with pytest.raises(pipeline.DataStateMismatchError, match="batch_size=4 when saved, 8 now"):
    other.set_state(state)
  same = _iterator(_config(corpus, tokenizer), tokenizer)
  same.set_state(state)
  np.testing.assert_array_equal(next(same)["input_ids"], next(it)["input_ids"])


def test_limits_are_validated():
  for bad in (dict(max_skip_fraction=float("nan")), dict(max_skip_fraction=1.5), dict(max_consecutive_skips=-1),
              dict(min_samples_for_fraction=0), dict(max_image_pixels=0)):
    with pytest.raises(ValueError):
      pipeline.DataConfig(json_path="x.json", **bad)
