"""Input checks shared by every algorithm: one message per mistake, naming the fix.

Each check returns the validated value (so call sites read ``k = check_k(k, n)``) and
raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, saying what was
expected and what arrived.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TypeGuard

import torch

from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
from hessian_eigenthings.backends.devices import canonical_device
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = [
    "DISTRIBUTIONS",
    "check_checkpoint_options",
    "check_choice",
    "check_int",
    "check_k",
    "check_num_matvecs",
    "check_operator",
    "check_sketch_options",
    "check_time_limit",
    "check_tol",
    "check_whole_vectors",
    "resolve_seed",
]

DISTRIBUTIONS = ("rademacher", "gaussian")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_operator(operator: object, who: str) -> CurvatureOperator:
    """Return ``operator`` if it is a symmetric :class:`CurvatureOperator`, else raise."""
    if not isinstance(operator, CurvatureOperator):
        raise TypeError(
            f"{who} expects a CurvatureOperator, got {type(operator).__name__}. Wrap a "
            "function v -> A v with hessian_eigenthings.LambdaOperator(matvec_fn, size, "
            "dtype=..., device=...)."
        )
    if not operator.symmetric:
        raise ValueError(
            f"{who} assumes a symmetric operator (A^T = A), but {operator!r} has "
            "symmetric=False. If your operator is symmetric, construct it with "
            "symmetric=True (or set operator.symmetric = True)."
        )
    return operator


def check_int(
    value: object, name: str, minimum: int = 1, maximum: int | None = None, why: str = ""
) -> int:
    """An int in ``[minimum, maximum]``; ``why`` explains the bound in the message."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum or (maximum is not None and value > maximum):
        span = f">= {minimum}" if maximum is None else f"with {minimum} <= {name} <= {maximum}"
        raise ValueError(f"{name} must be an int {span}, got {value}{why}.")
    return value


def check_k(k: object, n: int) -> int:
    """Number of eigenpairs, ``1 <= k <= n``."""
    return check_int(k, "k", 1, n, why=f" (operator.size = {n})")


def check_num_matvecs(num_matvecs: object, minimum: int, method: str) -> int:
    """A matvec budget of at least the method's minimum."""
    return check_int(
        num_matvecs,
        "num_matvecs",
        minimum,
        why=f": method {method!r} needs num_matvecs >= {minimum} to estimate the result "
        "and its standard error",
    )


def check_tol(tol: object) -> float | None:
    """A relative tolerance in ``(0, 1)``, or ``None`` for the default."""
    if tol is not None and not (_is_number(tol) and 0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}.")
    return None if tol is None else float(tol)


def check_choice(value: object, choices: Sequence[str], what: str) -> str:
    """One of ``choices`` (an unknown option string is an error, never a fallback)."""
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {tuple(choices)}.")
    return str(value)


def resolve_seed(seed: object) -> int:
    """``None`` -> a fresh OS-entropy seed; an int -> itself; anything else raises."""
    if seed is None:
        return fresh_seed()
    if not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
    return seed


def check_whole_vectors(backend: LinAlgBackend, operator: CurvatureOperator, who: str) -> None:
    """Sketching estimators orthonormalise whole vectors with a local QR."""
    local = backend.local_size(operator.size)
    if local != operator.size:
        raise ValueError(
            f"{who} orthonormalises its sketch with a local QR and needs whole vectors on "
            f"one process, but the backend {backend!r} holds {local} of {operator.size} "
            "entries. Use method='hutchinson' for sharded operators."
        )


def check_sketch_options(
    max_sketch_size: object, sketch_device: object, operator: CurvatureOperator
) -> tuple[int | None, torch.device]:
    """The memory options of the sketching estimators.

    Returns:
        ``(max_sketch_size, device)``: the cap (or ``None``) and the device that holds the
        sketch (default the operator's).
    """
    if max_sketch_size is not None and not (_is_int(max_sketch_size) and max_sketch_size >= 2):
        raise ValueError(f"max_sketch_size must be None or an int >= 2, got {max_sketch_size!r}.")
    if sketch_device is None:
        return max_sketch_size, operator.device
    if not isinstance(sketch_device, (str, torch.device)):
        raise TypeError(
            f"sketch_device must be a torch.device or str, got {type(sketch_device).__name__}."
        )
    return max_sketch_size, canonical_device(sketch_device)


def check_time_limit(time_limit: object) -> float | None:
    """A positive number of seconds, or ``None``."""
    if time_limit is not None and not (
        _is_number(time_limit) and time_limit > 0 and not math.isnan(time_limit)
    ):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}.")
    return None if time_limit is None else float(time_limit)


def check_checkpoint_options(
    path: object, every: object, seconds: object
) -> tuple[os.PathLike[str] | str | None, int | None, float | None]:
    """``checkpoint``, ``checkpoint_every`` (products) and ``checkpoint_seconds``."""
    if path is None:
        if every is not None or seconds is not None:
            raise ValueError(
                "checkpoint_every / checkpoint_seconds were given without checkpoint=; "
                "pass checkpoint='path/to/file' to enable checkpointing."
            )
        return None, None, None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or PathLike), got {type(path).__name__}.")
    if every is not None and not (_is_int(every) and every >= 1):
        raise ValueError(f"checkpoint_every must be a positive int (matvecs), got {every!r}.")
    if seconds is not None and not (_is_number(seconds) and seconds > 0):
        raise ValueError(f"checkpoint_seconds must be a positive number, got {seconds!r}.")
    return path, every, None if seconds is None else float(seconds)
