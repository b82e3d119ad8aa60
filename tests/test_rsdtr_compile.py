"""The RSDTR search's program cache (`decomp.rsdtr._executables`)."""

import importlib
import threading

import jax
import numpy as np

import decomp

rsdtr_module = importlib.import_module("decomp.rsdtr")  # `decomp.rsdtr` is the function


def _kernel(seed, shape=(3, 3, 8, 12)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _same(a, b):
  assert (a.shift, a.ranks, a.candidates) == (b.shift, b.ranks, b.candidates)
  for x, y in zip(a.tr.cores, b.tr.cores, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_each_program_compiles_once(monkeypatch):
  kernel = _kernel(0)
  first = decomp.rsdtr(kernel, eps=0.3)
  compiled = []
  real = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self: compiled.append(1) or real(self))
  again = decomp.rsdtr(kernel, eps=0.3)
  assert not compiled  # every program of the second search was compiled by the first
  _same(first, again)


def test_pool_compiles_what_one_thread_compiles(monkeypatch):
  # Two shapes: a dozen programs, lowered here and compiled on a pool of 2 threads, give
  # what they give compiled on a pool of one.
  kernels = [_kernel(1), _kernel(2, (3, 3, 6, 10)), _kernel(3)]
  rsdtr_module._programs()  # its compile-option probe compiles on this thread, once
  threads = set()
  real = jax.stages.Lowered.compile

  def compile_(self):
    threads.add(threading.current_thread().name)
    return real(self)

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)
  monkeypatch.setattr(rsdtr_module.os, "cpu_count", lambda: 1)
  rsdtr_module._EXECUTABLES.clear()
  serial = decomp.rsdtr_many(kernels, eps=0.4)
  monkeypatch.setattr(rsdtr_module.os, "cpu_count", lambda: 2)
  rsdtr_module._EXECUTABLES.clear()
  pooled = decomp.rsdtr_many(kernels, eps=0.4)
  # Compiled on the pool only (how many of its threads took part depends on timing).
  assert {t.rsplit("_", 1)[0] for t in threads} == {"rsdtr-compile"}
  for a, b in zip(serial, pooled, strict=True):
    _same(a, b)


def test_kernel_on_another_device():
  kernel = _kernel(4)
  here = decomp.rsdtr(kernel, eps=0.3)
  there = decomp.rsdtr(jax.device_put(kernel, jax.devices()[1]), eps=0.3)
  _same(here, there)
