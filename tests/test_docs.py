"""docs/*.md: every ```python block runs, in order, in one namespace (the docs stay true)."""

import os
import re

import jax
import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@pytest.fixture(autouse=True)
def _standard_promotion():
  """The docs are written for a default JAX (standard promotion, float32)."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    with jax.enable_x64(False):
      yield


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(DOCS) if f.endswith(".md")))
def test_doc_runs(name):
  with open(os.path.join(DOCS, name)) as f:
    text = f.read()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, f"{name} has no python block"
  ns = {"__name__": f"docs.{name}"}
  for i, code in enumerate(blocks):
    exec(compile(code, f"docs/{name}[block {i}]", "exec"), ns)
