"""Data failures seen through the trainer: a mistyped image_dir stops the run with a summary by reason
(exit 2, no hang, no training on the text-only rows alone), and skips reach metrics.jsonl."""

import json
import os

import pytest

import train_util
from llava_jax.data import build_tokenizer, write_shapes_corpus
from llava_jax.train import cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  paths = write_shapes_corpus(str(root / "shapes"), num_train=40, num_eval=2)
  build_tokenizer(str(root / "tok"))
  return paths, str(root / "tok")


def _args(workdir, stage, json_path, image_dir, tokenizer, *extra):
  return ["--config", f"{train_util.TINY}:{stage}", "--workdir", workdir, "--config.total_steps=2",
          "--config.data.kind=llava", f"--config.data.json_path={json_path}", f"--config.data.image_dir={image_dir}",
          f"--config.data.tokenizer={tokenizer}", "--config.data.seq_len=128", "--config.model.text.vocab_size=1024",
          "--config.model.image_token_index=1024", "--config.log.progress=False", "--config.log.tensorboard=False",
          "--config.data.min_samples_for_fraction=16", *extra]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_mistyped_image_dir_stops_the_run_with_counts_by_reason(corpus, tmp_path, capsys, stage):
  paths, tokenizer = corpus
  code = cli.main(_args(str(tmp_path / "run"), stage, paths[stage], str(tmp_path / "TYPO"), tokenizer))
  err = capsys.readouterr().err
  assert code == 2, err
  assert "missing_image" in err and "image_dir=" in err and "TYPO" in err
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")  # nothing trained on what was left


def test_skips_under_the_limits_are_counted_in_the_metrics(corpus, tmp_path):
  paths, tokenizer = corpus
  with open(paths["stage2"]) as f:
    records = json.load(f)
  records[0]["image"] = "does-not-exist.png"  # one bad sample among 40: under the 10% limit
  bad = tmp_path / "stage2.json"
  bad.write_text(json.dumps(records))
  workdir = str(tmp_path / "run")
  assert cli.main(_args(workdir, "stage2", str(bad), paths["image_dir"], tokenizer, "--config.batch_size=8",
                        "--config.total_steps=5", "--config.log.every_steps=1",
                        "--config.data.shuffle=False")) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert records[-1].get("skipped/missing_image") == 1 and records[-1].get("skipped/total") == 1
