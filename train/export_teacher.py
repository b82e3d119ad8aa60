"""Exports the dense phase of a finished run as a teacher file (`train.teacher`'s format).

  python -m train.export_teacher --workdir DIR --out teachers/NAME.npz --command "..." [--note TEXT]

A command-line tool: nothing in the library imports it (it imports `train.run`, which
imports `train.teacher`; keeping it apart keeps the import graph acyclic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
from flax import nnx

from train import checkpoint as ckpt_lib
from train import steps as steps_lib
from train.teacher import SLICE, _machine, save


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--command", required=True, help="the training command, for the record")
  p.add_argument("--note", default="")
  a = p.parse_args(argv)
  import ml_collections

  from train import data as data_lib
  from train import run as run_lib
  from train import trainer

  with open(os.path.join(a.workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ds = data_lib.load(config.dataset, config.get("data_dir") or None)
  model = run_lib.build_model(config, ds)
  tx, _ = trainer.make_optimizer(dict(config.dense.opt), config.dense.steps)
  _, state = steps_lib.init_state(model, tx, config.seed)
  rep = jax.sharding.NamedSharding(trainer.mesh(), jax.sharding.PartitionSpec())
  restored = ckpt_lib.restore(os.path.join(a.workdir, "dense"), state, rep)
  if restored is None:
    sys.exit(f"error: no checkpoint in {a.workdir}/dense")
  state, step, _ = restored
  graphdef = nnx.graphdef(model)
  model = nnx.merge(graphdef, state.params, state.rest)
  cfg = run_lib.step_config(config, ds)
  acc = trainer.evaluate(graphdef, state.params, state.rest, ds.test, cfg)
  head = data_lib.Split(ds.test.images[:SLICE], ds.test.labels[:SLICE])
  acc_slice = trainer.evaluate(graphdef, state.params, state.rest, head, cfg)
  meta = dict(
    model=config.model,
    model_kwargs=dict(config.get("model_kwargs") or {}),
    dataset=config.dataset,
    pad_to=config.get("pad_to"),
    steps=int(step),
    test_accuracy=acc,
    test_accuracy_first=dict(images=SLICE, accuracy=acc_slice),
    command=a.command,
    machine=_machine(),
    date=time.strftime("%F", time.gmtime()),
    note=a.note,
  )
  save(model, a.out, meta)
  print(json.dumps({k: v for k, v in meta.items() if k != "arrays"}))


if __name__ == "__main__":
  main()
