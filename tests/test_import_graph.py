"""The package's import graph has no cycle, and inference never imports the trainer (read with ast, no imports)."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llava_jax")


def _module_name(path: str, root: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(root))[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the package modules it imports}, function-level imports included (they still form cycles)."""
  modules = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        modules[_module_name(path, root)] = path
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        # `from pkg import mod` imports the submodule when there is one, else a name of pkg.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      for name in names:
        while name and name not in modules:  # `import a.b.c` also imports a and a.b
          name = name.rpartition(".")[0]
        if name and name != module:
          targets.add(name)
    graph[module] = targets
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def _cycle_free_without_packages(graph):
  """Package `__init__` modules re-export their children; an edge child -> parent package is how Python imports
  the child (the parent runs first), not a dependency, so drop the edges into a package's own ancestors."""
  return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


# Read once, at collection: Python 3.11's `ast.parse` can raise "AST constructor recursion depth mismatch" when
# called late in a long session whose recursion counter earlier tests disturbed (a CPython bug, not ours).
GRAPH = import_graph()


def test_no_import_cycle():
  cycle = find_cycle(_cycle_free_without_packages(GRAPH))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_relative_and_function_level_imports(tmp_path):
  pkg = tmp_path / "llava_jax"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from llava_jax.sub import b\n")
  (pkg / "sub" / "b.py").write_text("from .. import a\n")
  graph = _cycle_free_without_packages(import_graph(str(pkg)))
  assert graph["llava_jax.a"] == {"llava_jax.sub.b"}
  assert graph["llava_jax.sub.b"] == {"llava_jax.a"}
  assert find_cycle(graph) == ["llava_jax.a", "llava_jax.sub.b", "llava_jax.a"]


@pytest.mark.parametrize("module", ["llava_jax.checkpoint", "llava_jax.generation", "llava_jax.decoding",
                                    "llava_jax.processor", "llava_jax.convert"])
def test_inference_does_not_import_the_trainer(module):
  graph = GRAPH
  seen, todo = set(), [module]
  while todo:
    m = todo.pop()
    if m in seen:
      continue
    seen.add(m)
    todo.extend(graph.get(m, ()))
  assert not [m for m in seen if m.startswith("llava_jax.train")], sorted(seen)


def test_no_module_shadows_the_generate_function():
  """`llava_jax.generate` is the exported function; a module of that name would hide it from `import`."""
  assert "llava_jax.generate" not in GRAPH
