"""benchmarks.fidelity's report: means and seed std per arm, verdicts by the 2-std rule."""

import json

import pytest

from benchmarks import fidelity


def _row(method, seed, acc, arg="0.1"):
  return dict(method=method, seed=seed, arg=arg, test_accuracy=acc, conv_ratio=0.1, params=10)


def test_summary_and_verdicts_follow_the_rule():
  rows = [_row("deeptwist_tucker2", s, a) for s, a in enumerate((0.90, 0.92, 0.94))]
  rows += [_row("tucker2", s, a) for s, a in enumerate((0.80, 0.81, 0.82))]
  s = fidelity.summary(rows)
  assert s["tucker2@0.1"]["n"] == 3
  assert s["tucker2@0.1"]["mean"] == pytest.approx(0.81)
  assert s["deeptwist_tucker2@0.1"]["std"] == pytest.approx(0.02)  # sample std
  (v,) = [v for v in fidelity.verdicts("resnet20", s) if v["b"] == "tucker2@0.1"]
  assert v["difference"] == pytest.approx(0.11)
  assert v["pooled_std"] == pytest.approx(((0.02**2 + 0.01**2) / 2) ** 0.5)
  assert v["verdict"] == "reproduced"
  rows[3:] = [_row("tucker2", s, a) for s, a in enumerate((0.90, 0.92, 0.95))]  # within 2 std
  (v,) = [v for v in fidelity.verdicts("resnet20", fidelity.summary(rows)) if "0.1" in v["a"]]
  assert v["verdict"].startswith("inconclusive (|difference|")
  one = fidelity.summary([_row("deeptwist_tucker2", 0, 0.9), _row("tucker2", 0, 0.5)])
  (v,) = fidelity.verdicts("resnet20", one)
  assert v["verdict"] == "inconclusive (one seed)"


def test_methods_runs_a_subset_and_merges_its_rows(tmp_path, monkeypatch):
  calls = []

  def run_seed(study, seed, root, overrides, arg="", data_dir=""):
    calls.append(overrides)
    return [_row("dense", seed, 0.93, arg), _row("seqkd_mtt", seed, 0.8, arg)]

  path = tmp_path / "rows.json"
  path.write_text(json.dumps([_row("tucker2", 0, 0.9), _row("seqkd_mtt", 0, 0.1)]))
  monkeypatch.setattr(fidelity, "run_seed", run_seed)
  monkeypatch.setattr(fidelity, "_rows_path", lambda study, check: str(path))
  monkeypatch.setattr(fidelity, "plot", lambda *a: None)
  fidelity.main(["--study", "resnet20", "--arg", "0.1", "--seeds", "0", "--methods", "seqkd_mtt"])
  assert calls == [["methods=dense,seqkd_mtt"]]
  rows = json.loads(path.read_text())
  got = {(r["method"], r["test_accuracy"]) for r in rows}
  assert got == {("tucker2", 0.9), ("dense", 0.93), ("seqkd_mtt", 0.8)}  # replaced, kept


def test_missing_runs_only_the_arms_without_a_row(tmp_path, monkeypatch):
  calls = []

  def run_seed(study, seed, root, overrides, arg="", data_dir=""):
    calls.append((seed, overrides))
    return [_row("dense", seed, 0.93, arg), _row("rsdtr", seed, 0.7, arg)]

  path = tmp_path / "rows.json"
  done = [_row("tucker2", 1, 0.9), _row("rsdtr", 2, 0.6), _row("tucker2", 2, 0.9)]
  path.write_text(json.dumps(done + [_row("rsdtr", 1, 0.5, arg="0.2")]))  # another rate
  monkeypatch.setattr(fidelity, "run_seed", run_seed)
  monkeypatch.setattr(fidelity, "_rows_path", lambda study, check: str(path))
  monkeypatch.setattr(fidelity, "plot", lambda *a: None)
  argv = ["--study", "resnet20", "--arg", "0.1", "--seeds", "1,2", "--methods", "tucker2,rsdtr"]
  fidelity.main([*argv, "--missing"])
  assert calls == [(1, ["methods=dense,rsdtr"])]  # seed 2 has both rows: not run
  with pytest.raises(SystemExit):
    fidelity.main(["--study", "resnet20", "--missing"])  # nothing to check against


def test_the_longer_resnet20_runs_get_their_own_verdicts():
  long = "0.1,steps=2400"
  rows = [_row("deeptwist_tucker2", 0, 0.9, long), _row("tucker2", 0, 0.8, long)]
  rows += [_row("deeptwist_tucker2", s, 0.5, "0.1") for s in range(2)]
  rows += [_row("tucker2", s, 0.6 + s / 100, "0.1") for s in range(2)]
  vs = {v["a"]: v for v in fidelity.verdicts("resnet20", fidelity.summary(rows))}
  assert set(vs) == {"deeptwist_tucker2@0.1", f"deeptwist_tucker2@{long}"}
  assert vs[f"deeptwist_tucker2@{long}"]["difference"] == pytest.approx(0.1)
  assert vs[f"deeptwist_tucker2@{long}"]["verdict"] == "inconclusive (one seed)"
  assert vs["deeptwist_tucker2@0.1"]["verdict"].startswith("not reproduced")


def test_the_longer_cnn_runs_get_their_own_verdicts():
  long = fidelity.CNN_LONGER[0]
  rows = [_row("deeptwist_tucker2", 0, 0.9, long), _row("tucker2", 0, 0.8, long)]
  rows += [_row("deeptwist_tucker2", s, 0.5, "") for s in range(2)]
  rows += [_row("tucker2", s, 0.6 + s / 100, "") for s in range(2)]
  vs = {v["a"]: v for v in fidelity.verdicts("cnn", fidelity.summary(rows))}
  assert set(vs) == {"deeptwist_tucker2", f"deeptwist_tucker2@{long}"}
  assert vs[f"deeptwist_tucker2@{long}"]["difference"] == pytest.approx(0.1)
  assert vs["deeptwist_tucker2"]["verdict"].startswith("not reproduced")


def test_the_longer_lenet_runs_get_their_own_verdicts():
  long = "0.05,epochs=16"
  rows = [_row("seqkd_mcp", s, 0.86 + s / 1000, long) for s in range(3)]
  rows += [_row("e2ekd_mcp", s, 0.88 + s / 1000, long) for s in range(3)]
  rows += [_row("seqkd_mcp", s, 0.85 + s / 1000, "0.05") for s in range(3)]
  vs = {(v["a"], v["b"]): v for v in fidelity.verdicts("lenet", fidelity.summary(rows))}
  assert set(vs) == {(f"seqkd_mcp@{long}", f"e2ekd_mcp@{long}")}  # the 4-epoch arm has no pair
  assert vs[f"seqkd_mcp@{long}", f"e2ekd_mcp@{long}"]["difference"] == pytest.approx(-0.02)
  assert vs[f"seqkd_mcp@{long}", f"e2ekd_mcp@{long}"]["verdict"].startswith("not reproduced")
