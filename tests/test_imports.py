"""The import graph of the library's modules (`decomp`, `tnn`, `train`) has no cycle.

Every `import` statement counts, at module level or inside a function: a lazy import
still ties the two modules together (the teacher-export command line in `train.teacher`
imported `train.run`, which imports `train.teacher`)."""

import ast
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("decomp", "tnn", "train")


def _modules() -> dict[str, str]:
  out = {}
  for pkg in PACKAGES:
    for folder, _, files in os.walk(os.path.join(_ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, f), _ROOT)[:-3].replace(os.sep, ".")
          out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
  return out


def _edges(modules: dict[str, str]) -> dict[str, set]:
  graph = {m: set() for m in modules}
  for m, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for n in names:
        if n in modules and n != m and not m.startswith(n + "."):
          graph[m].add(n)
  return graph


def _cycle(graph: dict[str, set]) -> list | None:
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        return stack[stack.index(n) :] + [n]
      if n not in state and (found := visit(n)):
        return found
    state[m] = "done"
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = _edges(_modules())
  assert "train.run" in graph["train.export_teacher"]  # the graph sees function-level imports
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_planted_cycle_is_found():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
