"""Checkpoints of a training phase: named arrays, checksummed, fingerprinted, written atomically.

A phase folder holds `ckpt/<step>/` for the last `keep` saves, each with

- `arrays.npz`: every leaf of the train state under its path name
  (`params/blocks/0/layers/1/conv1/kernel`, `opt_state/...`, `step`, ...);
- `meta.json`: `{"format", "step", "fingerprint", "arrays": {name: [shape, dtype, sha256]}}`.

A save is written to a temporary folder beside the others and renamed into place, so a
kill leaves either the whole checkpoint or none. Only process 0 writes (the state is
replicated); every process reads.

Restore follows big_vision's order:

1. shapes first: the abstract state (`jax.eval_shape` of the initial state);
2. then shardings: each leaf replicated over the mesh;
3. then the arrays, read, checked against (1) and the checksums and for finiteness, and
   placed straight onto (2).

A checkpoint that fails any check is skipped with one printed line naming its step and
why, and the next older one is tried. When none is good, `CheckpointError` names the
folder and what to do. A state that is not finite is never saved (`NonFiniteState`), so
a rerun at a saner learning rate starts from the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile

import jax
import numpy as np

FORMAT = 1


class CheckpointError(ValueError):
  """No usable checkpoint where one was expected (the message says what to do)."""


class NonFiniteState(FloatingPointError):
  """The state to be saved holds NaN or Inf."""


def _name(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  if len(parts) > 1 and parts[-1] == "value":  # an nnx.Variable's payload
    parts.pop()
  return "/".join(parts)


def named_leaves(tree) -> dict:
  """`{path name: leaf}` of a pytree, in tree order."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = _name(path)
    if name in out:
      raise ValueError(f"checkpoint: two leaves share the name {name!r}.")
    out[name] = leaf
  return out


def _host(x) -> np.ndarray:
  """A replicated array's value on this host (its first local shard holds all of it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def array_sha256(a: np.ndarray) -> str:
  """SHA-256 of an array's bytes (C order): the checksum of checkpoints and teacher files."""
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def file_sha256(path: str) -> str:
  """The SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def all_finite(tree) -> bool:
  """Whether every floating leaf of `tree` is finite (one device reduction per leaf)."""
  import jax.numpy as jnp

  checks = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return bool(jnp.all(jnp.stack(checks))) if checks else True


def steps_on_disk(folder: str) -> list[int]:
  """The steps of the complete checkpoints in `folder/ckpt`, newest first."""
  d = os.path.join(folder, "ckpt")
  if not os.path.isdir(d):
    return []
  return sorted((int(n) for n in os.listdir(d) if n.isdigit()), reverse=True)


def save(folder: str, step: int, state, fingerprint: dict, *, keep: int, info=None) -> None:
  """Writes `state` as checkpoint `step` of `folder` (process 0 only) and keeps the last
  `keep`. `info`: a JSON-able record kept beside it (not checked, not compared; `info`
  reads it back). Raises `NonFiniteState`, saving nothing, if a floating leaf is not
  finite."""
  if not all_finite(state):
    raise NonFiniteState(f"step {step}")
  if jax.process_index() != 0:
    return
  ckpt = os.path.join(folder, "ckpt")
  os.makedirs(ckpt, exist_ok=True)
  arrays = {k: _host(v) for k, v in named_leaves(state).items()}
  meta = dict(
    format=FORMAT,
    step=int(step),
    fingerprint=fingerprint,
    info=info or {},
    arrays={k: [list(a.shape), a.dtype.str, array_sha256(a)] for k, a in arrays.items()},
  )
  tmp = os.path.join(ckpt, f".tmp-{step}-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "arrays.npz"), "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:  # a full disk (OSError), or an interrupt: no half-written folder
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  final = os.path.join(ckpt, str(step))
  if os.path.exists(final):  # the same step again (a rerun of a finished phase)
    shutil.rmtree(final)
  os.rename(tmp, final)
  for old in steps_on_disk(folder)[keep:]:
    shutil.rmtree(os.path.join(ckpt, str(old)), ignore_errors=True)


def _read(path: str, abstract: dict) -> tuple[dict, dict]:
  """`(arrays, meta)` of one checkpoint folder, checked; raises ValueError saying why not."""
  try:
    with open(os.path.join(path, "meta.json")) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise ValueError("meta.json is missing") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"meta.json is unreadable ({type(e).__name__})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"meta.json is not a format-{FORMAT} checkpoint record")
  recorded = meta.get("arrays")
  if not isinstance(recorded, dict) or set(recorded) != set(abstract):
    missing = sorted(set(abstract) - set(recorded or {}))[:3]
    extra = sorted(set(recorded or {}) - set(abstract))[:3]
    raise ValueError(
      f"it holds other arrays than this phase's state (missing {missing}, unexpected {extra})"
    )
  try:
    with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as z:
      arrays = {k: z[k] for k in abstract}
  except FileNotFoundError:
    raise ValueError("arrays.npz is missing") from None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"arrays.npz is unreadable ({type(e).__name__}: {e})") from None
  for k, want in abstract.items():
    a = arrays[k]
    shape, dtype, digest = recorded[k]
    if tuple(a.shape) != tuple(want.shape) or np.dtype(a.dtype) != np.dtype(want.dtype):
      raise ValueError(
        f"array {k!r} is {a.dtype}{list(a.shape)}, this phase's state needs "
        f"{np.dtype(want.dtype)}{list(want.shape)}"
      )
    if [list(a.shape), a.dtype.str] != [list(shape), dtype] or array_sha256(a) != digest:
      raise ValueError(f"array {k!r} does not match its checksum")
    if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
      raise ValueError(f"array {k!r} holds NaN or Inf")
  return arrays, meta


def info(folder: str, step: int) -> dict:
  """The `info` record saved with checkpoint `step` of `folder` ({} if it has none). Call it
  for a step `restore` returned (its meta.json was read and checked then)."""
  try:
    with open(os.path.join(folder, "ckpt", str(step), "meta.json")) as f:
      rec = json.load(f).get("info")
  except (OSError, ValueError, AttributeError):
    return {}
  return rec if isinstance(rec, dict) else {}


def restore(folder: str, init_state, sharding, *, log=None):
  """The newest good checkpoint of `folder`: `(state, step, fingerprint)`, or None if the
  folder has none at all. `init_state` gives the tree structure (its values are unused).

  Raises `CheckpointError` when checkpoints exist but none passes its checks."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  steps = steps_on_disk(folder)
  if not steps:
    return None
  # 1. shapes first
  abstract_tree = jax.eval_shape(lambda s: s, init_state)
  abstract = named_leaves(abstract_tree)
  treedef = jax.tree.structure(abstract_tree)
  why = []
  for step in steps:
    try:
      arrays, meta = _read(os.path.join(folder, "ckpt", str(step)), abstract)
    except ValueError as e:
      log(f"checkpoint {folder}/ckpt/{step} skipped: {e}")
      why.append(f"step {step}: {e}")
      continue
    # 2. then shardings, 3. then the arrays placed straight onto them
    leaves = [
      jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
      for a in (arrays[k] for k in abstract)
    ]
    return jax.tree.unflatten(treedef, leaves), step, meta.get("fingerprint")
  raise CheckpointError(
    f"no usable checkpoint in {folder}/ckpt ({'; '.join(why)}). Delete that phase folder "
    "to train the phase again from its start, or use a new --workdir."
  )


def latest_arrays(folder: str) -> tuple[int, dict]:
  """`(step, {name: array})` of the newest checkpoint of `folder`, read as saved (no
  checks: for inspection and tests)."""
  steps = steps_on_disk(folder)
  if not steps:
    raise CheckpointError(f"no checkpoint in {folder}/ckpt")
  with np.load(os.path.join(folder, "ckpt", str(steps[0]), "arrays.npz")) as z:
    return steps[0], {k: z[k] for k in z.files}
