"""The checked arguments of an algorithm call: one place that validates and agrees them.

:class:`ProbeCall` holds what every stochastic estimator takes (trace, diagonal),
:class:`SolverCall` what every eigensolver takes. Their ``check`` constructors run the
checks of :mod:`._validation`, fill in the defaults (the operator's backend) and agree the
seed across the backend's processes, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hessian_eigenthings.algorithms._run import LongRun, ResumableRun, long_run_options
from hessian_eigenthings.algorithms._validation import (
    DISTRIBUTIONS,
    check_choice,
    check_int,
    check_k,
    check_num_matvecs,
    check_operator,
    check_sketch_options,
    check_tol,
    check_whole_vectors,
    resolve_seed,
)
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["ProbeCall", "SolverCall"]


def _agreed(seed: object, backend: LinAlgBackend) -> tuple[int, int | None]:
    """``(seed every process uses, seed as passed)``; ``None`` draws a fresh one."""
    resolved = resolve_seed(seed)
    return ResumableRun.agree_seed(resolved, backend), None if seed is None else resolved


@dataclass(frozen=True)
class ProbeCall:
    """The checked arguments that every stochastic estimator takes.

    Attributes:
        operator: The symmetric operator.
        num_matvecs: The budget of products.
        distribution: Probe distribution.
        block_size: Columns per ``matmat``.
        backend: Vector backend (the operator's by default).
        seed: The seed every process agreed on.
        seed_arg: ``seed`` as the caller passed it (recorded in checkpoints).
        max_sketch_size: Cap on a sketch (``None``: no cap).
        store: Device that holds probes and sketches (the operator's by default).
        long_run: The validated long-run keywords.
    """

    operator: CurvatureOperator
    num_matvecs: int
    distribution: str
    block_size: int
    backend: LinAlgBackend
    seed: int
    seed_arg: int | None
    max_sketch_size: int | None
    store: torch.device
    long_run: LongRun

    @classmethod
    def check(
        cls,
        who: str,
        method: str,
        minimum: int,
        operator: object,
        num_matvecs: object,
        probes: tuple[object, object, object, LinAlgBackend | None],
        long_run: Mapping[str, Any],
        *,
        max_sketch_size: object = None,
        sketch_device: object = None,
        whole_vectors: bool = False,
    ) -> ProbeCall:
        """Validate the arguments of a call to ``who`` (method ``method``), agree the seed.

        ``probes`` is the estimators' shared group of keywords as the user passed them:
        ``(distribution, seed, block_size, backend)``.

        Raises:
            TypeError, ValueError: A bad argument (see :mod:`._validation`).
        """
        distribution, seed, block_size, backend = probes
        op = check_operator(operator, who)
        m = check_num_matvecs(num_matvecs, minimum, method)
        dist = check_choice(distribution, DISTRIBUTIONS, "probe distribution")
        block = check_int(block_size, "block_size")
        cap, store = check_sketch_options(max_sketch_size, sketch_device, op)
        options = long_run_options(who, long_run)
        backend_ = backend if backend is not None else op.backend
        if whole_vectors:
            check_whole_vectors(backend_, op, who)
        agreed, seed_arg = _agreed(seed, backend_)
        return cls(op, m, dist, block, backend_, agreed, seed_arg, cap, store, options)

    def config(self, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
        """The arguments that determine the result (what a checkpoint records)."""
        return {
            "num_matvecs": self.num_matvecs,
            "distribution": self.distribution,
            "block_size": self.block_size,
            **extra,
            "seed": self.seed_arg,
            "dtype": dtype,
        }


@dataclass(frozen=True)
class SolverCall:
    """The checked arguments that every eigensolver takes.

    Attributes:
        operator: The symmetric operator.
        k: Number of eigenpairs.
        tol: Relative-residual tolerance (``None``: the solver's default).
        backend: Vector backend (the operator's by default).
        seed: The seed every process agreed on.
        seed_arg: ``seed`` as the caller passed it (recorded in checkpoints).
        long_run: The validated long-run keywords.
    """

    operator: CurvatureOperator
    k: int
    tol: float | None
    backend: LinAlgBackend
    seed: int
    seed_arg: int | None
    long_run: LongRun

    @classmethod
    def check(
        cls,
        who: str,
        operator: object,
        k: object,
        *,
        tol: object,
        seed: object,
        backend: LinAlgBackend | None,
        long_run: Mapping[str, Any],
    ) -> SolverCall:
        """Validate the arguments of a call to ``who`` and agree the seed."""
        op = check_operator(operator, who)
        k_ = check_k(k, op.size)
        tol_ = check_tol(tol)
        resolve_seed(seed)
        options = long_run_options(who, long_run)
        backend_ = backend if backend is not None else op.backend
        agreed, seed_arg = _agreed(seed, backend_)
        return cls(op, k_, tol_, backend_, agreed, seed_arg, options)
