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
