"""Import architecture: chainjax has no import cycle, config and errors stay light, and main/train stay on top.

The design has rooms that talk one way: main -> train -> experiment -> {chain, optim, stages, data, ...}, with
`chainjax.config` (schema and validation) and `chainjax.errors` (the exceptions) importable on their own. A cycle
hidden behind a lazy import (`config.validate` importing `chain`, `chain` importing `config`) still couples the two
modules, and surfaces as a partially initialised module the day someone hoists the import. These tests read the
sources with `ast` (nothing is imported, so a cycle is found even when import order happens to hide it), counting
imports inside functions as dependencies too, and say which file and line to cut.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "chainjax"
CYCLE_LIMIT = 50  # cycles listed per component: enough to show where to cut


class Edge:
  """One import statement of a chainjax module by a chainjax module."""

  def __init__(self, source: str, target: str, path: str, line: int, function: str | None):
    self.source, self.target, self.path, self.line, self.function = source, target, path, line, function

  def where(self) -> str:
    lazy = f" (lazy, in {self.function})" if self.function else ""
    return f"{self.path}:{self.line}{lazy}"


def _modules(repo: str = REPO) -> dict[str, str]:
  """Module name -> path relative to `repo`, for every .py file under chainjax/ (a package is its __init__)."""
  modules = {}
  for root, dirs, files in os.walk(os.path.join(repo, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.relpath(os.path.join(root, name), repo)
      parts = path[:-len(".py")].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join(parts)] = path
  return modules


def _is_type_checking(test: ast.expr) -> bool:
  """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
  return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
          or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


class _ImportCollector(ast.NodeVisitor):
  """Every import statement at any depth (module level, functions, classes, try blocks), except under TYPE_CHECKING."""

  def __init__(self):
    self.imports: list[tuple[ast.Import | ast.ImportFrom, str | None]] = []
    self._functions: list[str] = []

  def _visit_scope(self, node):
    self._functions.append(node.name)
    self.generic_visit(node)
    self._functions.pop()

  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope

  def visit_If(self, node: ast.If):
    if _is_type_checking(node.test):
      for child in node.orelse:  # the `else:` of a TYPE_CHECKING block does run
        self.visit(child)
      return
    self.generic_visit(node)

  def _record(self, node):
    self.imports.append((node, ".".join(self._functions) or None))

  visit_Import = visit_ImportFrom = _record


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: dict[str, str]) -> Iterator[str]:
  """The chainjax modules one import statement in `module` depends on (each once)."""

  def known(name: str) -> str | None:
    """`name` if it is a chainjax module, else the nearest enclosing chainjax module (an attribute's owner)."""
    while name:
      if name in modules:
        return name
      name = name.rpartition(".")[0]
    return None

  if isinstance(node, ast.Import):
    for alias in node.names:
      if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
        target = known(alias.name)
        if target:
          yield target
    return
  if node.level:  # relative: `from . import x` in chainjax/data/text.py is `from chainjax.data import x`
    parts = module.split(".")
    if not is_package:
      parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    base = ".".join(parts + ([node.module] if node.module else []))
  else:
    base = node.module or ""
  if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
    return
  for alias in node.names:
    submodule = f"{base}.{alias.name}"
    # `from chainjax import chain as chain_lib` imports the module chainjax.chain;
    # `from chainjax.errors import ConfigError` imports chainjax.errors.
    target = submodule if submodule in modules else known(base)
    if target:
      yield target


def _edges(repo: str = REPO) -> list[Edge]:
  """Every chainjax -> chainjax import (a package's __init__ importing its own submodules included: it runs)."""
  modules = _modules(repo)
  edges = []
  for module, path in modules.items():
    is_package = path.endswith("__init__.py")
    with open(os.path.join(repo, path), encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    collector = _ImportCollector()
    collector.visit(tree)
    for node, function in collector.imports:
      for target in dict.fromkeys(_resolve(node, module, is_package, modules)):  # one edge per statement
        if target != module:
          edges.append(Edge(module, target, path, node.lineno, function))
  return edges


def _strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm (iterative): the components of more than one module."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))
  return components


def _elementary_cycles(graph: dict[str, set[str]], component: list[str], limit: int) -> list[list[str]]:
  """Each simple cycle within one component once, starting at its smallest module (at most `limit`)."""
  members = set(component)
  cycles = []
  for start in component:
    allowed = {m for m in members if m >= start}

    def walk(path: list[str]):
      for child in sorted(graph[path[-1]] & allowed):
        if len(cycles) >= limit:
          return
        if child == start:
          cycles.append(path + [start])
        elif child not in path:
          walk(path + [child])

    walk([start])
  return cycles


def _within_one_package(cycle: list[str], packages: set[str]) -> bool:
  """A package's __init__ and its own submodules importing each other, e.g. data -> data.base -> data: fine.

  Such a cycle never leaves the package, and its __init__ importing its submodules is how a package is built.
  A cycle that only passes through a package (config -> data -> data.tfds_data -> config) is not excused.
  """
  return any(package in cycle and all(m == package or m.startswith(package + ".") for m in cycle)
             for package in packages)


def _cycle_report(repo: str = REPO) -> list[str]:
  """One line per component of modules that import each other, then each cycle in it with its import sites."""
  edges = _edges(repo)
  graph: dict[str, set[str]] = {module: set() for module in _modules(repo)}
  sites: dict[tuple[str, str], list[Edge]] = {}
  for edge in edges:
    graph[edge.source].add(edge.target)
    sites.setdefault((edge.source, edge.target), []).append(edge)
  packages = {module for module, path in _modules(repo).items() if path.endswith("__init__.py")}
  lines = []
  for component in _strongly_connected_components(graph):
    found = _elementary_cycles(graph, component, CYCLE_LIMIT)
    cycles = [cycle for cycle in found if not _within_one_package(cycle, packages)]
    if not cycles:
      continue
    lines.append(f"modules in one cycle: {', '.join(sorted({m for cycle in cycles for m in cycle}))}")
    if len(found) == CYCLE_LIMIT:
      lines.append(f"  (the first {CYCLE_LIMIT} cycles of this component; there may be more)")
    for cycle in cycles:
      lines.append("  " + " -> ".join(cycle))
      for source, target in zip(cycle, cycle[1:]):
        where = "; ".join(edge.where() for edge in sites[(source, target)])
        lines.append(f"    {source} -> {target}: {where}")
  return lines


def test_package_has_no_import_cycle():
  lines = _cycle_report()
  assert not lines, ("chainjax has import cycles (imports inside functions count); cut one edge of each, e.g. by "
                     "moving what both need into a module that imports neither:\n" + "\n".join(lines))


def test_cycle_check_sees_lazy_and_relative_imports_but_not_type_checking(tmp_path):
  """The checker itself, on a made-up package: what it must find, and what it must not."""
  files = {
      "__init__.py": "",
      "errors.py": "class ConfigError(ValueError):\n  pass\n",
      "config.py": ("from chainjax.errors import ConfigError\n"
                    "def validate(config):\n"
                    "  from chainjax import chain as chain_lib\n"
                    "  from chainjax import data\n"),
      "chain.py": "import chainjax.errors\nfrom . import config\n",  # relative: chain -> config
      "data/__init__.py": ("from chainjax.data import base\n"
                           "from .base import Task\n"
                           "def get_task():\n"
                           "  from chainjax.data import tfds\n"),
      "data/tfds.py": "from chainjax.config import ConfigError\n",  # config -> data -> data.tfds -> config
      "data/base.py": ("from typing import TYPE_CHECKING\n"
                       "if TYPE_CHECKING:\n"
                       "  from chainjax import config\n"  # never runs: no edge
                       "else:\n"
                       "  from ..errors import ConfigError\n"
                       "import chainjax.data\n"),  # base -> its package's __init__: a cycle with data/__init__
  }
  for name, text in files.items():
    path = tmp_path / PACKAGE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  edges = {(edge.source, edge.target) for edge in _edges(str(tmp_path))}
  assert edges == {("chainjax.config", "chainjax.errors"), ("chainjax.config", "chainjax.chain"),
                   ("chainjax.config", "chainjax.data"), ("chainjax.chain", "chainjax.errors"),
                   ("chainjax.chain", "chainjax.config"), ("chainjax.data", "chainjax.data.base"),
                   ("chainjax.data", "chainjax.data.tfds"), ("chainjax.data.base", "chainjax.errors"),
                   ("chainjax.data.base", "chainjax.data"), ("chainjax.data.tfds", "chainjax.config")}
  report = _cycle_report(str(tmp_path))
  assert report == [
      "modules in one cycle: chainjax.chain, chainjax.config, chainjax.data, chainjax.data.tfds",
      "  chainjax.chain -> chainjax.config -> chainjax.chain",
      "    chainjax.chain -> chainjax.config: chainjax/chain.py:2",
      "    chainjax.config -> chainjax.chain: chainjax/config.py:3 (lazy, in validate)",
      "  chainjax.config -> chainjax.data -> chainjax.data.tfds -> chainjax.config",
      "    chainjax.config -> chainjax.data: chainjax/config.py:4 (lazy, in validate)",
      "    chainjax.data -> chainjax.data.tfds: chainjax/data/__init__.py:4 (lazy, in get_task)",
      "    chainjax.data.tfds -> chainjax.config: chainjax/data/tfds.py:1",
  ]  # data -> data.base -> data stays inside its package: not reported


def _modules_after_import(module: str) -> list[str]:
  """`sys.modules` after `import <module>` in a fresh interpreter (no conftest, no jax unless it pulls it in)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  code = f"import sys; import {module}; print('\\n'.join(sorted(sys.modules)))"
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, f"import {module} failed:\n{result.stderr}"
  return result.stdout.split()


def _loaded(modules: list[str], names) -> list[str]:
  return sorted(m for m in modules if any(m == name or m.startswith(name + ".") for name in names))


def test_config_imports_no_model_code():
  """`import chainjax.config` stays cheap: a config file, `--help` and validation errors need no jax or TFDS."""
  forbidden = ("jax", "flax", "optax", "chainjax.chain", "chainjax.stages", "chainjax.train", "tensorflow",
               "tensorflow_datasets")
  loaded = _loaded(_modules_after_import("chainjax.config"), forbidden)
  assert not loaded, f"import chainjax.config loads {', '.join(loaded)}; import them in the functions that need them"


def test_errors_imports_no_other_chainjax_module():
  """Every module may import `chainjax.errors` only because it imports nothing of chainjax back."""
  loaded = [m for m in _loaded(_modules_after_import("chainjax.errors"), [PACKAGE])
            if m not in (PACKAGE, "chainjax.errors")]
  assert not loaded, f"import chainjax.errors loads {', '.join(loaded)}; errors.py must import nothing of chainjax"


@pytest.mark.parametrize("target, allowed", [("chainjax.train", {"chainjax.main"}), ("chainjax.main", set())])
def test_nothing_imports_train_or_main(target, allowed):
  """Rooms talk one way, main -> train -> experiment -> {chain, optim, ...}: nothing below reaches back up."""
  wrong = [edge for edge in _edges() if edge.target == target and edge.source not in allowed]
  assert not wrong, (f"{target} is imported by a module below it (only {sorted(allowed) or 'nothing'} may):\n"
                     + "\n".join(f"  {edge.source} -> {target}: {edge.where()}" for edge in wrong))
