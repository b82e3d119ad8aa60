"""Preemption: SIGTERM or SIGINT ends a run at a step boundary, with a checkpoint there.

Preemptible GPU/TPU VMs and SLURM send SIGTERM and give a job seconds to save. With
`handling_signals()` in effect (the CLI's `main`), the first SIGTERM or SIGINT only sets
a flag; the step in flight finishes, `train.trainer.run_phase` saves a checkpoint at that
step and raises `Preempted`, and the CLI prints one line and exits with 143 (SIGTERM) or
130 (SIGINT). Further signals while this happens are ignored, so a second Ctrl-C cannot
interrupt the save (which is atomic anyway: `train.checkpoint`). A rerun of the same
command resumes from that checkpoint, to the same bits as an uninterrupted run.

Multi-host (`jax.process_count() > 1`): every process must stop at the same step, so the
decision is `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, which
jax's distributed runtime answers for all processes alike once any of them received
SIGTERM (its preemption notifier, installed by `jax.distributed.initialize`). A SIGINT on
one host is then not coordinated: stop a multi-host job with SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: int | None = None  # the first signal received while handling, else None


class Preempted(Exception):
  """The run stopped at `step` of phase `phase` on signal `signum`, checkpoint saved."""

  def __init__(self, phase: str, step: int, signum: int):
    super().__init__(f"preempted at step {step} of phase {phase}")
    self.phase, self.step, self.signum = phase, step, signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def _note(signum, frame) -> None:
  global _received
  if _received is None:
    _received = signum


@contextlib.contextmanager
def handling_signals():
  """SIGTERM and SIGINT set the preemption flag instead of ending the process, inside the
  block (main thread only; the previous handlers come back after it)."""
  global _received
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _note) for s in _SIGNALS}
  _received = None
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _received = None


def requested(step: int) -> int | None:
  """The signal that asks this run to stop before step `step`, or None. Call it at every
  step of every process (multi-host: it is a collective decision)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      return signal.SIGTERM
    return None
  return _received
