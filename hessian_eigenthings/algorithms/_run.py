r"""The run driver: time limits, checkpoints, stop reasons and non-finite products, once.

Every algorithm is a :class:`ResumableRun`: it says how many operator products it has
used, whether it is done, how to make its next step, what its partial and final results
are, and what its state is. :func:`drive` does the rest, identically for all of them:

.. code-block:: text

    load the checkpoint, if one matches              (resume)
    while not done:
        time limit passed (and this call made products, and a partial result exists)?
            -> write the checkpoint, return the partial result (stop_reason="time_limit")
        checkpoint due? -> write it
        step()            every product goes through apply(): inf/nan and operator
                          errors become NonFiniteError(partial=..., matvec=...)
    delete the checkpoint, return the result

Policies (the same for every algorithm):

* **Checkpoint writes that fail.** The location is tested before the first product; a
  write that fails later raises
  :class:`~hessian_eigenthings.errors.CheckpointWriteError` naming the path, with the
  run's partial result (``stop_reason="checkpoint_failed"``) as ``err.partial``.
* **Checkpoint deletion.** A run that completes deletes its checkpoint; a run stopped by
  its time limit writes it and keeps it, so calling again continues. A run that raises
  (a :class:`~hessian_eigenthings.errors.NonFiniteError`, an interrupt, an operator's
  exception) leaves the file as last written, which holds the state *before* the failing
  product: after fixing the cause (a bad batch, an overflowing dtype) the same call
  resumes from it; delete it to start over. (A changed model is refused on resume, see
  :mod:`~hessian_eigenthings.algorithms.checkpoint`.)
* **Where the clock is read.** Only between steps, where the state is complete, and only
  after this call made products: a call can overrun its limit by one step, and a resumed
  call always makes progress before it may stop again.
* **Processes agree through the backend.** Under ``torch.distributed`` the decisions
  that depend on a process's clock (stop now, write now) are the first process's,
  broadcast by the backend's ``agree`` over its group; the checkpoint is written by the
  process for which ``backend.is_first_process()`` holds. A backend without a group (one
  process running on a local operator inside a larger job) communicates with nobody.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import torch
from typing_extensions import TypedDict

from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._validation import (
    check_checkpoint_options,
    check_time_limit,
)
from hessian_eigenthings.algorithms.checkpoint import (
    Checkpointer,
    generator_state,
    restore_generator,
)
from hessian_eigenthings.backends.base import LinAlgBackend, seeded_generator
from hessian_eigenthings.errors import CheckpointWriteError, NonFiniteError
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = [
    "Deadline",
    "LongRun",
    "LongRunOptions",
    "ProductFailure",
    "ResumableRun",
    "drive",
    "first_non_finite",
    "long_run_options",
]

R = TypeVar("R")


class LongRunOptions(TypedDict, total=False):
    """The long-run keywords every algorithm takes (``**long_run`` in the signatures).

    Attributes:
        checkpoint: Path of a checkpoint file (its directory must exist). If it exists
            and matches the operator and the arguments, the call resumes from it and
            returns the same result, bit for bit, as an uninterrupted call; it is written
            periodically, deleted when the call completes, and written and kept when
            ``time_limit`` stops the call. See
            :mod:`~hessian_eigenthings.algorithms.checkpoint`.
        checkpoint_every: Write the checkpoint every this many operator products (at the
            next point where the state is complete: a convergence check, a probe block,
            a run).
        checkpoint_seconds: Write it when this many seconds passed since the last write
            (default 300 when neither interval is given).
        time_limit: Wall-clock seconds. Checked between steps once the call has made
            products; once passed, the partial result is returned with
            ``stop_reason="time_limit"`` (what it holds is documented by each algorithm).
    """

    checkpoint: str | os.PathLike[str] | None
    checkpoint_every: int | None
    checkpoint_seconds: float | None
    time_limit: float | None


@dataclass(frozen=True)
class LongRun:
    """The validated long-run keywords of one call (see :func:`long_run_options`)."""

    checkpoint: str | os.PathLike[str] | None
    every: int | None
    seconds: float | None
    time_limit: float | None


def long_run_options(who: str, options: Mapping[str, Any]) -> LongRun:
    """Validate the ``**long_run`` keywords of a call to ``who``.

    Raises:
        TypeError: An unknown keyword (a misspelt one is never silently ignored).
        ValueError: A bad interval or time limit.
    """
    unknown = sorted(set(options) - set(LongRunOptions.__annotations__))
    if unknown:
        raise TypeError(
            f"{who}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the long-run keywords are {', '.join(LongRunOptions.__annotations__)}."
        )
    path, every, seconds = check_checkpoint_options(
        options.get("checkpoint"),
        options.get("checkpoint_every"),
        options.get("checkpoint_seconds"),
    )
    return LongRun(path, every, seconds, check_time_limit(options.get("time_limit")))


class Deadline:
    """Tells a run when its ``time_limit`` has passed (the first process's clock decides).

    Args:
        time_limit: Seconds from construction, or ``None`` for no limit.
        backend: The backend whose processes must agree (see :meth:`LinAlgBackend.agree`).
    """

    def __init__(self, time_limit: float | None, backend: LinAlgBackend) -> None:
        self.time_limit = time_limit
        self.backend = backend
        self._end = None if time_limit is None else time.monotonic() + time_limit

    def expired(self) -> bool:
        """Whether the limit has passed (one small broadcast under a distributed backend)."""
        if self._end is None:
            return False
        return self.backend.agree(time.monotonic() >= self._end)


class ProductFailure(Exception):
    """A product of a run was non-finite or refused by the operator.

    Internal: :func:`drive` turns it into the ``NonFiniteError`` that carries the run's
    partial result.
    """

    def __init__(self, first_bad: int, width: int, cause: NonFiniteError | None, hint: str):
        super().__init__(f"product {first_bad} failed")
        self.first_bad, self.width, self.cause, self.hint = first_bad, width, cause, hint


def first_non_finite(values: torch.Tensor) -> int | None:
    """Index of the first column (last dim) with a non-finite entry, or ``None`` (one sync)."""
    bad = ~torch.isfinite(values)
    if values.dim() > 1:
        bad = bad.reshape(-1, values.shape[-1]).any(dim=0)
    hits = bad.nonzero()
    return None if hits.numel() == 0 else int(hits[0, 0])


class ResumableRun(ABC, Generic[R]):
    """One algorithm call as steps that :func:`drive` can time, save, resume and stop.

    A subclass is the algorithm's step logic only. Its state is everything
    :meth:`state_dict` returns plus the seed and the random generator, which this base
    class owns (``self.seed``, ``self.gen``) and the driver saves and restores.

    Args:
        operator: The operator.
        backend: Its vector backend.
        seed: The seed every process agreed on (see :meth:`agree_seed`).
    """

    #: Name in checkpoint headers and error messages.
    algorithm: str = ""

    def __init__(self, operator: CurvatureOperator, backend: LinAlgBackend, seed: int) -> None:
        self.op = operator
        self.backend = backend
        self.seed = seed
        self.gen = seeded_generator(seed, operator.device)

    @staticmethod
    def agree_seed(seed: int, backend: LinAlgBackend) -> int:
        """The first process's ``seed`` on every process of ``backend`` (agreed once).

        With ``seed=None`` each process draws its own fresh seed; agreeing makes every
        process draw the same probes and record the same ``result.seed``.
        """
        return int(backend.all_agree(torch.tensor(seed, dtype=torch.int64)))

    # -- what an algorithm defines ----------------------------------------------------------

    @abstractmethod
    def used(self) -> int:
        """Operator products made so far (over all calls that resumed this run)."""

    @abstractmethod
    def done(self) -> bool:
        """Whether the run is complete (:meth:`result` is available)."""

    @abstractmethod
    def step(self) -> None:
        """Make the next products (one block, one check interval, one run ...)."""

    @abstractmethod
    def partial(self, stop_reason: StopReason) -> R | None:
        """The result of the products made so far, or ``None`` if there is none yet."""

    @abstractmethod
    def result(self) -> R:
        """The final result (called once :meth:`done` is True)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything the run reads later (CPU tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def context(self) -> str:
        """Where the run is, for error messages (e.g. ``" (pair 2 of 3)"``)."""
        return ""

    # -- products ---------------------------------------------------------------------------

    def apply(self, X: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """``A X`` for a vector ``(n,)`` or a column block ``(n, b)``, on ``X``'s device.

        The one place where a run multiplies by the operator: ``X`` is moved to the
        operator's device and the product back. A :class:`NonFiniteError` raised by the
        operator (a data operator names the batch and the parameters) and, with
        ``check=True``, inf/nan in the product (one host sync per call) end the run with a
        ``NonFiniteError`` that carries :meth:`partial`. Runs that check a cheaper
        reduction of the product later (Lanczos, power iteration: their norms, at the
        next convergence check) pass ``check=False`` and call :meth:`fail` themselves.
        """
        width = 1 if X.dim() == 1 else X.shape[1]
        x = X.to(self.op.device)
        try:
            out = self.op.matvec(x) if X.dim() == 1 else self.op.matmat(x)
        except NonFiniteError as err:
            raise ProductFailure(self.used() + 1, width, err, "") from err
        if check:
            bad = first_non_finite(out)
            if bad is not None:
                self.fail(self.used() + bad + 1)
        return out.to(X.device)

    def fail(self, first_bad: int, *, hint: str = "") -> NoReturn:
        """End the run: product ``first_bad`` (1-based) was non-finite; ``hint``: a cause."""
        raise ProductFailure(first_bad, 1, None, hint)

    # -- used by the driver -----------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": generator_state(self.gen), **self.state_dict()}

    def _restore(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        restore_generator(self.gen, state["generator"])
        self.load_state_dict(state)

    def _non_finite_error(self, failure: ProductFailure) -> NonFiniteError:
        try:
            partial = self.partial("non_finite")
        except ProductFailure:  # the state itself is not finite: nothing to return
            partial = None
        first = failure.first_bad
        if failure.cause is None:
            what = (
                f"{type(self.op).__name__}.matvec returned non-finite values (inf/nan) at "
                f"product {first} of this {self.algorithm} run{failure.hint}"
            )
        else:
            products = (
                f"product {first}"
                if failure.width == 1
                else f"one of the products {first}-{first + failure.width - 1} (a block)"
            )
            what = f"{products} of this {self.algorithm} run failed: {failure.cause}"
        note = (
            "err.partial is None (too few clean products for a result)"
            if partial is None
            else "err.partial holds the result of the products before it, with "
            "stop_reason='non_finite'"
        )
        return NonFiniteError(
            f"{what}{self.context()}; {note}. Check the model's loss and parameters for "
            "overflow (e.g. a bf16 model) or a bad batch.",
            partial=partial,
            matvec=first,
            batch_index=getattr(failure.cause, "batch_index", None),
            param_names=getattr(failure.cause, "param_names", ()),
        )


def drive(run: ResumableRun[R], config: dict[str, Any], options: LongRun | None = None) -> R:
    """Run ``run`` to completion, a time limit, or a non-finite product.

    Args:
        run: The algorithm's run, freshly constructed.
        config: The arguments that determine the result (recorded in and checked
            against the checkpoint; ``seed`` as the caller passed it).
        options: The validated long-run keywords (:func:`long_run_options`).

    Returns:
        ``run.result()``, or ``run.partial("time_limit")`` when the time limit stopped it.

    Raises:
        NonFiniteError: A product was inf/nan (``err.partial``: ``run.partial``).
        CheckpointMismatchError, CorruptCheckpointError: The checkpoint cannot be used.
        CheckpointWriteError: The checkpoint location is not writable (before any
            product), or a write failed (``err.partial``: the result so far).
    """
    opts = options or LongRun(None, None, None, None)
    deadline = Deadline(opts.time_limit, run.backend)
    checkpointer = (
        None
        if opts.checkpoint is None
        else Checkpointer(
            opts.checkpoint,
            algorithm=run.algorithm,
            operator=run.op,
            backend=run.backend,
            config=config,
            every=opts.every,
            seconds=opts.seconds,
        )
    )
    if checkpointer is not None:
        saved = checkpointer.load()
        if saved is not None:
            run._restore(saved)
    start = run.used()
    try:
        while not run.done():
            if run.used() > start and deadline.expired():
                cut = run.partial("time_limit")
                if cut is not None:
                    if checkpointer is not None:
                        _save(checkpointer, run, cut)
                    return cut
            if checkpointer is not None:
                _save(checkpointer, run, None, due=True)
            run.step()
    except ProductFailure as failure:
        raise run._non_finite_error(failure) from failure.cause
    result = run.result()
    if checkpointer is not None:
        checkpointer.finish()
    return result


def _save(
    checkpointer: Checkpointer, run: ResumableRun[Any], cut: Any, *, due: bool = False
) -> None:
    """Write the checkpoint (if ``due``: only when its interval has passed).

    A failed write raises with the run's partial result attached (``cut``, or the
    partial result with ``stop_reason="checkpoint_failed"``).
    """
    try:
        if due:
            checkpointer.maybe_save(run.used(), run._snapshot)
        else:
            checkpointer.save(run.used(), run._snapshot)
    except CheckpointWriteError as err:
        if cut is None:
            try:
                cut = run.partial("checkpoint_failed")
            except ProductFailure:  # the state itself is not finite: nothing to return
                cut = None
        err.partial = cut
        raise
