"""The XLA CPU runtime-hang workaround that importing `decomp` applies."""

import os

import decomp  # noqa: F401  (applies the workaround)
from decomp import _xla_cpu


def test_flag_in_effect_in_this_process():
  # conftest imports jax but starts no backend before the tests import decomp.
  assert _xla_cpu.IN_EFFECT
  assert _xla_cpu.FLAG in os.environ["XLA_FLAGS"].split()


def test_user_choice_is_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--{_xla_cpu.NAME}=true")
  assert not _xla_cpu.avoid_cpu_runtime_hang()
  assert os.environ["XLA_FLAGS"] == f"--{_xla_cpu.NAME}=true"
  monkeypatch.setenv("XLA_FLAGS", f"--foo {_xla_cpu.FLAG}")
  assert _xla_cpu.avoid_cpu_runtime_hang()
  assert os.environ["XLA_FLAGS"] == f"--foo {_xla_cpu.FLAG}"


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
