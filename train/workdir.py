"""A run's workdir: one writer at a time, and a config record that is never silently rewritten.

`lock(workdir)` takes an exclusive `flock` on `workdir/.lock` and writes the holder (pid,
host, start time) into it. The kernel drops the lock when the holder dies, however it
dies, so a lock left by a killed run is never stale: the next run takes it. A second run
on a held workdir gets `WorkdirLocked`, naming the holder.

`check_config(workdir, config)` compares the config with the `config.json` of an earlier
run in the same workdir, before any compute:

- keys that change neither a state nor a result (`IGNORED`, and in a method section
  `SECTION_IGNORED`) may differ;
- `init_from` is compared by the file's content (its SHA-256, recorded beside the path as
  `init_from_sha256`): the same teacher under another path (a moved checkout) is the same
  run, another file under the same path is not;
- a method section may be added, or changed while no phase of it has been started;
- anything else that differs while phases exist on disk is refused (`ConfigMismatch`,
  naming each key, old and new value), unless `config.resume == "force"`.

A config that differs and is accepted is written as the new `config.json`, and the
difference is appended to `config_changes.jsonl`, so the record says what happened.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from train import checkpoint as ckpt_lib
from train.trainer import ConfigMismatch, fingerprint_diff

IGNORED = (
  "log_every",
  "checkpoint_every",
  "keep",
  "resume",
  "data_dir",
  "eval_every",
  "eval_examples",
)
SECTION_IGNORED = ("forward",)
"""Method-section keys that pick how a phase computes, not what: `forward` runs the same
function through another path (`tnn.layers.Factorized`), so it differs only by rounding."""


def shaping(section: dict) -> dict:
  """`section` without the keys that do not shape its phases' states (`SECTION_IGNORED`):
  what a phase's checkpoint fingerprint records."""
  return {k: v for k, v in section.items() if k not in SECTION_IGNORED}


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


class lock:
  """`with lock(workdir):` the one writer of `workdir` (a context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.f = None

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise WorkdirLocked(
        f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait "
        "for it to finish, stop it, or use another --workdir."
      ) from None
    f.seek(0)
    f.truncate()
    f.write(
      json.dumps(
        dict(
          pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%FT%TZ", time.gmtime())
        )
      )
    )
    f.flush()
    self.f = f
    return self

  def __exit__(self, *exc):
    if self.f is not None:
      fcntl.flock(self.f, fcntl.LOCK_UN)
      self.f.close()
      self.f = None


def _started(workdir: str, phase: str) -> bool:
  """Whether a phase folder of `phase` (or of its sub-phases) exists in `workdir`."""
  if not os.path.isdir(workdir):
    return False
  for n in os.listdir(workdir):
    if (n == phase or n.startswith(phase + "_")) and os.path.isdir(os.path.join(workdir, n)):
      return True
  return False


def _any_started(workdir: str) -> bool:
  return os.path.isdir(workdir) and any(
    os.path.isdir(os.path.join(workdir, n, "ckpt")) for n in os.listdir(workdir)
  )


def _sha256(path: str) -> str:
  """The SHA-256 of the file at `path` ('' when there is none)."""
  return ckpt_lib.file_sha256(path) if os.path.isfile(path) else ""


def check_config(workdir: str, config) -> None:
  """Refuses (before compute) a config that does not match the workdir's earlier run;
  records an accepted one (see the module docstring)."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json())
  if new.get("init_from"):
    new["init_from_sha256"] = _sha256(new["init_from"])
  if not os.path.exists(path):
    with open(path, "w") as f:
      json.dump(new, f, indent=1)
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigMismatch(
      f"{path} is unreadable ({e}); use a new --workdir, or delete that file to accept the "
      "current config as this workdir's record."
    ) from None
  if old.get("init_from") and "init_from_sha256" not in old:  # a record from before the digest
    old["init_from_sha256"] = _sha256(old["init_from"])
  if old == new:
    return
  sections = {m for m in new.get("methods", ()) if isinstance(new.get(m), dict)}
  sections |= {m for m in old.get("methods", ()) if isinstance(old.get(m), dict)}
  sections.add("dense")
  refused = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict) and key in sections:
      a, b = shaping(a), shaping(b)
    if a == b or key in IGNORED or key == "methods":
      continue
    if key == "init_from" and old.get("init_from_sha256") == new.get("init_from_sha256"):
      continue  # the same content: the file may move
    if key in sections and key != "dense":
      blocked = _started(workdir, key)
    else:
      blocked = _any_started(workdir)
    if blocked:
      if isinstance(a, dict) and isinstance(b, dict):
        refused += fingerprint_diff(a, b, f"{key}.")
      else:
        refused += fingerprint_diff({key: a}, {key: b})
  forced = new.get("resume") == "force"
  if refused and not forced:
    shown = refused[:8] + ([f"and {len(refused) - 8} more"] if len(refused) > 8 else [])
    raise ConfigMismatch(
      f"the config differs from the one this workdir ({workdir}) was run with, in settings "
      f"that shape its saved phases: {'; '.join(shown)}. Use a new --workdir, or "
      "--config.resume=force to continue anyway (recorded in config_changes.jsonl)."
    )
  with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
    change = dict(
      time=time.strftime("%FT%TZ", time.gmtime()),
      forced=bool(refused) and forced,
      changes=fingerprint_diff(old, new),
    )
    f.write(json.dumps(change) + "\n")
  with open(path, "w") as f:
    json.dump(new, f, indent=1)
