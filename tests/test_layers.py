"""The package's layers, written once, and a check of every import against them.

A module may import modules of its own unit and of any unit on a lower row, never one on its own
row or above. Stage modules import libraries and the stage table (`pso_jax.stages`), never another
stage. Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pso_jax")

# Bottom row first. Units on one row may not import each other.
LAYERS = (
    ("pso_jax.errors",),                  # UserError: the one message a user sees
    ("pso_jax.io_utils",),                # atomic writes
    ("pso_jax.progress",),                # progress bars (process 0)
    ("pso_jax.distributed",),             # jax.distributed start-up
    ("pso_jax.parallel",),                # meshes, shardings, host <-> global arrays
    ("pso_jax.workdir",),                 # the run's folder and its config
    ("pso_jax.models",),                  # networks and weight loading
    ("pso_jax.data",),                    # readers, TFDS builder, grain loaders, release files
    ("pso_jax.search",),                  # exact all-pairs similarity kernel
    ("pso_jax.training",),                # checkpoints, metrics, augmentation, supervised fit
    ("pso_jax.diffusion",),               # EDM2 loss, EMA, regulariser, train step, sampler
    ("pso_jax.evaluate",),                # AUROC, diversity, classifier
    ("pso_jax.privacy",),                 # re-id, selection, attacks, PSO statistics, canaries
    ("pso_jax.report",),                  # HTML and figures
    ("pso_jax.stages",),                  # one module per --mode, and the stage table
    ("pso_jax.main",),                    # the entry point
    ("pso_jax.bench", "pso_jax.tools"),   # command-line programs on top; nothing imports them
)


def unit_of(module: str):
  """(row, unit) of a dotted module name; the longest unit that is a prefix of it."""
  best = None
  for row, units in enumerate(LAYERS):
    for unit in units:
      if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
        best = (row, unit)
  return best


def module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules():
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(root, f)


def imported_modules(path: str, known: set) -> set:
  """pso_jax modules `path` imports: `from pso_jax.a import b` names pso_jax.a.b if that is a
  module, else pso_jax.a."""
  tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
  here = module_name(path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("pso_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = here.split(".")
        is_pkg = path.endswith("__init__.py")
        parts = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([base] if base else []))
      if not base.startswith("pso_jax"):
        continue
      for a in node.names:
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return found


def violations(modules: dict) -> list[str]:
  """'source -> target: why' for each import against the layer order."""
  out = []
  for source, targets in sorted(modules.items()):
    if source == "pso_jax":  # the package's own __init__: a docstring and the version
      continue
    src = unit_of(source)
    assert src is not None, f"{source} is on no row of LAYERS: add it where it belongs"
    for target in sorted(targets):
      tgt = unit_of(target)
      if tgt is None or target == "pso_jax":
        continue
      if src[1] == tgt[1]:
        if (src[1] == "pso_jax.stages" and source != "pso_jax.stages" and target != "pso_jax.stages"
            and target != source):
          out.append(f"{source} -> {target}: a stage imports another stage (move the shared code "
                     "into a library)")
        continue
      if tgt[0] >= src[0]:
        out.append(f"{source} -> {target}: {tgt[1]} is not below {src[1]} in LAYERS")
  return out


def import_graph() -> dict:
  paths = list(package_modules())
  known = {module_name(p) for p in paths}
  return {module_name(p): imported_modules(p, known) for p in paths}


def folder_cycle(modules: dict):
  """A cycle among folders (pso_jax.x), or None."""
  def folder(m):
    return ".".join(m.split(".")[:2])
  edges = {}
  for s, ts in modules.items():
    for t in ts:
      if folder(s) != folder(t) and t != "pso_jax":
        edges.setdefault(folder(s), set()).add(folder(t))
  state = {}

  def visit(n, stack):
    state[n] = 1
    for m in sorted(edges.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m] if m in stack else [n, m]
      if not state.get(m):
        found = visit(m, stack + [m])
        if found:
          return found
    state[n] = 2
    return None

  for n in sorted(edges):
    if not state.get(n):
      found = visit(n, [n])
      if found:
        return found
  return None


def test_every_import_follows_the_layers():
  bad = violations(import_graph())
  assert not bad, "imports against the layer order:\n  " + "\n  ".join(bad)


def test_folders_import_each_other_without_cycles():
  cycle = folder_cycle(import_graph())
  assert cycle is None, "folders import each other in a cycle: " + " -> ".join(cycle)


def test_every_module_is_on_a_row():
  missing = [m for m in import_graph() if unit_of(m) is None and m != "pso_jax"]
  assert not missing, f"modules on no row of LAYERS: {missing}"


# The checks themselves, on planted faults: each must be caught.
@pytest.mark.parametrize("source,target,needle", [
    ("pso_jax.diffusion.sampler", "pso_jax.stages.train", "not below"),      # library -> stage
    ("pso_jax.data.pipeline", "pso_jax.training.checkpoint", "not below"),   # upward library
    ("pso_jax.training.metrics", "pso_jax.bench.matmul", "not below"),       # anything -> bench
    ("pso_jax.stages.select", "pso_jax.stages.sample", "another stage"),     # stage -> stage
    ("pso_jax.evaluate.utility", "pso_jax.privacy.pso", "not below"),        # same-height sideways
])
def test_planted_upward_import_is_caught(source, target, needle):
  graph = import_graph()
  graph.setdefault(source, set()).add(target)
  bad = violations(graph)
  assert any(b.startswith(f"{source} -> {target}") and needle in b for b in bad), bad


def test_planted_folder_cycle_is_caught():
  graph = {"pso_jax.data.a": {"pso_jax.models.b"}, "pso_jax.models.b": {"pso_jax.data.c"}}
  assert folder_cycle(graph) is not None
  assert folder_cycle({"pso_jax.data.a": {"pso_jax.models.b"}}) is None


def test_relative_and_lazy_imports_are_read(tmp_path):
  mod = tmp_path / "m.py"
  mod.write_text("def f():\n  from pso_jax.stages import train\n  import pso_jax.bench.matmul\n")
  found = imported_modules(str(mod), {"pso_jax.stages.train"})
  assert found == {"pso_jax.stages.train", "pso_jax.bench.matmul"}
