"""`python -m train --config train/configs/<name>.py --workdir DIR [--config.key=value ...]`."""

from absl import app, flags, logging
from ml_collections import config_flags

from train import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
_DISTRIBUTED = flags.DEFINE_bool(
  "jax_distributed",
  False,
  "Multi-host: call jax.distributed.initialize() first (the cluster is found from the "
  "environment: SLURM, Cloud TPU, or JAX_COORDINATOR_ADDRESS / num_processes / process_id).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value:
    run_lib.initialize_distributed()
  config = _CONFIG.value
  if not config.get("data_dir"):
    config.data_dir = None
  if not config.get("pad_to"):
    config.pad_to = None
  run_lib.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
