"""The import graph of svdq_cli stays what docs/DESIGN.md §3 draws: packages in layers, imports going one way.

Checked on the source (``ast``), every import counted (function bodies included, ``if TYPE_CHECKING`` ones too):
- a module imports only from its own package or from a lower layer of :data:`LAYERS`;
- no import cycle between modules;
- a package's ``__init__`` holds its docstring only (the root's lazy public API aside), so no module imports
  back up into its package;
- outside ``cli/`` (whose commands load the pipeline on use, to keep ``svdq --help`` fast), an import inside a
  function is of a heavy or optional third-party library (:data:`LAZY_LIBRARIES`), never of svdq or the
  standard library.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "svdq_cli"
LAYERS = (  # top to bottom; a module may import its own package and anything in a later row
    ("__main__",),
    ("cli",),
    ("api",),
    ("ship",),
    ("evaluation",),
    ("stages",),
    ("run",),
    ("formats",),
    ("engines",),
    ("models",),
    ("calibration",),
    ("runtime",),
    ("methods",),
    ("quant",),
    ("system",),
    ("errors", "version"),
)
LAZY_LIBRARIES = {  # imported on use: slow to import, or optional extras
    "diffusers", "transformers", "accelerate", "huggingface_hub", "datasets", "safetensors", "tokenizers",
    "torchmetrics", "cupy", "psutil", "PIL", "yaml", "torch", "kernels", "ImageReward",
}


def module_name(path: Path) -> str:
    parts = ["svdq_cli", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported svdq module or third-party top name, line, inside a function) for each import of ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the module
                target = f"{source}.{alias.name}"
                found.append((target if target in MODULES else source, node.lineno, id(node) in in_function))
    return found


def internal(target: str) -> bool:
    return target == "svdq_cli" or target.startswith("svdq_cli.")


def layer(name: str) -> int:
    top = name.split(".")[1] if name.count(".") else "__init__"
    return next(index for index, row in enumerate(LAYERS) if top in row)


def top_package(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


def test_every_module_sits_in_a_layer():
    unplaced = sorted({top_package(name) for name in MODULES if name != "svdq_cli"}
                      - {entry for row in LAYERS for entry in row})
    assert not unplaced, f"add these to LAYERS (and docs/DESIGN.md §3): {unplaced}"


@pytest.mark.parametrize("name", [name for name in MODULES if name != "svdq_cli"])
def test_imports_go_down_the_layers(name):
    upward = [f"line {line}: {target}" for target, line, _ in imports(name)
              if internal(target) and target != "svdq_cli" and top_package(target) != top_package(name)
              and layer(target) <= layer(name)]
    assert not upward, f"{name} imports a package above or beside its own: {upward}"


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in imports(name) if t in MODULES and t != name} for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " → ".join(cycle))


@pytest.mark.parametrize("path", [p for p in MODULES.values() if p.name == "__init__.py" and p.parent != PACKAGE],
                         ids=lambda p: str(p.parent.relative_to(PACKAGE)))
def test_package_inits_hold_a_docstring_only(path):
    body = ast.parse(path.read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), \
        f"{path}: a package's __init__ says what the package owns and what it may import, and nothing else"


@pytest.mark.parametrize("name", [name for name in MODULES if top_package(name) != "cli"])
def test_function_body_imports_are_of_heavy_libraries_only(name):
    stdlib = set(sys.stdlib_module_names)
    wrong = [f"line {line}: {target}" for target, line, inside in imports(name)
             if inside and (internal(target) or target.split(".")[0] in stdlib
                            or target.split(".")[0] not in LAZY_LIBRARIES)]
    assert not wrong, f"{name}: import these at the top of the module: {wrong}"


def test_the_checker_sees_an_upward_import_a_cycle_and_a_lazy_internal_import(tmp_path, monkeypatch):
    """The rules can fail: a planted upward import, cycle and function-body import are each reported."""
    fake = tmp_path / "svdq_cli"
    (fake / "quant").mkdir(parents=True)
    (fake / "stages").mkdir()
    (fake / "__init__.py").write_text('"""root"""\n')
    (fake / "quant" / "__init__.py").write_text('"""quant"""\nfrom . import a\n')
    (fake / "quant" / "a.py").write_text("from ..stages import s\n")
    (fake / "quant" / "b.py").write_text("def f():\n    from . import a\n")
    (fake / "stages" / "__init__.py").write_text('"""stages"""\n')
    (fake / "stages" / "s.py").write_text("from ..quant import a\n")
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "PACKAGE", fake)
    monkeypatch.setattr(module, "MODULES", {module_name(p): p for p in sorted(fake.rglob("*.py"))})
    with pytest.raises(AssertionError, match="svdq_cli.stages.s"):
        test_imports_go_down_the_layers("svdq_cli.quant.a")
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="import these at the top"):
        test_function_body_imports_are_of_heavy_libraries_only("svdq_cli.quant.b")
    with pytest.raises(AssertionError, match="says what the package owns"):
        test_package_inits_hold_a_docstring_only(fake / "quant" / "__init__.py")
