"""Compact text and HTML summaries of results, for consoles and notebooks.

Jupyter shows an object's ``_repr_html_`` when it has one; these helpers build small
tables from plain values (no eigenvectors, no long arrays), so displaying a result never
prints megabytes of numbers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

__all__ = ["fmt_list", "html_table"]


def fmt_list(values: Sequence[float], *, limit: int = 6, spec: str = ".6g") -> str:
    """``[a, b, ..., z]`` with at most ``limit`` entries shown."""
    shown = [format(float(v), spec) for v in values[:limit]]
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return "[" + ", ".join(shown) + more + "]"


def html_table(
    title: str,
    summary: Sequence[tuple[str, str]],
    header: Sequence[str] = (),
    rows: Sequence[Sequence[str]] = (),
) -> str:
    """A titled key/value summary, optionally followed by a table of ``rows``."""
    esc = html.escape
    parts = [f"<div><strong>{esc(title)}</strong>", "<table>"]
    parts += [
        f"<tr><th style='text-align:left'>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary
    ]
    parts.append("</table>")
    if header:
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</div>")
    return "\n".join(parts)
