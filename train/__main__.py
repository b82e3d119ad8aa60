"""`python -m train --config train/configs/<name>.py[:ARG] --workdir DIR [--config.key=value ...]`.

Every error the CLI can foresee (a bad flag or config key, a bad value, missing or corrupt
data, an unusable checkpoint, a workdir that does not match its config or is in use, a
non-finite state, a full disk) is printed as one message with exit code 2, without a
traceback. SIGTERM or SIGINT finishes the step in flight, saves a checkpoint there, prints
one line and exits with 143 or 130 (`train.preemption`); rerunning the command resumes.
`--config.methods=dense,deeptwist` takes a comma list.
"""

import glob
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
_DISTRIBUTED = flags.DEFINE_bool(
  "jax_distributed",
  False,
  "Multi-host: call jax.distributed.initialize() first (the cluster is found from the "
  "environment: SLURM, Cloud TPU, or JAX_COORDINATOR_ADDRESS / num_processes / process_id).",
)

_USAGE = """usage: python -m train --config train/configs/<name>.py[:ARG] --workdir DIR
  [--config.KEY=VALUE ...]

Configs (the docstring of each file gives its command, hardware and arguments):
{configs}

See a config's keys and values:  python -m train --config FILE --workdir DIR --show
Set a key:  --config.batch_size=64   a method's:  --config.dense.steps=100
A list:     --config.methods=dense,deeptwist
"""


def _configs() -> str:
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
  rows = []
  for path in sorted(glob.glob(os.path.join(here, "*.py"))):
    name = os.path.basename(path)
    if name in ("__init__.py", "common.py"):
      continue
    with open(path) as f:
      text = f.read()
    doc = text.split('"""', 2)[1] if '"""' in text else ""
    first = " ".join(doc.strip().lstrip("r").split("\n\n")[0].split())
    rows.append(f"  train/configs/{name:24s} {first[:90]}")
  return "\n".join(rows)


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def _split_lists(argv: list[str]) -> list[str]:
  """`--config.methods=a,b` (a comma list) as the tuple syntax ml_collections parses."""
  out = []
  for a in argv:
    if a.startswith("--config.methods=") and "," in a and not a.split("=", 1)[1].startswith("("):
      items = [x.strip() for x in a.split("=", 1)[1].split(",") if x.strip()]
      a = "--config.methods=(" + ",".join(repr(x) for x in items) + ",)"
    out.append(a)
  return out


def main(argv):
  from train import preemption, workdir
  from train import run as run_lib

  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}; see python -m train --help.")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    _fail("--config and --workdir are required; see python -m train --help.")
  if not config.get("data_dir"):
    config.data_dir = None
  if not config.get("pad_to"):
    config.pad_to = None
  try:
    if _DISTRIBUTED.value:
      run_lib.initialize_distributed()
    with preemption.handling_signals():
      run_lib.run(config, _WORKDIR.value)
  except preemption.Preempted as e:
    print(
      f"preempted at step {e.step} of phase {e.phase}; rerun the same command to resume",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(e.exit_code)
  except (
    ValueError,  # config values, data files, plans, teachers, checkpoints, mismatches
    FloatingPointError,  # a non-finite loss or state
    workdir.WorkdirLocked,
    FileNotFoundError,
  ) as e:
    _fail(str(e))
  except OSError as e:  # a full disk, a read-only or vanished workdir, while writing
    where = f"{e.filename}: " if e.filename else ""
    _fail(
      f"could not write {where}{e.strerror or e} (errno {e.errno}); free space or "
      "fix the workdir, then rerun the same command to resume from the newest checkpoint."
    )


def entry(argv=None) -> None:
  import decomp

  decomp.reuse_host_memory()  # the same: freed buffers reused, not mapped anew each step
  argv = _split_lists(list(sys.argv if argv is None else argv))
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    print(_USAGE.format(configs=_configs()))
    sys.exit(0)
  show = "--show" in argv
  argv = [a for a in argv if a != "--show"]
  try:
    flags.FLAGS(argv)
    _CONFIG.value.get("methods")  # a config file that failed to load raises here
  except flags.Error as e:
    _fail(f"{e}; see python -m train --help.")
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    # ml_collections raises these while loading the config file or applying an override.
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    msg = msg.replace("\\n", " ").replace("\\'", "'")
    key = re.match(r"^'*(\w+)'* *(Did you mean.*)?$", msg.strip().strip('"'))
    if key:  # ml_collections' KeyError for an unknown key, as the repr of a repr
      name = key.group(1)
      given = [a.split("=", 1)[0][2:] for a in argv if re.match(rf"--config\.(\w+\.)*{name}=", a)]
      where = (
        f" (in --{given[0]}); the keys are the config file's, see them with --show" if given else ""
      )
      msg = f"unknown config key {(given[0][7:] if given else name)!r}{where}. {key.group(2) or ''}"
    _fail(" ".join(msg.strip("'\"").split()))
  if show:
    print(_CONFIG.value)
    sys.exit(0)
  app.run(main, argv=[argv[0]], flags_parser=lambda a: a)


if __name__ == "__main__":
  entry()
