"""The package's import graph (read with ast, nothing imported): imports point down the module map of
docs/DESIGN_NOTES.md, which lists the layers in the order below; no cycle; inference never imports the trainer."""

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


DOCS = os.path.join(os.path.dirname(ROOT), "docs", "DESIGN_NOTES.md")
# The module map's layers, top to bottom: (the map line's first words, the modules or packages of that layer). A
# module may import its own layer or a lower one; the map in DESIGN_NOTES.md lists the layers in this order.
LAYERS = [
    ("llava_jax/cli.py, demo.py", ["llava_jax.cli", "llava_jax.demo"]),
    ("llava_jax/eval/, serve/", ["llava_jax.eval", "llava_jax.serve"]),
    ("llava_jax/train/", ["llava_jax.train"]),
    ("llava_jax/__init__.py", ["llava_jax"]),
    ("llava_jax/processor.py", ["llava_jax.processor", "llava_jax.processor_onevision"]),
    ("llava_jax/generation.py", ["llava_jax.generation"]),
    ("llava_jax/decoding.py", ["llava_jax.decoding"]),
    ("llava_jax/convert.py", ["llava_jax.convert"]),
    ("llava_jax/checkpoint.py", ["llava_jax.checkpoint"]),
    ("llava_jax/checkpoint_files.py, lora.py", ["llava_jax.checkpoint_files", "llava_jax.lora"]),
    ("llava_jax/models/", ["llava_jax.models"]),
    ("llava_jax/data/", ["llava_jax.data"]),
    ("llava_jax/sharding.py", ["llava_jax.sharding", "llava_jax.safetensors_io", "llava_jax.tree", "llava_jax.config",
                               "llava_jax.hf_config", "llava_jax.hub", "llava_jax.host_memory", "llava_jax.padding",
                               "llava_jax.cpu_defaults"]),
]


def layer_of(module: str) -> int:
  """The layer index of a module: its own entry, else the package entry it lies in (the root only as itself)."""
  for i, (_, names) in enumerate(LAYERS):
    if any(module == n or (n != "llava_jax" and module.startswith(n + ".")) for n in names):
      return i
  raise KeyError(f"{module} is in no layer of the module map: add it to docs/DESIGN_NOTES.md and LAYERS")


def test_every_module_has_a_layer():
  for module in GRAPH:
    layer_of(module)


def test_imports_point_down_the_module_map():
  upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
            for m, targets in _cycle_free_without_packages(GRAPH).items() for t in sorted(targets)
            if layer_of(t) < layer_of(m)]
  assert not upward, "imports that point up the module map:\n" + "\n".join(upward)


def test_the_design_notes_map_lists_the_layers_in_this_order():
  with open(DOCS) as f:
    text = f.read()
  block = text.split("## The map", 1)[1].split("```", 2)[1]
  lines = [line for line in block.splitlines() if line.startswith("llava_jax/")]
  starts = [next((i for i, line in enumerate(lines) if line.startswith(head)), None) for head, _ in LAYERS]
  assert None not in starts, [head for head, _ in LAYERS if not any(l.startswith(head) for l in lines)]
  assert starts == sorted(starts) and len(set(starts)) == len(starts), starts


def test_an_upward_import_is_found(tmp_path):
  pkg = tmp_path / "llava_jax"
  (pkg / "data").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "data" / "__init__.py").write_text("")
  (pkg / "data" / "text.py").write_text("from llava_jax import processor\n")
  (pkg / "processor.py").write_text("from llava_jax.data import text\n")
  graph = _cycle_free_without_packages(import_graph(str(pkg)))
  assert [t for t in graph["llava_jax.data.text"] if layer_of(t) < layer_of("llava_jax.data.text")] == \
      ["llava_jax.processor"]
