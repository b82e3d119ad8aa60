"""Timing helpers: compile apart, block_until_ready, median of many runs, device named."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return (
      f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}{_cpu_model()})"
    )
  return f"{d.platform} ({d.device_kind})"


def _cpu_model() -> str:
  """`, <model name>, avx512` from /proc/cpuinfo where it exists: machines that both say
  `cpu (2 cores, x86_64)` differ in speed by 2-3x, and their rows must be told apart."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return ""
  fields = dict(ln.split(":", 1) for ln in reversed(info.splitlines()) if ":" in ln)
  fields = {k.strip(): v.strip() for k, v in fields.items()}  # the first CPU's values
  model, flags = fields.get("model name", ""), fields.get("flags", "").split()
  tags = ([model] if model else []) + (["avx512"] if "avx512f" in flags else [])
  return "".join(f", {t}" for t in tags)


def timeit(fn, *, repeats: int, warmup: int = 1) -> dict:
  """Runs `fn()` (which must block until its result is ready) and returns timings in ms.

  The first call is timed apart as `first_ms` (for a jitted function: compile + run).
  """
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    fn()
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    runs.append(time.perf_counter() - t0)
  return {
    "first_ms": 1e3 * first,
    "median_ms": 1e3 * statistics.median(runs),
    "min_ms": 1e3 * min(runs),
    "repeats": repeats,
  }


def timeit_interleaved(fns: dict, *, repeats: int, warmup: int = 1) -> dict:
  """`timeit` for several functions at once, `{name: timings}`: each is called once (timed
  apart as `first_ms`) and warmed up, then the timed calls go round-robin, one call of
  each per round, so that a machine whose speed drifts during the run (a shared VM)
  slows every function alike and their ratios hold."""
  first = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
    for _ in range(warmup - 1):
      fn()
  runs = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      runs[name].append(time.perf_counter() - t0)
  return {
    name: {
      "first_ms": 1e3 * first[name],
      "median_ms": 1e3 * statistics.median(runs[name]),
      "min_ms": 1e3 * min(runs[name]),
      "repeats": repeats,
      "interleaved": len(fns),
    }
    for name in fns
  }


def write_jsonl(path: str, rows: list) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
