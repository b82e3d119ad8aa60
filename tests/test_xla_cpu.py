"""decomp's XLA CPU settings: nothing at import, per-program FAST_COMPILE."""

import importlib.metadata
import json
import os
import subprocess
import sys

from decomp import _xla_cpu

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import json, os, sys
import jax
env0 = dict(os.environ)
cfg0 = {k: str(v) for k, v in jax.config.values.items()}
import decomp, tnn, train, train.run, train.steps, train.trainer, train.data, train.checkpoint
cfg1 = {k: str(v) for k, v in jax.config.values.items()}
out = dict(
  env_changed=sorted(k for k in set(env0) | set(os.environ) if env0.get(k) != os.environ.get(k)),
  config_changed=sorted(k for k in cfg0 if cfg0[k] != cfg1.get(k)),
  backends_started=jax._src.xla_bridge.backends_are_initialized(),
)
print(json.dumps(out))
"""


def _probe(*args, **env_extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=_ROOT, **env_extra)
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_packages_changes_no_process_wide_state():
  got = _probe()
  assert got == dict(env_changed=[], config_changed=[], backends_started=False), got


def test_an_accelerator_plugin_is_seen_unless_the_user_asked_for_the_cpu(monkeypatch):
  plugin = importlib.metadata.EntryPoint("xla_cuda13", "jax_plugins.xla_cuda13", "jax_plugins")
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [plugin])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert _xla_cpu._accelerator_jax() is True
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the user asked for the CPU: the plugin is moot
  assert _xla_cpu._accelerator_jax() is False


def test_without_jax_private_backend_query_the_started_check_still_decides(monkeypatch):
  """`jax._src.xla_bridge` is private: where a jax lacks it, the started-check says False
  instead of failing."""
  import sys

  import jax._src
  import jax.numpy as jnp

  jnp.zeros(1).block_until_ready()  # jax has started a backend
  monkeypatch.delattr(jax._src, "xla_bridge")
  monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", None)  # `import` now fails
  assert _xla_cpu._backends_started() is False
  monkeypatch.undo()
  assert _xla_cpu._backends_started() is True


def test_the_search_compiles_with_the_fast_compile_option_on_the_tested_jax():
  assert _xla_cpu.search_compiler_options() == _xla_cpu.FAST_COMPILE


def test_an_option_this_xla_does_not_know_is_left_out(monkeypatch):
  # jax rejects an unknown compile option; the search must then compile with XLA's defaults.
  monkeypatch.setattr(_xla_cpu, "FAST_COMPILE", {"xla_cpu_no_such_option": False})
  _xla_cpu.search_compiler_options.cache_clear()
  try:
    assert _xla_cpu.search_compiler_options() is None
  finally:
    _xla_cpu.search_compiler_options.cache_clear()  # recomputed with the real option


_FAULTS = r"""
import json, resource, sys
import decomp
on = decomp.reuse_host_memory() if "--opt-in" in sys.argv else False
import jax, jax.numpy as jnp
f = jax.jit(jnp.sin)
x = jnp.ones((4096, 4096), jnp.float32)  # each call's output: 64 MB, above glibc's mmap ceiling
for _ in range(30):  # the heap settles
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps(dict(on=on, faults_per_call=faults)))
"""


def _faults(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  env.update(PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS, *args], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_reusing_host_memory_stops_the_per_call_page_faults_of_large_buffers():
  # Without the opt-in glibc maps every 64 MB output afresh: one page fault per 4 KiB page
  # per call. With it the freed buffer is reused and the calls fault in (almost) nothing.
  pages = 4096 * 4096 * 4 // 4096
  off = _faults()
  assert not off["on"] and off["faults_per_call"] >= 0.9 * pages, off
  on = _faults("--opt-in")
  assert on["on"] and on["faults_per_call"] <= 0.01 * pages, on


def test_reusing_host_memory_leaves_the_users_tunables_and_accelerators_alone(monkeypatch):
  monkeypatch.setattr(_xla_cpu, "_REUSING", False)  # as in a process that has not opted in
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
  assert not _xla_cpu.reuse_host_memory()
  monkeypatch.delenv("GLIBC_TUNABLES")
  plugin = importlib.metadata.EntryPoint("xla_cuda13", "jax_plugins.xla_cuda13", "jax_plugins")
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [plugin])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert not _xla_cpu.reuse_host_memory()


def test_reusing_host_memory_after_jax_started_warns_and_does_nothing(monkeypatch):
  import warnings

  import jax.numpy as jnp
  import pytest

  jnp.zeros(1).block_until_ready()
  monkeypatch.setattr(_xla_cpu, "_REUSING", False)
  with pytest.warns(RuntimeWarning, match="jax already started"):
    assert not _xla_cpu.reuse_host_memory()
  # A process that opted in before jax started (a second entry point calling it again):
  # the settings hold, and nothing is said.
  monkeypatch.setattr(_xla_cpu, "_REUSING", True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _xla_cpu.reuse_host_memory()
