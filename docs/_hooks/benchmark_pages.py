"""MkDocs hook: benchmark pages under docs/benchmarks/ join the site automatically.

The benchmark pages are written by the benchmark scripts (one Markdown page per
benchmark, fed by the JSON results). This hook

1. appends every ``docs/benchmarks/*.md`` to the "Benchmarks" section of the navigation
   (``on_config``), so a new page needs no edit of ``mkdocs.yml``;
2. replaces the marker ``<!-- benchmark-pages -->`` in ``benchmarks-overview.md`` with a
   list of links to those pages and their first heading (``on_page_markdown``), so the
   overview never links to a page that does not exist (``strict: true`` would fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKER = "<!-- benchmark-pages -->"
OVERVIEW = "benchmarks-overview.md"


def _pages(docs_dir: str) -> list[tuple[str, str]]:
    pages = []
    for path in sorted((Path(docs_dir) / "benchmarks").glob("*.md")):
        title = path.stem.replace("_", " ").replace("-", " ").capitalize()
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                title = line[2:].strip()
                break
        pages.append((title, f"benchmarks/{path.name}"))
    return pages


def on_config(config: Any) -> Any:
    """Append the benchmark pages found on disk to the "Benchmarks" navigation section."""
    nav = config.get("nav") or []
    for section in nav:
        if isinstance(section, dict) and "Benchmarks" in section:
            entries = section["Benchmarks"]
            listed = {e if isinstance(e, str) else next(iter(e.values())) for e in entries}
            for title, uri in _pages(config["docs_dir"]):
                if uri not in listed:
                    entries.append({title: uri})
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the overview's marker with links to the benchmark pages."""
    if page.file.src_uri != OVERVIEW or MARKER not in markdown:
        return markdown
    pages = _pages(config["docs_dir"])
    if not pages:
        listing = "*No benchmark pages have been generated in this build.*"
    else:
        listing = "\n".join(f"- [{title}]({uri})" for title, uri in pages)
    return markdown.replace(MARKER, listing)
