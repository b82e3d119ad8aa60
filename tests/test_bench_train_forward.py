"""benchmarks/train_forward.py: an arm built as a run builds it, both paths timed."""

import json

import jax
import pytest

from benchmarks import train_forward

CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_train import _config

def get_config(arg=None):
  c = _config(("dense", "finetune"), steps=0)
  c.finetune.steps = 10
  return c
"""


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


def test_the_row_names_both_paths_and_the_choice(tmp_path):
  from tests.test_train import REPO

  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG.format(repo=REPO))
  out = tmp_path / "rows.jsonl"
  argv = ["--config", str(cfg), "--method", "finetune", "--steps", "2", "--choose-steps", "1"]
  row = train_forward.main([*argv, "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(row))
  assert row["kind"] == "finetune" and row["decomposition"] == "tr" and row["batch"] == 32
  assert sum(row["layers_by_forward"].values()) == 5  # the CNN's five TR convs
  ratio = row["images_per_s_auto"] / row["images_per_s_factorized"]
  assert row["auto_vs_factorized"] == pytest.approx(ratio)
  assert set(row["times"]) == {"factorized", "auto"} and row["times"]["auto"]["repeats"] == 2
  with pytest.raises(SystemExit):  # dense is not an arm with factorized layers
    train_forward.main(["--config", str(cfg), "--method", "dense"])
