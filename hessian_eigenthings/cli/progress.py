"""Progress bars on standard error, counted in matrix-vector products.

Bars are shown only when standard error is a terminal or when ``--progress`` is given,
and never with ``--quiet``; scripts and CI logs therefore stay clean. Results always go
to standard output and files, never to the progress stream.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import torch

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["Reporter", "progress_enabled"]


def progress_enabled(*, quiet: bool, force: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars.

    Args:
        quiet: ``--quiet`` was given: never draw.
        force: ``--progress`` was given: draw even when standard error is not a terminal.
        stream: The progress stream (default ``sys.stderr``).
    """
    if quiet:
        return False
    if force:
        return True
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Counted(CurvatureOperator):
    """Forward every product to ``inner`` and report how many vectors it consumed."""

    def __init__(self, inner: CurvatureOperator, tick: Callable[[int], Any]) -> None:
        self.inner = inner
        self._tick = tick
        self.symmetric = inner.symmetric
        self.psd = inner.psd

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def backend(self) -> LinAlgBackend:
        return self.inner.backend

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.inner.matvec(v)
        self._tick(1)
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.inner.matmat(V)
        self._tick(int(V.shape[1]) if V.dim() == 2 else 1)
        return out


class Reporter:
    """Prints results (stdout) and draws progress bars (stderr) for one command.

    Args:
        quiet: Print nothing but errors; no progress bars.
        progress: Draw progress bars (already resolved by :func:`progress_enabled`).
    """

    def __init__(self, *, quiet: bool, progress: bool) -> None:
        self.quiet = quiet
        self.progress = progress and not quiet

    def say(self, message: str = "") -> None:
        """Print one line of results to standard output (suppressed by ``--quiet``)."""
        if not self.quiet:
            print(message, flush=True)

    @contextmanager
    def task(
        self, operator: CurvatureOperator, description: str, total: int | None = None
    ) -> Iterator[CurvatureOperator]:
        """Yield ``operator`` wrapped so that every matvec advances a progress bar.

        The wrapper forwards the public ``matvec``/``matmat`` unchanged (same size, dtype,
        device, structure flags, backend and vector-precision handling) and counts
        columns. Without progress bars the operator itself is yielded.

        Args:
            operator: The operator the task will apply.
            description: Label of the bar.
            total: Expected number of matvecs (``None``: unknown, the bar only counts).
        """
        if not self.progress:
            yield operator
            return
        from tqdm.auto import tqdm

        bar: Any = tqdm(total=total, desc=description, unit="matvec", file=sys.stderr, leave=False)
        wrapped = _Counted(operator, bar.update)
        try:
            yield wrapped
        finally:
            bar.close()
