"""Every module of the package imports, and the package's import graph has no cycles.

The graph has an edge A -> B for every `import puma_jax.B` / `from puma_jax[.x] import B`
in A, at module level or inside a function (a lazy import hides a cycle from Python, not from
the design). `from package import name` points at the submodule when `name` is one, else at
the package.
"""

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import puma_jax

ROOT = Path(puma_jax.__file__).resolve().parent


def all_modules() -> dict[str, Path]:
  out = {"puma_jax": ROOT / "__init__.py"}
  for info in pkgutil.walk_packages([str(ROOT)], prefix="puma_jax."):
    rel = info.name.split(".")[1:]
    path = ROOT.joinpath(*rel)
    out[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
  return out


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative import
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
    else:
      continue
    for t in targets:
      # `import puma_jax.a.b` names the deepest module of the package it reaches
      while t and t not in modules:
        t = t.rpartition(".")[0]
      if t.startswith("puma_jax") and t != name:
        found.add(t)
  return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
  color = dict.fromkeys(graph, 0)
  for root in sorted(graph):
    if color[root]:
      continue
    stack, path = [(root, iter(sorted(graph[root])))], [root]
    color[root] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        color[node] = 2
        stack.pop()
        path.pop()
      elif color.get(child, 2) == 1:
        return path[path.index(child) :] + [child]
      elif color.get(child, 2) == 0:
        color[child] = 1
        stack.append((child, iter(sorted(graph[child]))))
        path.append(child)
  return None


def import_graph() -> dict[str, set[str]]:
  modules = all_modules()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


# Run in a fresh process: CLI modules define absl flags when imported, and each module's flags
# are removed after it so that two CLIs' --config do not collide (not in the test process,
# whose other tests may need those flags).
IMPORT_ALL = """
import importlib, json, sys
from absl import flags
failed = {}
for name in json.loads(sys.argv[1]):
  before = set(flags.FLAGS)
  try:
    importlib.import_module(name)
  except Exception as e:
    failed[name] = f"{type(e).__name__}: {e}"
  for flag in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag)
print(json.dumps(failed))
"""


def test_every_module_imports():
  names = sorted(all_modules())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", IMPORT_ALL, json.dumps(names)],
    cwd=ROOT.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  failed = json.loads(out.stdout.strip().splitlines()[-1])
  assert not failed, failed


def test_import_graph_is_acyclic():
  graph = import_graph()
  assert "puma_jax.training.loop" in graph and graph["puma_jax.training.loop"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_never_import_the_loop():
  graph = import_graph()
  for stage in ("puma_jax.training.mllm", "puma_jax.training.decoder"):
    assert "puma_jax.training.loop" not in graph[stage]
  assert "puma_jax.training.registry" in graph["puma_jax.training.loop"]


@pytest.mark.parametrize(
  "graph, cyclic",
  [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a2"}, "a2": set(), "b": {"b"}}, True),
  ],
)
def test_cycle_finder_finds_cycles(graph, cyclic):
  assert (find_cycle(graph) is not None) == cyclic
