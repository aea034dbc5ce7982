"""The lines a command prints about its results: tables, both ends, error-bar hints.

Everything here turns results into text (and the matching JSON summary); nothing
computes. The rules:

- Eigenvalue tables say which end was asked for (``--which``) and give each pair's
  residual norm and whether it converged.
- Both ends, always: the largest and the smallest eigenvalue *found* by any stage (Ritz
  values of Lanczos and of the density's quadrature; each lies inside the spectrum, so
  the spectrum reaches at least from the smallest to the largest), and the density's
  negative mass with its error bar when the result has one. One note line when the
  negative end dominates (its magnitude exceeds the largest positive eigenvalue).
- A hint when an error bar is larger than a tenth of its estimate, naming the option
  that shrinks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "OPERATOR_LABELS",
    "WHICH_WORDS",
    "both_ends",
    "capitalized",
    "eigen_lines",
    "error_bar_hint",
    "plural",
]

OPERATOR_LABELS = {"hessian": "Hessian", "ggn": "GGN", "fisher": "empirical Fisher"}
WHICH_WORDS = {
    "LM": "largest magnitude",
    "LA": "largest (algebraic)",
    "SA": "smallest (algebraic)",
}
# An error bar larger than this fraction of its estimate gets a hint.
HINT_RATIO = 0.1


def capitalized(label: str) -> str:
    """``label`` at the start of a sentence: ``"empirical Fisher"`` -> ``"Empirical Fisher"``."""
    return label[:1].upper() + label[1:]


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 batch"``, ``"3 batches"``, ``"1,024 tokens"`` (thousands separated)."""
    if count == 1:
        return f"1 {word}"
    if many is None:
        many = word + ("es" if word.endswith(("s", "sh", "ch", "x", "z")) else "s")
    return f"{count:,} {many}"


def error_bar_hint(
    what: str, estimate: float, stderr: float, remedy: str, *, floor: float = 0.0
) -> str | None:
    """A hint line when ``stderr > 0.1 |estimate|`` (and ``stderr > floor``), else ``None``.

    Args:
        what: Name of the quantity (``"Hessian trace"``).
        estimate: The estimate.
        stderr: Its standard error.
        remedy: What to change, e.g. ``"raise --trace-matvecs (now 60)"``.
        floor: Error bars up to this size never get a hint (for masses near 0, whose
            relative error says little).
    """
    if not (math.isfinite(stderr) and math.isfinite(estimate)):
        return None
    if stderr > HINT_RATIO * abs(estimate) and stderr > floor:
        return (
            f"  hint: {what} {estimate:.3g} +/- {stderr:.2g}: the error bar is larger than a "
            f"tenth of the estimate; {remedy}"
        )
    return None


def eigen_lines(label: str, result: Any, *, remedy: str | None = None) -> list[str]:
    """The eigenvalue table of one Lanczos result, and a line on pairs that did not converge.

    Args:
        label: Operator label (``"Hessian"``).
        result: An :class:`~hessian_eigenthings.EigenResult`.
        remedy: What to change when pairs did not converge (e.g. ``"raise
            --lanczos-matvecs"``); ``None`` says nothing about it.
    """
    k = result.k
    which = WHICH_WORDS.get(result.which, result.which)
    lines = [
        f"Top-{k} {label} eigenvalues ({which}; Lanczos, {plural(result.num_matvecs, 'matvec')}"
        f"; residual = ||A v - lambda v||):"
    ]
    for i in range(k):
        flag = "" if bool(result.converged[i]) else "   not converged"
        lines.append(
            f"  {i + 1:>2}  {float(result.eigenvalues[i]):>12.5g}   "
            f"residual {float(result.residuals[i]):.2e}{flag}"
        )
    missing = k - int(result.converged.sum())
    if missing:
        why = {
            "max_iter": "the matvec budget ran out",
            "time_limit": "--time-limit stopped it",
        }.get(result.stop_reason, f"stop reason {result.stop_reason!r}")
        line = f"  {missing} of {k} pairs did not meet the tolerance ({why})"
        if result.stop_reason == "time_limit":
            line += "; rerun with the same --checkpoint to continue"
        elif remedy:
            line += f"; {remedy}"
        lines.append(line)
    return lines


def _extremes(values: Sequence[np.ndarray]) -> tuple[float, float] | None:
    finite = [v[np.isfinite(v)] for v in values if v.size]
    finite = [v for v in finite if v.size]
    if not finite:
        return None
    return float(min(v.min() for v in finite)), float(max(v.max() for v in finite))


def both_ends(
    label: str,
    *,
    eigen: Any | None,
    density: Any | None,
    density_remedy: str,
) -> tuple[list[str], dict[str, Any]]:
    """Lines and a JSON summary of both ends of the spectrum (see the module docstring).

    Args:
        label: Operator label.
        eigen: The Lanczos :class:`~hessian_eigenthings.EigenResult`, or ``None``.
        density: The :class:`~hessian_eigenthings.SpectralDensityResult`, or ``None``.
        density_remedy: Option that shrinks the negative mass's error bar.

    Returns:
        ``(lines, summary)`` with ``summary`` keys ``largest_found``,
        ``smallest_found``, ``negative_mass``, ``negative_mass_stderr``,
        ``negative_end_dominates`` (values ``None`` when unknown).
    """
    sources, values = [], []
    if eigen is not None:
        sources.append("Lanczos")
        values.append(eigen.eigenvalues.detach().double().cpu().numpy().reshape(-1))
    if density is not None:
        sources.append("the density's Ritz values")
        values += [np.asarray(n, dtype=np.float64).reshape(-1) for n in density.nodes]
    summary: dict[str, Any] = {
        "largest_found": None,
        "smallest_found": None,
        "negative_mass": None,
        "negative_mass_stderr": None,
        "negative_end_dominates": None,
    }
    lines: list[str] = []
    ends = _extremes(values)
    if ends is not None:
        low, high = ends
        summary["smallest_found"], summary["largest_found"] = low, high
        lines.append(
            f"{capitalized(label)} spectrum, both ends found ({' and '.join(sources)}): largest "
            f"{high:.5g}, smallest {low:.5g} (the spectrum reaches at least this far)"
        )
        if density is None and eigen is not None and eigen.which != "LM":
            other = "SA" if eigen.which == "LA" else "LA"
            lines.append(
                f"  only the {WHICH_WORDS[eigen.which]} end was searched; --which LM (both "
                f"ends by magnitude), --which {other} or --density shows the other end"
            )
    if density is not None:
        mass = float(density.negative_mass)
        stderr = getattr(density, "negative_mass_stderr", None)
        summary["negative_mass"] = mass
        text = f"{mass:.3g}"
        if stderr is not None:
            summary["negative_mass_stderr"] = float(stderr)
            text += f" +/- {float(stderr):.2g}"
        lines.append(f"  negative mass of the density: {text} (fraction of eigenvalues < 0)")
        if stderr is not None:
            hint = error_bar_hint(
                f"{label} negative mass", mass, float(stderr), density_remedy, floor=1e-3
            )
            if hint:
                lines.append(hint)
    else:
        lines.append("  negative mass: not computed (add --density)")
    # The positive end is known from a density, or from Lanczos at the LA / LM end (the
    # k largest magnitudes: a larger positive eigenvalue would have been among them).
    positive_known = density is not None or (eigen is not None and eigen.which in ("LA", "LM"))
    if ends is not None and positive_known:
        low, high = ends
        dominates = low < 0 and -low > high
        summary["negative_end_dominates"] = dominates
        if dominates:
            than = (
                f"the largest, {high:.5g}"
                if high > 0
                else "any positive eigenvalue (none among those of largest magnitude)"
            )
            lines.append(
                f"  note: the negative end dominates: the smallest eigenvalue found, "
                f"{low:.5g}, is larger in magnitude than {than} (not a minimum)"
            )
    return lines, summary
