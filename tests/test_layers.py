"""The package's layers import only downwards, and operators talk to other ranks in one place.

Layers, bottom up (CONTRIBUTING.md): ``param_utils``, ``backends``, ``loss_fns``,
``errors`` -> ``operators`` -> ``algorithms`` -> ``cli``, with ``plotting`` a leaf that
imports nothing of the package (the results' ``.plot()`` calls it; the issue's rule that
operators, backends, loss_fns and param_utils never import it still holds). A lower layer
never imports a higher one, not even lazily inside a function: every ``import``
statement of a module (at any depth) and every ``importlib.import_module`` /
``__import__`` of a constant name is read from its syntax tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hessian_eigenthings

PKG = Path(hessian_eigenthings.__file__).resolve().parent
NAME = "hessian_eigenthings"

UPPER = {"algorithms", "cli", "plotting"}
# area (a subpackage or a top-level module) -> the areas it must never import
FORBIDDEN = {
    "param_utils": UPPER | {"operators", "loss_fns", "backends"},
    "errors": UPPER | {"operators", "loss_fns", "backends", "param_utils"},
    "_deprecation": UPPER | {"operators", "loss_fns", "backends", "param_utils"},
    "backends": UPPER | {"operators", "loss_fns"},
    "loss_fns": UPPER | {"operators", "backends"},
    "operators": UPPER,
    "plotting": UPPER | {"operators", "loss_fns", "backends", "param_utils", "errors"},
    "algorithms": {"cli"},
}
# torch.distributed functions that communicate; operators call them only in one module
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
    "send",
    "recv",
}
COLLECTIVES_MODULE = PKG / "operators" / "distributed" / "_collectives.py"


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` (module ``module``) imports, anywhere."""
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                found.add(str(arg.value))
    return found


def _modules(area: str) -> list[tuple[str, Path]]:
    path = PKG / area
    files = sorted(path.rglob("*.py")) if path.is_dir() else [PKG / f"{area}.py"]
    out = []
    for f in files:
        rel = f.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        suffix = ".__init__" if f.name == "__init__.py" else ""
        out.append((".".join([NAME, *parts]) + suffix, f))
    return out


def _violations(area: str) -> list[str]:
    bad = []
    for module, path in _modules(area):
        for target in imported_modules(path.read_text(), module):
            for upper in FORBIDDEN[area]:
                if target == f"{NAME}.{upper}" or target.startswith(f"{NAME}.{upper}."):
                    bad.append(f"{path.relative_to(PKG)} imports {target}")
    return bad


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(area: str) -> None:
    assert _modules(area), f"no modules found for {area}"
    assert _violations(area) == []


def test_the_import_reader_sees_lazy_relative_and_dynamic_imports() -> None:
    source = """
import os
from . import sibling
from ..algorithms import lanczos

def f():
    from hessian_eigenthings.plotting import plot
    import importlib
    return importlib.import_module("hessian_eigenthings.cli.main")
"""
    found = imported_modules(source, "hessian_eigenthings.operators.x")
    assert {
        "os",
        "hessian_eigenthings.operators.sibling",
        "hessian_eigenthings.algorithms.lanczos",
        "hessian_eigenthings.plotting.plot",
        "hessian_eigenthings.cli.main",
    } <= found


def test_operators_issue_collectives_only_in_one_module() -> None:
    """Cross-rank decisions of the operators go through ``_collectives.py``."""
    callers = []
    for _, path in _modules("operators"):
        if path == COLLECTIVES_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in COLLECTIVES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("dist", "distributed")
            ):
                callers.append(f"{path.relative_to(PKG)}:{node.lineno} {node.func.attr}")
    assert callers == []
    assert "all_reduce" in COLLECTIVES_MODULE.read_text()
