"""The result lines of the command line: plurals, error-bar hints, both ends of the spectrum.

The inputs are results with known values (an ``EigenResult`` and density-like objects
built here), so every printed number and every note can be checked exactly.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from hessian_eigenthings.algorithms.results import EigenResult
from hessian_eigenthings.cli.summary import both_ends, eigen_lines, error_bar_hint, plural


def eigen(values: list[float], which: str, converged: list[bool] | None = None) -> EigenResult:
    k = len(values)
    return EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        eigenvectors=torch.empty(k, 0),
        residuals=torch.full((k,), 1e-6, dtype=torch.float64),
        converged=torch.tensor(converged or [True] * k),
        iterations=1,
        num_matvecs=1 if k == 1 else 40,
        which=which,
        stop_reason="converged" if converged is None else "max_iter",
    )


def density(nodes: list[float], mass: float, stderr: float | None = None) -> Any:
    fields: dict[str, Any] = {"nodes": (np.asarray(nodes),), "negative_mass": mass}
    if stderr is not None:
        fields["negative_mass_stderr"] = stderr
    return SimpleNamespace(**fields)


@pytest.mark.parametrize(
    "count, word, expected",
    [
        (1, "batch", "1 batch"),
        (3, "batch", "3 batches"),
        (0, "token", "0 tokens"),
        (1, "token", "1 token"),
        (2048, "token", "2,048 tokens"),
        (1, "entry", "1 entry"),
        (5, "entry", "5 entries"),
    ],
)
def test_plural(count: int, word: str, expected: str) -> None:
    many = "entries" if word == "entry" else None
    assert plural(count, word, many) == expected


def test_error_bar_hint_is_given_above_a_tenth_of_the_estimate() -> None:
    hint = error_bar_hint("Hessian trace", 135.0, 65.0, "raise --trace-matvecs (now 60)")
    assert hint is not None
    assert "Hessian trace 135 +/- 65" in hint and hint.endswith("raise --trace-matvecs (now 60)")
    assert error_bar_hint("trace", 135.0, 13.4, "x") is None  # below a tenth
    assert error_bar_hint("trace", -135.0, 13.6, "x") is not None  # sign does not matter
    assert error_bar_hint("mass", 0.001, 0.0005, "x", floor=1e-3) is None
    assert error_bar_hint("trace", float("nan"), 1.0, "x") is None


def test_eigen_table_names_the_end_and_unconverged_pairs() -> None:
    lines = eigen_lines(
        "empirical Fisher",
        eigen([3.0, 2.0], "LA", converged=[True, False]),
        remedy="raise --lanczos-matvecs",
    )
    assert lines[0].startswith("Top-2 empirical Fisher eigenvalues (largest (algebraic); Lanczos")
    assert "not converged" in lines[2] and "not converged" not in lines[1]
    assert lines[-1] == (
        "  1 of 2 pairs did not meet the tolerance (the matvec budget ran out); "
        "raise --lanczos-matvecs"
    )
    assert "1 matvec;" in eigen_lines("GGN", eigen([1.0], "LM"))[0]


def test_both_ends_from_lanczos_and_density() -> None:
    lines, summary = both_ends(
        "Hessian",
        eigen=eigen([29.2, 27.0], "LA"),
        density=density([-30.9, -1.0, 0.0, 28.0], 0.26, stderr=0.02),
        density_remedy="raise --density-runs",
    )
    text = "\n".join(lines)
    assert summary == {
        "largest_found": 29.2,
        "smallest_found": -30.9,
        "negative_mass": 0.26,
        "negative_mass_stderr": 0.02,
        "negative_end_dominates": True,
    }
    assert "largest 29.2, smallest -30.9" in text
    assert "negative mass of the density: 0.26 +/- 0.02" in text
    assert "note: the negative end dominates: the smallest eigenvalue found, -30.9" in text
    assert "hint" not in text  # 0.02 is less than a tenth of 0.26


def test_negative_mass_error_bar_hint_and_missing_stderr() -> None:
    lines, _ = both_ends(
        "Hessian",
        eigen=None,
        density=density([-1.0, 2.0], 0.2, stderr=0.1),
        density_remedy="raise --density-runs",
    )
    assert any("Hessian negative mass 0.2 +/- 0.1" in ln and "--density-runs" in ln for ln in lines)
    lines, summary = both_ends(
        "Hessian", eigen=None, density=density([-1.0, 2.0], 0.2), density_remedy="x"
    )
    assert "negative mass of the density: 0.2 (fraction" in "\n".join(lines)
    assert summary["negative_mass_stderr"] is None


def test_negative_end_note_needs_a_known_positive_end() -> None:
    # SA only: the positive end was not searched, so nothing can dominate it
    lines, summary = both_ends(
        "Hessian", eigen=eigen([-5.0, -4.0], "SA"), density=None, density_remedy="x"
    )
    text = "\n".join(lines)
    assert "negative end dominates" not in text and summary["negative_end_dominates"] is None
    assert "only the smallest (algebraic) end was searched" in text
    assert "negative mass: not computed (add --density)" in text
    # LM with only negative values: every positive eigenvalue is smaller in magnitude
    lines, summary = both_ends(
        "Hessian", eigen=eigen([-5.0, -4.0], "LM"), density=None, density_remedy="x"
    )
    assert summary["negative_end_dominates"] is True
    assert "than any positive eigenvalue" in "\n".join(lines)
    # LM with a larger positive end: no note
    lines, summary = both_ends(
        "Hessian", eigen=eigen([6.0, -5.0], "LM"), density=None, density_remedy="x"
    )
    assert summary["negative_end_dominates"] is False
    assert "note" not in "\n".join(lines)
