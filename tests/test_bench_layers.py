"""The layers benchmark's timing and its `auto` arm (wiring, not speed)."""

import json

import jax

from benchmarks import common
from benchmarks import layers as bench_layers


def test_timeit_interleaved_goes_round_robin():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
  t = common.timeit_interleaved(fns, repeats=4, warmup=2)
  # each compiled and warmed up in turn, then one call of each per round
  assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
  assert calls[6:] == ["a", "b", "c"] * 4
  assert set(t) == {"a", "b", "c"}
  for v in t.values():
    assert v["repeats"] == 4 and v["interleaved"] == 3
    assert 0 <= v["min_ms"] <= v["median_ms"]


def test_step_rows_with_an_auto_arm(tmp_path):
  out = tmp_path / "rows.jsonl"
  with jax.enable_x64(False):  # the benchmark runs as users run it (the suite enables x64)
    bench_layers.main(
      [
        "--only", "step", "--batch", "2", "--steps", "1", "--choose-steps", "1",
        "--kinds", "tr", "--forward", "factorized,auto", "--peer", "none",
        "--dtype", "float32", "--host-memory", "default", "--cpu-conv", "xla",
        "--out", str(out),
      ]
    )  # fmt: skip
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["kind"], r["forward"]) for r in rows] == [
    ("dense", None),
    ("tr", "factorized"),
    ("tr", "auto"),
  ]
  fac, auto = rows[1], rows[2]
  assert sum(auto["layers_by_forward"].values()) == 30  # ResNet-32's residual 3x3 convs
  assert auto["params"] == fac["params"]  # the same layers, only their paths differ
  assert auto["macs_per_image"] == fac["macs_per_image"]
  for r in rows:
    assert r["vs_dense"] == r["images_per_s"] / rows[0]["images_per_s"]
    assert r["interleaved"] == 3
    assert r["cpu_conv"] == "xla"
