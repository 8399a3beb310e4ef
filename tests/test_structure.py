"""The repository's structure, read from its import statements (ast: nothing is imported).

The rules (docs/ARCHITECTURE.md draws them):
  * every import of a module of cdx/, configs/ or launch/ follows ALLOWED below: the
    layers run paths → models → distill → train → launch; models know no training, data
    knows no models, nothing under cdx/ imports configs/ or launch/;
  * no import circles among these modules, counting function-local imports too;
  * a function-local import of a cdx module from cdx/ is listed in LAZY with why it is
    local (launch/ imports lazily at will: its CLIs parse flags before loading jax);
  * no Python file is over MAX_LINES lines, except those in LONG (with the reason);
  * docs/ARCHITECTURE.md names every module.
"""
import ast
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("cdx", "configs", "launch")
MAX_LINES = 600

# unit -> the units its modules may import (a unit may always import its own modules, and
# everyone may import the bare `cdx` package). A module belongs to the longest unit that
# prefixes its name; every module must belong to one. Read it bottom-up:
ALLOWED: dict[str, set[str]] = {
    # Below everything: parameter paths and path rules; config errors and flag parsing.
    "cdx.paths": set(),
    "cdx.config": set(),
    # Infrastructure: meshes and shardings; checkpoints and the host collectives.
    "cdx.parallel": {"cdx.paths"},
    "cdx.checkpoint": {"cdx.paths"},
    # Models: pure functions of params; they know no training, data or evaluation.
    "cdx.models": {"cdx.paths", "cdx.parallel"},
    # Data: sources, templates, prompts, pipelines, the synthetic world; no models.
    "cdx.data": {"cdx.paths", "cdx.config"},
    # HF import/export of the models, and the one reader of a finished model.
    "cdx.hf": {"cdx.models", "cdx.paths"},
    "cdx.trained": {"cdx.checkpoint", "cdx.hf", "cdx.models"},
    # Written into HF export dirs as remote code: torch only, no cdx at all.
    "cdx.modeling_cdx_llava": set(),
    # The objective (losses, layer matching, TAF), and analyses built on its forward.
    "cdx.distill": {"cdx.models", "cdx.paths", "cdx.parallel"},
    "cdx.analysis": {"cdx.distill", "cdx.models", "cdx.data", "cdx.paths", "cdx.parallel"},
    # The two consumers, side by side: training builds and trains an experiment,
    # evaluation reads a finished model (cdx.trained); neither imports the other.
    "cdx.train": {"cdx.paths", "cdx.config", "cdx.parallel", "cdx.checkpoint", "cdx.models",
                  "cdx.data", "cdx.hf", "cdx.trained", "cdx.distill", "cdx.analysis"},
    "cdx.eval": {"cdx.paths", "cdx.config", "cdx.parallel", "cdx.checkpoint", "cdx.models",
                 "cdx.data", "cdx.hf", "cdx.trained", "cdx.distill", "cdx.analysis"},
    # Stage recipes: ConfigDicts built from the config helpers; no training code.
    "configs": {"cdx.config", "cdx.parallel", "cdx.paths"},
    # Entry points: anything.
    "launch": {"cdx.paths", "cdx.config", "cdx.parallel", "cdx.checkpoint", "cdx.models",
               "cdx.data", "cdx.hf", "cdx.trained", "cdx.modeling_cdx_llava", "cdx.distill",
               "cdx.analysis", "cdx.train", "cdx.eval", "configs"},
}

# (importer, imported) -> why a module under cdx/ imports a cdx module inside a function.
LAZY: dict[tuple[str, str], str] = {
    ("cdx.data.check", "cdx.data.pipeline"):
        "the CLI builds examples only with --tokenizer; grain is loaded only then",
    ("cdx.data.check", "cdx.data.tokenizer"):
        "the CLI loads a tokenizer (transformers) only with --tokenizer",
    ("cdx.data.synthetic.export", "cdx.data.tokenizer"):
        "transformers/tokenizers are loaded only when `ensure` trains the tokenizer",
    ("cdx.train.setup", "cdx.data.synthetic.export"):
        "only the tiny presets render the synthetic world",
}

# path -> why it may be longer than MAX_LINES.
LONG: dict[str, str] = {}


# ----------------------------------------------------------------------------- reading

def _modules() -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module of PACKAGES (a package is its __init__.py)."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      if "__pycache__" in path.parts:
        continue
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str:
  """The module a dotted name is found in (its longest prefix that is a module)."""
  while name not in MODULES and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


class _Imports(ast.NodeVisitor):
  """Collects (imported module, line, local?) of one module's imports of PACKAGES."""

  def __init__(self, module: str, is_package: bool):
    self.module, self.is_package = module, is_package
    self.found: list[tuple[str, int, bool]] = []
    self._depth = 0

  def _function(self, node):
    self._depth += 1
    self.generic_visit(node)
    self._depth -= 1

  visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

  def _add(self, name: str, line: int):
    if name.split(".")[0] in PACKAGES:
      self.found.append((_resolve(name), line, self._depth > 0))

  def visit_Import(self, node):
    for alias in node.names:
      self._add(alias.name, node.lineno)

  def visit_ImportFrom(self, node):
    base = node.module or ""
    if node.level:
      here = self.module.split(".")[:None if self.is_package else -1]
      here = here[:len(here) - (node.level - 1)]
      base = ".".join(here + ([base] if base else []))
    for alias in node.names:  # `from pkg import mod` imports the module pkg.mod.
      full = f"{base}.{alias.name}"
      self._add(full if full in MODULES else base, node.lineno)


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
  out = {}
  for module, path in MODULES.items():
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    out[module] = visitor.found
  return out


IMPORTS = _imports()


def unit_of(module: str) -> str | None:
  """The longest unit of ALLOWED that is `module` or one of its packages."""
  units = [u for u in ALLOWED if module == u or module.startswith(u + ".")]
  return max(units, key=len) if units else None


def _where(module: str, line: int) -> str:
  return f"{MODULES[module].relative_to(ROOT)}:{line}"


# ------------------------------------------------------------------------------- tests

def test_the_table_is_a_layering():
  """ALLOWED names only units, and its units import each other without a circle."""
  for unit, deps in ALLOWED.items():
    assert unit not in deps and deps <= set(ALLOWED), unit
  assert not _circles({u: sorted(deps) for u, deps in ALLOWED.items()})
  # The spine of the layering, spelled out.
  assert "cdx.train" not in ALLOWED["cdx.distill"] | ALLOWED["cdx.models"]
  assert "cdx.distill" not in ALLOWED["cdx.models"]
  for unit in ("cdx.train", "cdx.distill", "cdx.data", "cdx.eval", "cdx.analysis"):
    assert unit not in ALLOWED["cdx.models"]
  assert "cdx.models" not in ALLOWED["cdx.data"]
  assert all(not ({"configs", "launch"} & deps) for u, deps in ALLOWED.items()
             if u.startswith("cdx"))


def test_every_module_is_placed():
  assert MODULES, ROOT
  unplaced = sorted(m for m in MODULES if m != "cdx" and unit_of(m) is None)
  assert not unplaced, (f"modules in no unit of ALLOWED: {unplaced}; add each one's unit "
                        "to ALLOWED in tests/test_structure.py and docs/ARCHITECTURE.md.")


def test_imports_follow_the_layers():
  bad = []
  for module, found in IMPORTS.items():
    mine = unit_of(module)
    for target, line, local in found:
      theirs = unit_of(target)
      if target == "cdx" or theirs == mine or theirs in ALLOWED.get(mine, ()):
        continue
      bad.append(f"{_where(module, line)}: {module} ({mine}) imports {target} ({theirs})"
                 + (" inside a function" if local else ""))
  assert not bad, ("imports against the layering of ALLOWED (tests/test_structure.py):\n  "
                   + "\n  ".join(bad))


def _circles(graph: dict[str, list[str]]) -> list[str]:
  """The circles a depth-first walk of `graph` ({node: [nodes it imports]}) meets."""
  state: dict[str, int] = {}
  circles = []

  def visit(node, trail):
    if state.get(node) == 1:
      circles.append(" -> ".join(trail[trail.index(node):] + [node]))
      return
    if state.get(node) is None:
      state[node] = 1
      for target in graph.get(node, ()):
        visit(target, trail + [node])
      state[node] = 2

  for node in sorted(graph):
    visit(node, [])
  return circles


def test_no_import_circles():
  """Among all modules, counting function-local imports: a local import that closes a
  circle only hides it."""
  graph = {m: sorted({t for t, _, _ in found if t in MODULES and t != m})
           for m, found in IMPORTS.items()}
  circles = _circles(graph)
  assert not circles, "import circles:\n  " + "\n  ".join(circles)


def test_local_imports_under_cdx_are_justified():
  found = {(m, t): _where(m, line) for m, imports in IMPORTS.items() if m.startswith("cdx")
           for t, line, local in imports if local}
  unlisted = sorted(f"{where}: {m} imports {t}" for (m, t), where in found.items()
                    if (m, t) not in LAZY)
  assert not unlisted, (
      "function-local imports under cdx/ without a reason in LAZY (tests/test_structure.py)"
      "; import at the top, or list why it must be local:\n  " + "\n  ".join(unlisted))
  stale = sorted(set(LAZY) - set(found))
  assert not stale, f"LAZY lists imports that are no longer local: {stale}"


def test_no_file_is_too_long():
  lengths = {}
  for top in PACKAGES + ("tests", "docs"):
    for path in (ROOT / top).rglob("*.py"):
      if "__pycache__" not in path.parts:
        with open(path, encoding="utf-8") as f:
          lengths[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
  too_long = sorted(f"{p}: {n} lines" for p, n in lengths.items()
                    if n > MAX_LINES and p not in LONG)
  assert not too_long, (f"files over {MAX_LINES} lines (split them, or give the reason in "
                        "LONG of tests/test_structure.py):\n  " + "\n  ".join(too_long))
  stale = sorted(p for p in LONG if lengths.get(p, 0) <= MAX_LINES)
  assert not stale, f"LONG lists files that are not over {MAX_LINES} lines: {stale}"


def test_the_rules_catch_violations():
  """The import reader sees relative, `from pkg import mod`, and function-local imports."""
  source = ("from . import mllm\nfrom cdx.train import step\nimport cdx.eval.scoring\n"
            "def f():\n  from cdx.data import templates\n")
  visitor = _Imports("cdx.models.qwen", is_package=False)
  visitor.visit(ast.parse(source))
  assert visitor.found == [("cdx.models.mllm", 1, False), ("cdx.train.step", 2, False),
                           ("cdx.eval.scoring", 3, False), ("cdx.data.templates", 5, True)]
  assert [unit_of(t) in ALLOWED["cdx.models"] | {"cdx.models"}
          for t, _, _ in visitor.found] == [True, False, False, False]
  # The step <-> reference circle the objective's move removed, seen through a local import.
  assert _circles({"step": ["reference"], "reference": ["step"], "losses": []}) == [
      "reference -> step -> reference"]
  assert _circles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_the_architecture_picture_names_every_module():
  """docs/ARCHITECTURE.md draws every module: a new one goes into the picture too."""
  text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
  missing = sorted(str(path.relative_to(ROOT)) for path in MODULES.values()
                   if (path.parent.name + "/" if path.name == "__init__.py" else path.name)
                   not in text)
  assert not missing, f"modules docs/ARCHITECTURE.md does not name: {missing}"
