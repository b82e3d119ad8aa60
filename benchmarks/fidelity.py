"""The fidelity study: each study config run for several seeds, rows collected, a table, a
plot and the effect sizes of the papers' claims.

  PYTHONPATH=. python -m benchmarks.fidelity --study cnn --seeds 0,1,2
  PYTHONPATH=. python -m benchmarks.fidelity --study cnn --report-only

Each (study, seed) is one CLI run (`python -m train --config train/configs/fidelity_<study>.py
--workdir ROOT/<study>/seed<S> --config.seed=S`), which resumes a workdir left by a
stopped run. As each seed finishes, its rows go to `benchmarks/results/fidelity-<study>.json`
(method, net, seed, params, MACs, conv share, test accuracy, steps, wall time, command,
machine, date), replacing earlier rows of the same (method, seed). `--set KEY=VALUE`
and `--arg ARG` (the config's argument: lenet's rate, `steps=N`) change the runs;
`--methods A,B` runs only those arms of the config (and the teacher), their rows merged
into the file beside the others' (a subset of the same study, not a change), and with
`--missing` only those of them that have no row yet for the seed and arg (a study carried
on on a machine without the earlier workdirs); `--check`
(a check of the script at a tiny length) writes to `fidelity-<study>-check.json` instead.

The report: mean and sample std over seeds per method, and for each pair of arms that a
claim compares (`CLAIMS`), the difference of the means against the pooled seed std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NETS = {
  "cnn": "cnn (Fashion-MNIST, teachers/cnn_fmnist.npz)",
  "lenet": "lenet5 (Fashion-MNIST, teachers/lenet5_fmnist.npz)",
  "resnet20": "resnet20 (Fashion-MNIST 32x32, teachers/resnet20_fmnist.npz)",
}

RESNET20_ARGS = ("0.1", "0.2")
# The same study 4x longer (`--arg 0.1,steps=2400`): does length close the gap to the
# teacher? Its rows sit beside the others, under their own arg; the plot leaves them out.
RESNET20_LONGER = ("0.1,steps=2400",)
CNN_LONGER = ("steps=2560",)  # the CNN study 4x longer (`--arg steps=2560`)
# LeNet-5's leading arms 4x longer (16 epochs; `--arg 0.05,epochs=16`, `0.2,epochs=16`), and
# at 0.05 8x (32 epochs: Seq-KD mCP and CP, E2E-KD mCP); 64 epochs: E2E-KD mCP alone
LENET_LONGER = ("0.05,epochs=16", "0.2,epochs=16", "0.05,epochs=32")

# (claim, arm that should win, arm it is compared with)
CLAIMS = {
  "resnet20": [
    (
      f"DeepTwist beats decomposed training at equal ranks (Tucker-2, ResNet-20, rate {r})",
      f"deeptwist_tucker2@{r}",
      f"tucker2@{r}",
    )
    for r in (*RESNET20_ARGS, *RESNET20_LONGER)
  ]
  + [
    (f"TNN: Seq-KD beats {name} (mTT, ResNet-20, rate {r})", f"seqkd_mtt@{r}", f"{arm}_mtt@{r}")
    for r in (*RESNET20_ARGS, *RESNET20_LONGER)
    for arm, name in (("e2ekd", "E2E-KD"), ("scratch", "training the same TNN from scratch"))
  ],
  "cnn": [
    (
      "DeepTwist beats decomposed training at equal ranks (Tucker-2)",
      "deeptwist_tucker2",
      "tucker2",
    ),
    ("DeepTwist beats decomposed training at equal ranks (lowered SVD)", "deeptwist_svd", "svd"),
  ]
  + [
    (
      f"DeepTwist beats decomposed training at equal ranks ({d}, {r})",
      f"deeptwist_{s}@{r}",
      f"{s}@{r}",
    )
    for r in CNN_LONGER
    for s, d in (("tucker2", "Tucker-2"), ("svd", "lowered SVD"))
  ],
  "lenet": [
    (
      f"TNN: the m-form beats the plain form at rate {r} ({m} vs {p})",
      f"seqkd_{m}@{r}",
      f"seqkd_{p}@{r}",
    )
    for r in ("0.05", "0.1", "0.2", *LENET_LONGER)  # the longer runs have mCP and CP only
    for m, p in (("mcp", "cp"), ("mtk", "tucker2"), ("mtt", "tt"))
  ]
  + [
    (f"TNN: Seq-KD beats E2E-KD at the lowest rate (mcp{w})", f"seqkd_mcp@{r}", f"e2ekd_mcp@{r}")
    for r, w in (("0.05", ""), (LENET_LONGER[0], ", 16 epochs"), (LENET_LONGER[2], ", 32 epochs"))
  ]
  + [
    (
      "TNN: Seq-KD beats training the same TNN from scratch (mcp)",
      "seqkd_mcp@0.05",
      "scratch_mcp@0.05",
    ),
  ],
}


def _rows_path(study: str, check: bool) -> str:
  return os.path.join(
    REPO, "benchmarks", "results", f"fidelity-{study}{'-check' if check else ''}.json"
  )


def _load(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def run_seed(
  study: str, seed: int, root: str, overrides: list[str], arg: str = "", data_dir: str = ""
) -> list:
  workdir = os.path.join(root, study + (f"-{arg}" if arg else ""), f"seed{seed}")
  cmd = [
    sys.executable, "-m", "train",
    "--config", f"train/configs/fidelity_{study}.py" + (f":{arg}" if arg else ""),
    "--workdir", workdir,
    f"--config.seed={seed}",
    *([f"--config.data_dir={data_dir}"] if data_dir else []),
    *(f"--config.{o}" for o in overrides),
  ]  # fmt: skip
  t0 = time.time()
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(cmd, cwd=REPO, env=env)
  if proc.returncode:
    raise SystemExit(f"fidelity: {' '.join(cmd)} failed with exit code {proc.returncode}")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  shown = " ".join(c if c != sys.executable else "python" for c in cmd)
  rows = []
  for r in results:
    sec = config.get(r["method"], {})
    rows.append(
      dict(
        study=study,
        net=NETS.get(study, study),
        method=r["method"],
        kind=r.get("kind", r["method"]),
        decomposition=r.get("method_detail"),
        seed=seed,
        arg=arg,
        params=r["params"],
        macs=r["macs"],
        conv_ratio=r["conv_ratio"],
        test_accuracy=r["test_accuracy"],
        steps=r.get("steps", sec.get("steps")),
        wall_s=r["wall_s"],
        # the CPU convolutions (`config.cpu_conv`); rows without it ran XLA's
        cpu_conv=config.get("cpu_conv", "xla"),
        extra={k: v for k, v in r.items() if k.startswith(("accuracy_", "sd"))},
        command=shown,
        machine=common.device_name(),
        date=time.strftime("%F", time.gmtime()),
      )
    )
  print(f"fidelity: {study} seed {seed} done in {time.time() - t0:.0f} s", flush=True)
  return rows


def summary(rows: list) -> dict:
  by = {}
  for r in rows:
    key = r["method"] + (f"@{r['arg']}" if r.get("arg") else "")
    by.setdefault(key, []).append(r)
  out = {}
  for m, rs in by.items():
    acc = [r["test_accuracy"] for r in rs]
    out[m] = dict(
      n=len(acc),
      mean=statistics.fmean(acc),
      std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
      conv_ratio=statistics.fmean(r["conv_ratio"] for r in rs),
      params=rs[0]["params"],
    )
  return out


def verdicts(study: str, s: dict) -> list:
  out = []
  for claim, a, b in CLAIMS.get(study, []):
    if a not in s or b not in s:
      continue
    d = s[a]["mean"] - s[b]["mean"]
    pooled = ((s[a]["std"] ** 2 + s[b]["std"] ** 2) / 2) ** 0.5
    if min(s[a]["n"], s[b]["n"]) < 2:
      word = "inconclusive (one seed)"
    elif abs(d) <= 2 * pooled:
      word = "inconclusive (|difference| within 2 seed std)"
    else:
      word = "reproduced" if d > 0 else "not reproduced (the other arm is better)"
    out.append(dict(claim=claim, a=a, b=b, difference=d, pooled_std=pooled, verdict=word))
  return out


def plot(study: str, s: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4))
  teacher = next((v for k, v in s.items() if k.split("@")[0] == "dense"), None)
  # other lengths (`steps=`, `epochs=` in the arg): the table, not the plot
  longer = ("steps=", "epochs=")
  arms = [m for m in sorted(s) if m.split("@")[0] != "dense" and not any(k in m for k in longer)]
  colours = plt.get_cmap("tab20")  # 20 distinct colours, a marker cycle beside them
  for i, m in enumerate(arms):
    v = s[m]
    ax.errorbar(
      100 * v["conv_ratio"],
      100 * v["mean"],
      yerr=100 * v["std"],
      fmt="os^vD<>"[i % 7],
      color=colours(i % 20),
      capsize=3,
      label=m,
    )
  if teacher:
    ax.axhline(100 * teacher["mean"], color="k", lw=1, ls="--", label="teacher (dense)")
  ax.set_xlabel("conv parameters kept (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"fidelity study: {study}")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the points
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--study", required=True, choices=sorted(NETS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--root", default=os.path.join(REPO, "results", "fidelity"))
  p.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE")
  p.add_argument("--arg", default="", help="the config's ARG (lenet: the rate; steps=N)")
  p.add_argument("--check", action="store_true", help="rows to fidelity-<study>-check.json")
  p.add_argument("--data-dir", default="", help="the data set's folder (config.data_dir)")
  p.add_argument("--methods", default="", help="only these arms (comma list; dense is added)")
  p.add_argument(
    "--missing",
    action="store_true",
    help="with --methods: skip the arms that already have a row for this seed and arg",
  )
  p.add_argument("--report-only", action="store_true")
  a = p.parse_args(argv)
  if a.missing and not a.methods:
    p.error("--missing goes with --methods (the arms to check)")
  check = a.check or bool(a.set)
  path = _rows_path(a.study, check)
  rows = _load(path)
  if not a.report_only:
    for seed in (int(x) for x in a.seeds.split(",")):
      only = []
      if a.methods:
        arms = [m for m in a.methods.split(",") if m and m != "dense"]
        if a.missing:
          done = {r["method"] for r in rows if r["seed"] == seed and r.get("arg", "") == a.arg}
          arms = [m for m in arms if m not in done]
          if not arms:
            print(f"fidelity: {a.study} {a.arg} seed {seed}: every arm has its row", flush=True)
            continue
        only = [f"methods={','.join(['dense', *arms])}"]
      new = run_seed(a.study, seed, a.root, a.set + only, a.arg, a.data_dir)
      keys = {(r["method"], r["seed"], r.get("arg", "")) for r in new}
      rows = [r for r in rows if (r["method"], r["seed"], r.get("arg", "")) not in keys] + new
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(rows, f, indent=1)
  s = summary(rows)
  print(
    f"\n{'method':20s} {'seeds':>5s} {'conv %':>7s} {'params':>8s} {'test acc (mean +- std)':>24s}"
  )
  for m, v in s.items():
    print(
      f"{m:20s} {v['n']:5d} {100 * v['conv_ratio']:6.1f}% {v['params']:8d} "
      f"{100 * v['mean']:14.2f} +- {100 * v['std']:.2f}"
    )
  for v in verdicts(a.study, s):
    print(
      f"{v['claim']}: {100 * v['difference']:+.2f} points "
      f"(pooled std {100 * v['pooled_std']:.2f}): {v['verdict']}"
    )
  plot(a.study, s, path.replace(".json", ".png"))


if __name__ == "__main__":
  main()
