"""Re-export of :mod:`hessian_eigenthings.errors` (the errors' home since 2.0; this path stays)."""

from hessian_eigenthings.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NonFiniteError,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteError",
]
