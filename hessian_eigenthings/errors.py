"""Exceptions of the library: non-finite products, and checkpoints that cannot be used.

Every error says what was expected, what was found, and how to fix it. A
:class:`NonFiniteError` raised by an algorithm carries the results computed before the
bad product (``err.partial``), with honest ``converged`` flags; so does a
:class:`CheckpointWriteError` raised when a checkpoint cannot be written during a run.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteError",
]


class NonFiniteError(FloatingPointError, ValueError):
    """An operator product contained NaN or Inf.

    Raised by data operators (naming the operator, the batch index and the parameter
    blocks that went non-finite) and by the algorithms (naming the operator and the
    matvec count). It is both a :class:`FloatingPointError` and a :class:`ValueError`.

    Attributes:
        partial: The algorithm's result built from the products before the bad one
            (an ``EigenResult``, ``TraceResult`` or ``SpectralDensityResult`` with
            ``converged`` flags / ``details["stop_reason"] == "non_finite"``), or ``None``
            when nothing usable had been computed yet or the error was raised by an
            operator outside an algorithm.
        matvec: 1-based index of the first non-finite product in the algorithm's run,
            when known.
        batch_index: Index of the batch (in loader order) whose product went
            non-finite, for data operators.
        param_names: Names of the parameters whose blocks of the product went
            non-finite, for data operators.
    """

    def __init__(
        self,
        message: str,
        *,
        partial: Any = None,
        matvec: int | None = None,
        batch_index: int | None = None,
        param_names: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.partial = partial
        self.matvec = matvec
        self.batch_index = batch_index
        self.param_names = param_names


class CheckpointError(RuntimeError):
    """Base of the errors about a checkpoint file that cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by another algorithm, operator or configuration."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint file is truncated, corrupt or not a checkpoint of this library."""


class CheckpointWriteError(CheckpointError):
    """The checkpoint file cannot be written (an unwritable location, a full disk).

    Raised before the first product when the location is not writable (then
    ``partial`` is ``None``), or when a write fails during the run: then ``partial``
    holds the run's result from the products made so far, with
    ``stop_reason="checkpoint_failed"`` and honest ``converged`` flags.

    Attributes:
        path: The checkpoint path as given.
        partial: The partial result, or ``None``.
    """

    def __init__(self, message: str, *, path: str, partial: Any = None) -> None:
        super().__init__(message)
        self.path = path
        self.partial = partial
