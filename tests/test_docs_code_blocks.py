"""Every ```python block in README.md and docs/**/*.md runs without error.

Blocks of one page run in order in one shared namespace (later blocks may use names
defined earlier), in a temporary working directory, with matplotlib's Agg backend. A block
is skipped only when the line right before its opening fence is an HTML comment giving
the reason, e.g. ``<!-- skip: needs a GPU -->`` (the reason is shown in the test report),
or ``<!-- requires: transformer_lens -->``, which runs the block when the named modules are
importable and skips it, naming them, when they are not.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")
REQUIRES = re.compile(r"^\s*<!--\s*requires:\s*(?P<modules>[\w., ]+?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None


def _is_python(info: str) -> bool:
    lang = info.strip().split()[0].lstrip("{.").rstrip("}") if info.strip() else ""
    return lang in ("python", "py", "python3")


def extract_blocks(path: Path) -> list[Block]:
    """Fenced python blocks of a Markdown file, with their skip markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, info = m["fence"], m["indent"], m["info"]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # closing fence
        if not _is_python(info):
            continue
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        reason = None
        if skip := SKIP.match(prev):
            reason = skip["reason"]
        elif requires := REQUIRES.match(prev):
            mods = [m.strip() for m in requires["modules"].split(",") if m.strip()]
            missing = [m for m in mods if importlib.util.find_spec(m) is None]
            reason = f"needs {', '.join(missing)} (not installed)" if missing else None
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n", reason))
    return blocks


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    return [f for f in files if f.is_file()]


PAGES = [(f, extract_blocks(f)) for f in _markdown_files()]
PAGES = [(f, b) for f, b in PAGES if b]


def test_extractor_finds_and_skips(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n<!-- skip: needs a GPU -->\n```python\nraise SystemExit\n"
        "```\n\n```bash\nrm -rf /\n```\n\n- item\n\n    ```python\n    y = x + 1\n    ```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [b.code for b in blocks] == ["x = 1\n", "raise SystemExit\n", "y = x + 1\n"]
    assert [b.skip_reason for b in blocks] == [None, "needs a GPU", None]
    assert [b.line for b in blocks] == [3, 8, 18]


def test_requires_marker(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- requires: json -->\n```python\na = 1\n```\n"
        "<!-- requires: json, surely_not_a_module_xyz -->\n```python\nb = 2\n```\n",
        encoding="utf-8",
    )
    reasons = [b.skip_reason for b in extract_blocks(page)]
    assert reasons == [None, "needs surely_not_a_module_xyz (not installed)"]


def test_readme_has_a_runnable_block() -> None:
    readme = extract_blocks(ROOT / "README.md")
    assert any(b.skip_reason is None for b in readme), "README.md must show runnable Python"


@pytest.mark.parametrize("page, blocks", PAGES, ids=[str(f.relative_to(ROOT)) for f, _ in PAGES])
def test_code_blocks_run(
    page: Path, blocks: list[Block], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    skipped = []
    for block in blocks:
        if block.skip_reason is not None:
            skipped.append(f"line {block.line}: {block.skip_reason}")
            continue
        code = compile(block.code, f"{page.relative_to(ROOT)}:{block.line}", "exec")
        try:
            exec(code, namespace)
        except Exception as err:
            raise AssertionError(
                f"{page.relative_to(ROOT)}, block at line {block.line} failed: "
                f"{type(err).__name__}: {err}\n--- block ---\n{block.code}"
            ) from err
        finally:
            try:
                import matplotlib.pyplot as plt

                plt.close("all")
            except ImportError:
                pass
    if skipped and len(skipped) == len(blocks):
        pytest.skip("every block is marked: " + "; ".join(skipped))
