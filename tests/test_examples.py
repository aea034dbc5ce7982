"""Every example in examples/ runs to completion in its fast mode.

Examples are discovered by glob, so new ones join automatically. Each runs as a
subprocess with ``--fast``; an example whose source mentions ``torchrun`` is launched with
``torchrun --nproc_per_node=2`` (skipped if torchrun is not installed). An example that
imports an optional third-party package which is not installed (``transformers``,
``transformer_lens``, ...) is skipped with the package's name as the reason.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py")) if (ROOT / "examples").is_dir() else []
TIMEOUT_S = 300


def top_level_modules(path: Path) -> set[str]:
    """Top-level package names an example imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def missing_modules(path: Path) -> list[str]:
    return sorted(
        m
        for m in top_level_modules(path)
        if m not in sys.stdlib_module_names and importlib.util.find_spec(m) is None
    )


def uses_torchrun(path: Path) -> bool:
    return "torchrun" in path.read_text(encoding="utf-8")


def test_examples_exist() -> None:
    assert (ROOT / "examples" / "supervised_mlp.py") in EXAMPLES


def test_import_scan_sees_optional_packages(tmp_path: Path) -> None:
    src = tmp_path / "ex.py"
    src.write_text("import os\nfrom transformers import AutoModel\nimport torch.nn as nn\n")
    assert top_level_modules(src) == {"os", "transformers", "torch"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs_fast(example: Path, tmp_path: Path) -> None:
    missing = missing_modules(example)
    if missing:
        pytest.skip(f"{example.name} needs {', '.join(missing)} (not installed)")
    if uses_torchrun(example):
        torchrun = shutil.which("torchrun")
        if torchrun is None:
            pytest.skip("torchrun is not installed")
        cmd = [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            str(example),
            "--fast",
        ]
    else:
        cmd = [sys.executable, str(example), "--fast"]
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    assert proc.stdout.strip(), f"{example.name} printed nothing"
