"""Result lines on standard output and progress bars on standard error.

Bars are shown only when standard error is a terminal or when ``--progress`` is given,
and never with ``--quiet``; scripts and CI logs therefore stay clean. Results always go
to standard output and files, never to the progress stream.

Under ``torchrun`` every rank runs the command, but only rank 0 prints results and draws
bars (each line is one flushed ``print``, so lines never run together); error messages
are printed by every rank that meets them, prefixed with ``[rank r]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import torch

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["Reporter", "progress_enabled", "torchrun_rank"]


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
    """Forward every product to ``inner`` and report how many vectors it consumed.

    The wrapper has the inner operator's identity for checkpoint files: its selected
    parameters (``named_params``) and a ``fingerprint`` naming the inner class (plus the
    inner ``fingerprint``), so a run resumed with or without progress bars matches.
    """

    def __init__(self, inner: CurvatureOperator, tick: Callable[[int], Any]) -> None:
        self.inner = inner
        self._tick = tick
        self.symmetric = inner.symmetric
        self.psd = inner.psd
        inner_print = getattr(inner, "fingerprint", None)
        self.fingerprint = type(inner).__qualname__ + (
            "" if inner_print is None else f":{inner_print}"
        )

    @property
    def named_params(self) -> Any:
        """The inner operator's ``(name, parameter)`` pairs (``AttributeError`` if none)."""
        inner: Any = self.inner
        return inner.named_params

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


def torchrun_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process as set by ``torchrun`` (``(0, 1)`` without)."""
    import os

    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


class Reporter:
    """Prints results (stdout) and draws progress bars (stderr) for one command.

    Args:
        quiet: Print nothing but errors; no progress bars.
        progress: Draw progress bars (already resolved by :func:`progress_enabled`).
        rank: This process's rank under ``torchrun``; only rank 0 prints results and
            draws bars.
    """

    def __init__(self, *, quiet: bool, progress: bool, rank: int = 0) -> None:
        self.quiet = quiet
        self.rank = rank
        self.progress = progress and not quiet and rank == 0

    @property
    def prints(self) -> bool:
        """Whether :meth:`say` prints (not ``--quiet``, and rank 0)."""
        return not self.quiet and self.rank == 0

    def say(self, message: str = "") -> None:
        """Print result lines to standard output (only rank 0; not with ``--quiet``)."""
        if self.prints:
            print(message, flush=True)

    @contextmanager
    def task(
        self, operator: CurvatureOperator, description: str, total: int | None = None
    ) -> Iterator[CurvatureOperator]:
        """Yield ``operator`` wrapped so that every matvec advances a progress bar.

        The wrapper forwards the public ``matvec``/``matmat`` unchanged (same size, dtype,
        device, structure flags, backend and vector-precision handling) and counts
        columns. It is used with and without bars, so that checkpoint files written by
        a run with bars resume in a run without them (and back).

        Args:
            operator: The operator the task will apply.
            description: Label of the bar.
            total: Expected number of matvecs (``None``: unknown, the bar only counts).
        """
        if not self.progress:
            yield _Counted(operator, lambda _: None)
            return
        from tqdm.auto import tqdm

        bar: Any = tqdm(total=total, desc=description, unit="matvec", file=sys.stderr, leave=False)
        wrapped = _Counted(operator, bar.update)
        try:
            yield wrapped
        finally:
            bar.close()
