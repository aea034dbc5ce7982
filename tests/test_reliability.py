"""The input contract as a table: unusual or wrong inputs over every operator and algorithm.

Each row is something a user may do (a shuffling loader, a detached loss, a NaN vector, an
unwritable checkpoint, a custom matvec that returns int64, ...) and the verdict a careful
library owes them:

* ``good``: a correct result (checked against an independent oracle: a dense float64
  matrix from ``torch.func``, numpy's eigensolver, a closed form), or an error of the
  expected type whose message says what was expected, what arrived and the fix;
* ``misleading``: an error, but of another type or with a message that blames the wrong
  thing or names no fix (or an error where a result was due);
* ``silent``: a wrong result without an error, an expected warning missing, or the
  user's model changed (parameters, ``.grad``, ``requires_grad``, train/eval flags,
  buffers), which is checked after every row whatever its verdict.

Every row must be ``good``. ``python -m tests.test_reliability`` prints the verdict of
each row that is not, and the counts per group; run against the code before the input
contract was completed (issue 17), it printed the counts quoted in
``docs/concepts/operators.md``.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hessian_eigenthings.errors as he_errors
from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MCFisherOperator,
    NonFiniteError,
    deflated_power_iteration,
    diagonal,
    hutchinson,
    lanczos,
    lanczos_tridiagonal,
    power_iteration_one,
    spectral_density,
    stochastic_power_iteration,
    trace,
)
from hessian_eigenthings.loss_fns.base import loss_of_output
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    supervised_forward,
    supervised_loss,
)
from tests.helpers import dense_hessian, rel_err, snapshot
from tests.test_fisher import oracle_empirical_fisher
from tests.test_ggn import oracle_ggn

DT = torch.float64
Batch = Any

# -- the problem: a tiny MLP on three ragged batches -------------------------------------


def mlp(seed: int = 0, dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


_G = torch.Generator().manual_seed(17)
X = torch.randn(12, 3, generator=_G, dtype=DT)
Y = torch.randint(0, 2, (12,), generator=_G)
SIZES = (5, 3, 4)
BATCHES = [(X[a:b], Y[a:b]) for a, b in zip((0, 5, 8), (5, 8, 12))]  # ragged: weights 5, 3, 4


def ce(m: nn.Module, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def per_sample(m: nn.Module, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _ce_out(o: torch.Tensor, b: Batch) -> torch.Tensor:
    return F.cross_entropy(o, b[1])


def _samples(b: Batch) -> float:
    return float(b[0].shape[0])


KINDS: dict[str, Callable[..., Any]] = {
    "hessian": lambda m, data, **kw: HessianOperator(m, data, ce, **kw),
    "hessian_fd": lambda m, data, **kw: HessianOperator(
        m, data, ce, method="finite_difference", **kw
    ),
    "ggn": lambda m, data, **kw: GGNOperator(
        m, data, supervised_forward, cross_entropy_loss_of_output(), **kw
    ),
    "ef": lambda m, data, **kw: EmpiricalFisherOperator(m, data, per_sample, **kw),
    "mc": lambda m, data, **kw: MCFisherOperator(m, data, supervised_forward, seed=3, **kw),
}
TOL = {"hessian": 1e-9, "hessian_fd": 1e-5, "ggn": 1e-9, "ef": 1e-9}


@functools.cache
def reference(kind: str) -> torch.Tensor:
    """The dense float64 matrix of the operator on the problem."""
    model = mlp()
    if kind in ("hessian", "hessian_fd"):
        return dense_hessian(model, BATCHES, ce)
    if kind == "ggn":
        return oracle_ggn(model, BATCHES, supervised_forward, _ce_out, _samples)
    return oracle_empirical_fisher(model, BATCHES)


_V = torch.randn(26, 3, generator=_G, dtype=DT)


def agrees(op: Any, dense: torch.Tensor, tol: float) -> bool:
    """``op`` equals ``dense`` on three random vectors (twice: a fixed operator)."""
    V = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(op.size), dtype=DT)
    first = op.matmat(V)
    return rel_err(first, dense @ V) <= tol and rel_err(op.matmat(V), first) <= tol


def correct(kind: str, op: Any) -> bool:
    """The operator equals its dense oracle; the MC Fisher (a random draw of labels) is
    one fixed symmetric matrix: two products agree and ``<u, F v> = <F u, v>``."""
    if kind != "mc":
        return agrees(op, reference(kind), TOL[kind])
    first, second = op.matmat(_V), op.matmat(_V)
    if rel_err(second, first) > 1e-12:
        return False
    return abs(float(_V[:, 0] @ first[:, 1] - _V[:, 1] @ first[:, 0])) <= 1e-10 * float(
        first.norm() * _V.norm()
    )


# -- the verdicts ---------------------------------------------------------------------------


def _error_type(name: str) -> type[BaseException]:
    """A library exception by name (a placeholder that nothing raises if it is absent)."""
    return getattr(he_errors, name, type(name, (Exception,), {}))


@dataclass(frozen=True)
class Ok:
    """A result that ``check`` accepts (and, if ``warns``, a warning containing it)."""

    check: Callable[[Any], bool]
    warns: str | None = None


@dataclass(frozen=True)
class Raises:
    """An error of one of ``types`` whose message contains every fragment (any case)."""

    types: tuple[type[BaseException], ...]
    fragments: tuple[str, ...] = ()

    def __init__(self, types: Any, *fragments: str) -> None:
        object.__setattr__(self, "types", types if isinstance(types, tuple) else (types,))
        object.__setattr__(self, "fragments", fragments)


@dataclass
class Case:
    group: str
    name: str
    act: Callable[[], Any]
    expect: Ok | Raises
    model: nn.Module | None = None
    issue17: bool = field(default=False)  # a row the issue reported as not handled well

    def __repr__(self) -> str:
        return f"{self.group}/{self.name}"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN equals the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


def _model_changed(model: nn.Module, snap: dict[str, Any]) -> str | None:
    now = snapshot(model)
    for n, p in now["params"].items():
        if not _same_bits(p, snap["params"][n]):
            return f"parameter {n} changed"
    if now["requires_grad"] != snap["requires_grad"]:
        return "requires_grad changed"
    for n, g in now["grads"].items():
        before = snap["grads"][n]
        if (g is None) != (before is None) or (g is not None and not _same_bits(g, before)):
            return f".grad of {n} changed"
    for n, b in now["buffers"].items():
        if not _same_bits(b, snap["buffers"][n]):
            return f"buffer {n} changed"
    if now["training"] != snap["training"]:
        return "train/eval mode changed"
    return None


def judge(case: Case) -> tuple[str, str]:
    """``(verdict, detail)`` of one row: ``good``, ``misleading`` or ``silent``."""
    snap = snapshot(case.model) if case.model is not None else None
    _CURRENT[0] = case.model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, err = case.act(), None
        except Exception as exc:
            out, err = None, exc
    if case.model is not None and snap is not None:
        changed = _model_changed(case.model, snap)
        if changed is not None:
            return "silent", changed
    got = "" if err is None else f"{type(err).__name__}: {str(err)[:300]}"
    if isinstance(case.expect, Raises):
        if err is None:
            return "silent", f"no error (returned {type(out).__name__})"
        message = str(err).lower()
        if isinstance(err, case.expect.types) and all(
            f.lower() in message for f in case.expect.fragments
        ):
            return "good", got
        return "misleading", got
    if err is not None:
        return "misleading", got
    if case.expect.warns is not None and not any(
        case.expect.warns.lower() in str(w.message).lower() for w in caught
    ):
        return "silent", f"no warning containing {case.expect.warns!r}"
    try:
        ok = case.expect.check(out)
    except Exception as exc:  # a result the check cannot even read
        return "silent", f"unreadable result ({type(exc).__name__}: {exc})"
    return ("good", "") if ok else ("silent", "wrong result")


CASES: list[Case] = []
_CURRENT: list[Any] = [None]


def M() -> Any:
    """The model of the row being judged (acts are registered before they run)."""
    return _CURRENT[0]


def row(
    group: str, name: str, model: nn.Module | None, expect: Ok | Raises, *, issue17: bool = False
) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def register(act: Callable[[], Any]) -> Callable[[], Any]:
        CASES.append(Case(group, name, act, expect, model, issue17))
        return act

    return register


# -- data ------------------------------------------------------------------------------------


class OnlyOnce:
    """An iterable whose ``__iter__`` hands out the same generator: empty from pass 2."""

    def __init__(self, batches: list[Batch]) -> None:
        self._it = iter(batches)

    def __iter__(self) -> Iterator[Batch]:
        return self._it


class RunsDry:
    """Yields its batches on the first ``passes`` iterations, then nothing."""

    def __init__(self, batches: list[Batch], passes: int) -> None:
        self.batches, self.left = batches, passes

    def __iter__(self) -> Iterator[Batch]:
        self.left -= 1
        return iter(self.batches if self.left >= 0 else [])


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples with a random perturbation drawn on every access (a random transform)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return X[i] + 0.1 * torch.randn(3, dtype=DT), Y[i]


class FailingLoader:
    """Raises while producing batch ``index``."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __iter__(self) -> Iterator[Batch]:
        for i, b in enumerate(BATCHES):
            if i == self.index:
                raise OSError("corrupt shard file part-00001")
            yield b


def _dataset() -> TensorDataset:
    return TensorDataset(X, Y)


def _random_factory() -> Callable[[], Iterator[Batch]]:
    def fresh() -> Iterator[Batch]:
        for n in SIZES:
            yield torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))

    return fresh


def _two_products(op: Any) -> Any:
    V = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    op.matmat(V)
    return op.matmat(V)


def _nan_first() -> list[Batch]:
    x = BATCHES[0][0].clone()
    x[1, 2] = float("nan")
    return [(x, BATCHES[0][1]), *BATCHES[1:]]


def _wrong_width_at(index: int) -> list[Batch]:
    out = list(BATCHES)
    out[index] = (out[index][0][:, :2], out[index][1])
    return out


for _kind in KINDS:

    def _add(kind: str = _kind) -> None:
        m = mlp()
        row("data", f"{kind}: list of ragged batches", m, Ok(bool))(
            lambda: correct(kind, KINDS[kind](m, BATCHES))
        )
        m2 = mlp()
        row("data", f"{kind}: generator factory", m2, Ok(bool))(
            lambda: correct(kind, KINDS[kind](m2, lambda: iter(BATCHES)))
        )
        m3 = mlp()
        row("data", f"{kind}: DataLoader in order", m3, Ok(bool))(
            lambda: correct(kind, KINDS[kind](m3, DataLoader(_dataset(), batch_size=4)))
        )
        m4 = mlp()
        row(
            "data",
            f"{kind}: DataLoader(shuffle=True), full passes",
            m4,
            Ok(bool),
            issue17=kind == "mc",
        )(
            lambda: correct(
                kind, KINDS[kind](m4, DataLoader(_dataset(), batch_size=4, shuffle=True))
            )
        )
        m5 = mlp()
        row(
            "data",
            f"{kind}: DataLoader(shuffle=True) with num_batches=1",
            m5,
            Raises(ValueError, "every pass", "shuffle=False"),
            issue17=True,
        )(
            lambda: _two_products(
                KINDS[kind](m5, DataLoader(_dataset(), batch_size=4, shuffle=True), num_batches=1)
            )
        )
        m6 = mlp()
        row(
            "data",
            f"{kind}: DataLoader(shuffle=True, drop_last=True)",
            m6,
            Raises(ValueError, "every pass", "drop_last"),
            issue17=True,
        )(
            lambda: _two_products(
                KINDS[kind](m6, DataLoader(_dataset(), batch_size=5, shuffle=True, drop_last=True))
            )
        )
        m7 = mlp()
        row(
            "data",
            f"{kind}: NaN input in the first batch",
            m7,
            Raises(NonFiniteError, "batch index 0"),
            issue17=kind != "mc",
        )(lambda: _two_products(KINDS[kind](m7, _nan_first())))
        m8 = mlp()
        row(
            "data",
            f"{kind}: iterable that is empty on its second pass",
            m8,
            Raises(ValueError, "only once"),
            issue17=True,
        )(lambda: _two_products(KINDS[kind](m8, OnlyOnce(BATCHES))))
        m9 = mlp()
        row(
            "data",
            f"{kind}: factory drawing new random data every pass",
            m9,
            Raises(ValueError, "different samples"),
            issue17=True,
        )(lambda: _two_products(KINDS[kind](m9, _random_factory())))
        m10 = mlp()
        row(
            "data",
            f"{kind}: malformed batch index 2 (wrong feature width)",
            m10,
            Raises(RuntimeError, "batch index 2"),
            issue17=True,
        )(lambda: _two_products(KINDS[kind](m10, _wrong_width_at(2))))

    _add()


def _hessian(model: nn.Module, data: Any, **kw: Any) -> HessianOperator:
    return HessianOperator(model, data, ce, **kw)


_m = mlp()
row("data", "one-shot iterator", _m, Raises(TypeError, "one-shot iterator"))(
    lambda: _hessian(M(), iter(BATCHES))
)
_m = mlp()
row("data", "generator object", _m, Raises(TypeError, "one-shot iterator"))(
    lambda: _hessian(M(), (b for b in BATCHES))
)
_m = mlp()
row("data", "empty list", _m, Raises(ValueError, "empty"))(lambda: _hessian(M(), []))
_m = mlp()
row("data", "not iterable", _m, Raises(TypeError, "iterable"))(lambda: _hessian(M(), 3))
_m = mlp()
row("data", "factory returning a non-iterable", _m, Raises(TypeError, "must return an iterable"))(
    lambda: _hessian(M(), lambda: 3)
)
_m = mlp()
row(
    "data",
    "first batch empty, others not",
    _m,
    Ok(lambda r: bool(r)),
    issue17=True,
)(lambda: agrees(_hessian(M(), [(X[:0], Y[:0]), *BATCHES]), reference("hessian"), 1e-9))
_m = mlp()
row("data", "a single empty batch", _m, Raises(ValueError, "weight 0"), issue17=True)(
    lambda: _two_products(_hessian(M(), [(X[:0], Y[:0])]))
)
_m = mlp()
row("data", "dict batches", _m, Ok(bool))(
    lambda: agrees(
        HessianOperator(
            M(),
            [{"x": x, "y": y} for x, y in BATCHES],
            lambda m, b: F.cross_entropy(m(b["x"]), b["y"]),
        ),
        reference("hessian"),
        1e-9,
    )
)
_m = mlp()
row("data", "batches with a string field", _m, Ok(bool))(
    lambda: agrees(
        HessianOperator(M(), [(x, y, "meta") for x, y in BATCHES], ce),
        reference("hessian"),
        1e-9,
    )
)
_m = mlp()
row("data", "num_batches=2", _m, Ok(bool))(
    lambda: agrees(
        _hessian(M(), BATCHES, num_batches=2), dense_hessian(mlp(), BATCHES[:2], ce), 1e-9
    )
)
_m = mlp()
row("data", "num_batches=0", _m, Raises(ValueError, "num_batches"))(
    lambda: _hessian(M(), BATCHES, num_batches=0)
)
_m = mlp()
row("data", "microbatch_size=2", _m, Ok(bool))(
    lambda: agrees(_hessian(M(), BATCHES, microbatch_size=2), reference("hessian"), 1e-9)
)
_m = mlp()
row("data", "microbatch_size=0", _m, Raises(ValueError, "microbatch_size"))(
    lambda: _hessian(M(), BATCHES, microbatch_size=0)
)
_m = mlp()


@row("data", "full_dataset=False: one batch per product, in order", _m, Ok(bool))
def _stochastic() -> bool:
    op = _hessian(M(), BATCHES, full_dataset=False)
    v = _V[:, 0]
    return all(
        rel_err(op.matvec(v), dense_hessian(mlp(), [b], ce) @ v) <= 1e-9 for b in BATCHES * 2
    )


_m = mlp()
row(
    "data",
    "Dataset with a random transform (no shuffling)",
    _m,
    Raises(ValueError, "different samples", "random"),
    issue17=True,
)(lambda: _two_products(_hessian(M(), DataLoader(Augmented(), batch_size=4))))
_m = mlp()
row(
    "data",
    "loader raising while producing batch 1",
    _m,
    Raises(OSError, "corrupt shard", "batch index 1"),
    issue17=True,
)(lambda: _two_products(_hessian(M(), FailingLoader(1))))
_m = mlp()


def _nan_in(index: int) -> list[Batch]:
    out = list(BATCHES)
    x = out[index][0].clone()
    x[0, 0] = float("inf")
    out[index] = (x, out[index][1])
    return out


row("data", "inf input in batch index 2", _m, Raises(NonFiniteError, "batch index 2"))(
    lambda: _two_products(_hessian(M(), _nan_in(2)))
)
_m = mlp()
row("data", "loader that runs dry on its third pass", _m, Raises(ValueError, "no batch"))(
    lambda: _two_products(_hessian(M(), RunsDry(BATCHES, 3)))
)
_m = mlp()
row("data", "weight_fn returning a negative count", _m, Raises(ValueError, "weight_fn"))(
    lambda: _two_products(_hessian(M(), BATCHES, weight_fn=lambda b: -1))
)
_m = mlp()
row("data", "weight_fn returning a 0-d tensor", _m, Ok(bool))(
    lambda: agrees(
        _hessian(M(), BATCHES, weight_fn=lambda b: torch.tensor(float(b[0].shape[0]))),
        reference("hessian"),
        1e-9,
    )
)


def _ignored(first_only: bool) -> list[Batch]:
    out = []
    for i, (x, y) in enumerate(BATCHES):
        y = y.clone()
        if i == 0 or not first_only:
            y[:] = -100
        out.append((x, y))
    return out


_token_ce = supervised_loss(nn.CrossEntropyLoss(ignore_index=-100))
_m = mlp()
row(
    "data",
    "every target ignored in the first batch",
    _m,
    Ok(bool),
    issue17=True,
)(
    lambda: agrees(
        HessianOperator(M(), _ignored(True), _token_ce),
        dense_hessian(mlp(), BATCHES[1:], ce),
        1e-9,
    )
)
_m = mlp()
row(
    "data",
    "every target ignored in every batch",
    _m,
    Raises(ValueError, "weight"),
    issue17=True,
)(lambda: _two_products(HessianOperator(M(), _ignored(False), _token_ce)))


# -- models ----------------------------------------------------------------------------------


def dropout_mlp(train: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 2)).to(DT)
    return m.train(train)


for _kind in KINDS:
    _m = dropout_mlp(True)
    row("models", f"{_kind}: dropout in train mode", _m, Raises(ValueError, "Dropout", "eval()"))(
        functools.partial(lambda k, m: KINDS[k](m, BATCHES), _kind, _m)
    )

_m = dropout_mlp(True)
row("models", "dropout in train mode, check_determinism=False", _m, Ok(lambda r: bool(r)))(
    lambda: bool(torch.isfinite(_hessian(M(), BATCHES, check_determinism=False).matmat(_V)).all())
)
_m = dropout_mlp(False)
row("models", "dropout in eval mode", _m, Ok(bool))(
    lambda: agrees(_hessian(M(), BATCHES), dense_hessian(dropout_mlp(False), BATCHES, ce), 1e-9)
)


class Noisy(nn.Module):
    """A linear model whose output carries multiplicative noise of relative size ``rel``."""

    def __init__(self, rel: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2).float()
        self.rel = rel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * (1 + self.rel * torch.randn_like(y))


_XF = [(x.float(), y) for x, y in BATCHES]
_m = Noisy(1e-7)
row(
    "models",
    "float32 loss with reduction-order noise (1e-7 relative)",
    _m,
    Ok(lambda op: op is not None),
    issue17=True,
)(lambda: _hessian(M(), _XF))
_m = Noisy(1e-2)
row("models", "hand-written noise of dropout scale (1e-2)", _m, Raises(ValueError, "differs"))(
    lambda: _hessian(M(), _XF)
)


def bn_mlp(train: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    m.train()
    with torch.no_grad():
        m(X)
    return m.train(train)


_m = bn_mlp(True)
row("models", "BatchNorm in train mode", _m, Ok(bool))(
    lambda: agrees(_hessian(M(), BATCHES), dense_hessian(bn_mlp(True), BATCHES, ce), 1e-9)
)
_m = bn_mlp(True)
row(
    "models",
    "BatchNorm in train mode with microbatches",
    _m,
    Raises(ValueError, "BatchNorm1d in train mode", "eval()"),
)(lambda: _two_products(_hessian(M(), BATCHES, microbatch_size=2)))
_m = bn_mlp(False)
row("models", "BatchNorm in eval mode with microbatches", _m, Ok(bool))(
    lambda: agrees(
        _hessian(M(), BATCHES, microbatch_size=2), dense_hessian(bn_mlp(False), BATCHES, ce), 1e-9
    )
)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(3, 2).to(DT)
        self.unused = nn.Linear(2, 2).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


_m = WithUnused()
row("models", "parameters that do not reach the loss", _m, Ok(bool))(
    lambda: agrees(_hessian(M(), BATCHES), dense_hessian(WithUnused(), BATCHES, ce), 1e-9)
)
_m = WithUnused()
row("models", "param_filter selecting only unused parameters", _m, Ok(bool))(
    lambda: bool(
        torch.count_nonzero(_hessian(M(), BATCHES, param_filter="unused.*").matmat(_V[:6])) == 0
    )
)
_m = mlp()
row("models", "param_filter selecting nothing", _m, Raises(ValueError, "no_such"))(
    lambda: _hessian(M(), BATCHES, param_filter="no_such.*")
)
_m = mlp()


@row("models", "frozen first layer", _m, Ok(bool))
def _frozen() -> bool:
    M()[0].requires_grad_(False)
    try:
        op = _hessian(M(), BATCHES)
        H = dense_hessian(M(), BATCHES, ce, names=["2.weight", "2.bias"])
        v = _V[:10]
        return rel_err(op.matmat(v), H @ v) <= 1e-9
    finally:
        M()[0].requires_grad_(True)


row("models", "model that is not a Module", None, Raises(TypeError, "nn.Module"))(
    lambda: HessianOperator(lambda x: x, BATCHES, ce)  # type: ignore[arg-type]
)
_m = mlp(dtype=torch.float32)
row("models", "float32 model, float64 vectors", _m, Ok(bool))(
    lambda: rel_err(_hessian(M(), _XF).matmat(_V), reference("hessian") @ _V) <= 1e-5
)
_m = mlp(dtype=torch.bfloat16)
row("models", "bfloat16 model, float32 vectors", _m, Ok(bool))(
    lambda: (
        rel_err(
            _hessian(M(), [(x.bfloat16(), y) for x, y in BATCHES]).matmat(_V.float()),
            reference("hessian") @ _V,
        )
        <= 0.1
    )
)


class Tolist(nn.Module):
    """A forward that goes through Python numbers (``.tolist()``): no graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.lin(x).tolist(), dtype=DT)


_m = Tolist()
row(
    "models",
    "forward that breaks the graph (.tolist())",
    _m,
    Raises(ValueError, "autograd graph"),
    issue17=True,
)(lambda: _two_products(_hessian(M(), BATCHES)))
_m = mlp()


@row("models", "a NaN parameter", _m, Raises(NonFiniteError, "batch index 0"))
def _nan_param() -> Any:
    with torch.no_grad():
        saved = M()[0].weight[0, 0].item()
        M()[0].weight[0, 0] = float("nan")
    snap = snapshot(M())
    try:
        return _two_products(_hessian(M(), BATCHES))
    finally:
        changed = _model_changed(M(), snap)
        with torch.no_grad():
            M()[0].weight[0, 0] = saved
        if changed is not None:
            raise AssertionError(changed)


_m = mlp()


@row("models", "operator built inside torch.no_grad()", _m, Ok(bool))
def _built_no_grad() -> bool:
    with torch.no_grad():
        op = _hessian(M(), BATCHES)
    return agrees(op, reference("hessian"), 1e-9)


_m = mlp()


@row("models", "product inside torch.no_grad()", _m, Ok(bool), issue17=True)
def _product_no_grad() -> bool:
    op = _hessian(M(), BATCHES)
    with torch.no_grad():
        return agrees(op, reference("hessian"), 1e-9)


_m = mlp()


@row("models", "product inside torch.inference_mode()", _m, Ok(bool), issue17=True)
def _product_inference() -> bool:
    op = _hessian(M(), BATCHES)
    with torch.inference_mode():
        out = op.matmat(_V.clone())
    return rel_err(out, reference("hessian") @ _V) <= 1e-9


_m = mlp()
row("models", "GGN forward_fn returning a tuple", _m, Raises(TypeError, "must return a tensor"))(
    lambda: GGNOperator(M(), BATCHES, lambda m, b: (m(b[0]),), cross_entropy_loss_of_output())
)
_m = mlp()
row("models", "GGN forward_fn returning integers", _m, Raises(TypeError, "floating"))(
    lambda: GGNOperator(
        M(), BATCHES, lambda m, b: m(b[0]).argmax(1), cross_entropy_loss_of_output()
    )
)
for _kind, _fwd in (
    ("ggn", lambda m, b: m(b[0]).detach()),
    ("mc", lambda m, b: m(b[0]).detach()),
    ("ef", lambda m, b: per_sample(m, b).detach()),
):
    _m = mlp()

    def _make(kind: str = _kind, fwd: Any = _fwd, m: nn.Module = _m) -> Any:
        if kind == "ggn":
            op: Any = GGNOperator(m, BATCHES, fwd, cross_entropy_loss_of_output())
        elif kind == "mc":
            op = MCFisherOperator(m, BATCHES, fwd, seed=0)
        else:
            op = EmpiricalFisherOperator(m, BATCHES, fwd)
        return _two_products(op)

    row(
        "models",
        f"{_kind}: detached output of the differentiated function",
        M(),
        Raises(ValueError, "autograd graph", ".detach()"),
        issue17=True,
    )(_make)
_m = mlp()


def _no_grad_forward(m: nn.Module, b: Batch) -> torch.Tensor:
    with torch.no_grad():
        return m(b[0])


row(
    "models",
    "mc: forward_fn under torch.no_grad()",
    _m,
    Raises(ValueError, "autograd graph", "no_grad"),
    issue17=True,
)(lambda: _two_products(MCFisherOperator(M(), BATCHES, _no_grad_forward, seed=0)))


# -- losses ----------------------------------------------------------------------------------


def _under_no_grad(m: nn.Module, b: Batch) -> torch.Tensor:
    with torch.no_grad():
        return ce(m, b)


def _under_inference(m: nn.Module, b: Batch) -> torch.Tensor:
    with torch.inference_mode():
        return ce(m, b)


for _name, _loss, _method in (
    ("loss .detach()", lambda m, b: ce(m, b).detach(), "autograd"),
    ("loss under torch.no_grad()", _under_no_grad, "autograd"),
    ("loss under torch.inference_mode()", _under_inference, "autograd"),
    ("loss rebuilt from .item()", lambda m, b: torch.tensor(ce(m, b).item()), "autograd"),
    ("finite differences, loss .detach()", lambda m, b: ce(m, b).detach(), "finite_difference"),
):
    _m = mlp()
    row("losses", _name, _m, Raises(ValueError, "autograd graph", "loss_fn"), issue17=True)(
        functools.partial(
            lambda m, loss, method: lanczos(
                HessianOperator(m, BATCHES, loss, method=method), k=3, seed=0
            ),
            _m,
            _loss,
            _method,
        )
    )
_m = mlp()
row("losses", "per-sample losses to the Hessian", _m, Raises(ValueError, "scalar"))(
    lambda: HessianOperator(M(), BATCHES, per_sample)
)
_m = mlp()
row("losses", "loss returning a Python float", _m, Raises(ValueError, "scalar"))(
    lambda: HessianOperator(M(), BATCHES, lambda m, b: float(ce(m, b)))
)


def _sum_hessian() -> torch.Tensor:
    """The curvature the operator computes for a summed loss: sum(B_b H_b) / N."""
    return sum(
        (len(b[1]) * dense_hessian(mlp(), [b], ce) * len(b[1]) for b in BATCHES),
        torch.zeros(26, 26, dtype=DT),
    ) / len(Y)


_m = mlp()
row(
    "losses",
    "loss with reduction='sum'",
    _m,
    Ok(bool, warns="summed over the samples"),
    issue17=True,
)(
    lambda: agrees(
        HessianOperator(M(), BATCHES, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")),
        _sum_hessian(),
        1e-9,
    )
)
_m = mlp()
row(
    "losses",
    "summed loss with an explicit weight_fn (no warning)",
    _m,
    Ok(bool),
)(
    lambda: agrees(
        HessianOperator(
            M(),
            BATCHES[:1],
            lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum"),
            weight_fn=lambda b: 1,
        ),
        dense_hessian(mlp(), BATCHES[:1], ce) * 5,
        1e-9,
    )
)
_m = mlp()
row(
    "losses",
    "GGN: summed loss of output (autograd)",
    _m,
    Ok(lambda op: op is not None, warns="summed over the samples"),
    issue17=True,
)(
    lambda: GGNOperator(
        M(),
        BATCHES,
        supervised_forward,
        lambda o, b: F.cross_entropy(o, b[1], reduction="sum"),
        loss_hvp="autograd",
    )
)
_m = mlp()
row("losses", "uncalled loss factory (supervised_loss)", _m, Raises(TypeError, "call it"))(
    lambda: HessianOperator(M(), BATCHES, supervised_loss)
)
_m = mlp()
row("losses", "uncalled loss-of-output factory", _m, Raises(TypeError, "call it"))(
    lambda: GGNOperator(M(), BATCHES, supervised_forward, cross_entropy_loss_of_output)
)
_m = mlp()
row(
    "losses",
    "GGN analytical path without .hvp",
    _m,
    Raises(ValueError, "loss_hvp='autograd'"),
)(lambda: GGNOperator(M(), BATCHES, supervised_forward, _ce_out))
_m = mlp()
row("losses", "GGN autograd path, any loss", _m, Ok(bool))(
    lambda: agrees(
        GGNOperator(M(), BATCHES, supervised_forward, _ce_out, loss_hvp="autograd"),
        reference("ggn"),
        1e-9,
    )
)
_m = mlp()
row(
    "losses",
    "GGN autograd path, detached loss of output",
    _m,
    Raises(ValueError, "autograd graph", "loss_of_output_fn"),
    issue17=True,
)(
    lambda: _two_products(
        GGNOperator(
            M(),
            BATCHES,
            supervised_forward,
            lambda o, b: _ce_out(o, b).detach(),
            loss_hvp="autograd",
        )
    )
)
_m = mlp()
row("losses", "GGN loss of output that is not a scalar", _m, Raises(ValueError, "scalar"))(
    lambda: GGNOperator(
        M(),
        BATCHES,
        supervised_forward,
        lambda o, b: F.cross_entropy(o, b[1], reduction="none"),
        loss_hvp="autograd",
    )
)
_m = mlp()
row("losses", "GGN .hvp of the wrong shape", _m, Raises(ValueError, "shape"))(
    lambda: _two_products(
        GGNOperator(
            M(),
            BATCHES,
            supervised_forward,
            loss_of_output(_ce_out, hvp=lambda o, b, u: u[:, :1]),
        )
    )
)
_m = mlp()
row("losses", "empirical Fisher with a reduced loss", _m, Raises(ValueError, "reduction='none'"))(
    lambda: EmpiricalFisherOperator(M(), BATCHES, ce)
)
_m = mlp()
row("losses", "empirical Fisher, one loss too few", _m, Raises(ValueError, "per-sample losses"))(
    lambda: _two_products(
        EmpiricalFisherOperator(
            M(), BATCHES, lambda m, b: per_sample(m, b)[:-1], check_determinism=False
        )
    )
)
_m = mlp()
row(
    "losses",
    "MC Fisher called with the GGN's signature",
    _m,
    Raises(TypeError, "takes no loss", "likelihood="),
    issue17=True,
)(lambda: MCFisherOperator(M(), BATCHES, supervised_forward, cross_entropy_loss_of_output()))
_m = mlp()
row("losses", "MC Fisher, unknown likelihood", _m, Raises(ValueError, "likelihood"))(
    lambda: MCFisherOperator(M(), BATCHES, supervised_forward, likelihood="poisson")
)
_m = mlp()
row("losses", "MC Fisher, num_samples=0", _m, Raises(ValueError, "num_samples"))(
    lambda: MCFisherOperator(M(), BATCHES, supervised_forward, num_samples=0)
)
_m = mlp()
row(
    "losses", "MC Fisher, class_dim out of range", _m, Raises(ValueError, "class_dim"), issue17=True
)(lambda: _two_products(MCFisherOperator(M(), BATCHES, supervised_forward, class_dim=2)))


def _fails_on(index: int) -> Callable[[nn.Module, Batch], torch.Tensor]:
    def loss(m: nn.Module, b: Batch) -> torch.Tensor:
        if b[0].shape[0] == SIZES[index]:
            raise KeyError("labels")
        return ce(m, b)

    return loss


_m = mlp()
row(
    "losses",
    "loss raising on batch index 2",
    _m,
    Raises(KeyError, "labels", "batch index 2"),
    issue17=True,
)(lambda: _two_products(HessianOperator(M(), BATCHES, _fails_on(2))))


def _nan_loss_on(index: int) -> Callable[[nn.Module, Batch], torch.Tensor]:
    def loss(m: nn.Module, b: Batch) -> torch.Tensor:
        out = ce(m, b)
        return out * float("nan") if b[0].shape[0] == SIZES[index] else out

    return loss


_m = mlp()
row("losses", "loss NaN on batch index 1", _m, Raises(NonFiniteError, "batch index 1"))(
    lambda: _two_products(HessianOperator(M(), BATCHES, _nan_loss_on(1)))
)
_m = mlp()
row(
    "losses",
    "loss NaN on the first batch",
    _m,
    Raises(NonFiniteError, "batch index 0"),
    issue17=True,
)(lambda: _two_products(HessianOperator(M(), BATCHES, _nan_loss_on(0))))


def _token_batches() -> list[Batch]:
    out = []
    for x, y in BATCHES:
        y = y.clone()
        y[0] = -100
        out.append((x, y))
    return out


def _token_oracle() -> torch.Tensor:
    kept = [(x[1:], y[1:]) for x, y in BATCHES]
    return dense_hessian(mlp(), kept, ce)


_m = mlp()
row("losses", "ignored targets weight batches by token count", _m, Ok(bool))(
    lambda: agrees(HessianOperator(M(), _token_batches(), _token_ce), _token_oracle(), 1e-9)
)


# -- vectors ---------------------------------------------------------------------------------

_mv = mlp()
_H = HessianOperator(_mv, BATCHES, ce)
_H_FD = HessianOperator(mlp(), BATCHES, ce, method="finite_difference")
_m32 = mlp(dtype=torch.float32)
_H32 = HessianOperator(_m32, _XF, ce)
_H32_FD = HessianOperator(mlp(dtype=torch.float32), _XF, ce, method="finite_difference")
_GGN = KINDS["ggn"](mlp(), BATCHES)
_v = _V[:, 0].clone()

row("vectors", "wrong length", _mv, Raises(ValueError, "shape (26,)"))(lambda: _H.matvec(_v[:5]))
row("vectors", "2-D tensor to matvec", _mv, Raises(ValueError, "matmat"))(lambda: _H.matvec(_V))
row("vectors", "integer vector", _mv, Raises(TypeError, "floating"))(
    lambda: _H.matvec(torch.ones(26, dtype=torch.int64))
)
row("vectors", "lower precision than the operator", _mv, Raises(TypeError, "precision"))(
    lambda: _H.matvec(_v.float())
)
row("vectors", "numpy array", _mv, Raises(TypeError, "torch.Tensor"))(lambda: _H.matvec(_v.numpy()))
row("vectors", "Python list", _mv, Raises(TypeError, "torch.Tensor"))(
    lambda: _H.matvec(_v.tolist())
)
row("vectors", "vector on another device", _mv, Raises(ValueError, "device"))(
    lambda: _H.matvec(torch.empty(26, dtype=DT, device="meta"))
)


def _with(value: float) -> torch.Tensor:
    out = _v.clone()
    out[7] = value
    return out


row(
    "vectors",
    "NaN entry in the vector",
    _mv,
    Raises(NonFiniteError, "vector is to blame", "index 7"),
    issue17=True,
)(lambda: _H.matvec(_with(float("nan"))))
row(
    "vectors",
    "inf entry in the vector",
    _mv,
    Raises(NonFiniteError, "vector is to blame"),
    issue17=True,
)(lambda: _H.matvec(_with(float("inf"))))
row(
    "vectors",
    "NaN entry in a block (GGN)",
    None,
    Raises(NonFiniteError, "block", "to blame"),
    issue17=True,
)(lambda: _GGN.matmat(torch.stack([_v, _with(float("nan"))], 1)))
row("vectors", "zero vector", _mv, Ok(lambda out: bool(torch.count_nonzero(out) == 0)))(
    lambda: _H.matvec(torch.zeros(26, dtype=DT))
)
_H32_REF = dense_hessian(mlp(dtype=torch.float32).double(), BATCHES, ce)
for _name, _op, _tol in (("autograd", _H32, 1e-5), ("finite differences", _H32_FD, 5e-3)):
    for _scale in (1e-42, 1e-300, 1e200):
        row(
            "vectors",
            f"{_name}: float64 vector of norm ~{_scale:g} on a float32 model",
            _m32,
            Ok(functools.partial(lambda tol, r: r <= tol, _tol)),
            issue17=True,
        )(
            functools.partial(
                lambda op, s: rel_err(op.matvec(_v * s) / s, _H32_REF @ _v), _op, _scale
            )
        )
row(
    "vectors",
    "empty block to matmat",
    _mv,
    Ok(lambda out: tuple(out.shape) == (26, 0)),
    issue17=True,
)(lambda: _H.matmat(torch.zeros(26, 0, dtype=DT)))
row("vectors", "block of three vectors", _mv, Ok(bool))(
    lambda: rel_err(_H.matmat(_V), reference("hessian") @ _V) <= 1e-9
)
row("vectors", "block with the wrong number of rows", _mv, Raises(ValueError, "(26, b)"))(
    lambda: _H.matmat(_V[:20])
)
row("vectors", "non-contiguous vector", _mv, Ok(bool))(
    lambda: rel_err(_H.matvec(_V[:, 0]), reference("hessian") @ _V[:, 0]) <= 1e-9
)
row("vectors", "vector that requires grad", _mv, Ok(lambda out: not out.requires_grad))(
    lambda: _H.matvec(_v.clone().requires_grad_(True))
)
row("vectors", "an nn.Parameter as the vector", _mv, Ok(bool))(
    lambda: rel_err(_H.matvec(nn.Parameter(_v.clone())), reference("hessian") @ _v) <= 1e-9
)
row("vectors", "finite differences: tiny float64 vector", _mv, Ok(bool), issue17=True)(
    lambda: rel_err(_H_FD.matvec(_v * 1e-300) / 1e-300, reference("hessian") @ _v) <= 1e-5
)


# -- algorithm arguments ---------------------------------------------------------------------

N = 30
_Q, _ = torch.linalg.qr(torch.randn(N, N, generator=_G, dtype=DT))
EIG = torch.cat([torch.tensor([9.0, 7.0, 5.0], dtype=DT), torch.linspace(-1, 2, N - 3, dtype=DT)])
A = (_Q * EIG) @ _Q.T


def sym_op(**kw: Any) -> LambdaOperator:
    return LambdaOperator(lambda v: A @ v, N, dtype=DT, **kw)


_OP = sym_op()
TOP3 = torch.tensor([9.0, 7.0, 5.0], dtype=DT)

_ARGS: list[tuple[str, Callable[[], Any], Ok | Raises]] = [
    ("lanczos k=0", lambda: lanczos(_OP, k=0, seed=0), Raises(ValueError, "k")),
    ("lanczos k > size", lambda: lanczos(_OP, k=31, seed=0), Raises(ValueError, "size")),
    ("lanczos k float", lambda: lanczos(_OP, k=2.5, seed=0), Raises(TypeError, "k")),
    (
        "lanczos which='XX'",
        lambda: lanczos(_OP, k=2, which="XX", seed=0),
        Raises(ValueError, "which"),
    ),
    ("lanczos tol=0", lambda: lanczos(_OP, k=2, tol=0.0, seed=0), Raises(ValueError, "tol")),
    ("lanczos tol=2", lambda: lanczos(_OP, k=2, tol=2.0, seed=0), Raises(ValueError, "tol")),
    ("lanczos seed=1.5", lambda: lanczos(_OP, k=2, seed=1.5), Raises(TypeError, "seed")),
    ("lanczos seed='a'", lambda: lanczos(_OP, k=2, seed="a"), Raises(TypeError, "seed")),
    ("lanczos on a tensor", lambda: lanczos(A, k=2), Raises(TypeError, "LambdaOperator")),
    (
        "lanczos on symmetric=False",
        lambda: lanczos(sym_op(symmetric=False), k=2, seed=0),
        Raises(ValueError, "symmetric"),
    ),
    (
        "lanczos misspelt keyword",
        lambda: lanczos(_OP, k=2, seed=0, chekpoint="x"),
        Raises(TypeError, "chekpoint"),
    ),
    (
        "lanczos vector_dtype below the operator's",
        lambda: lanczos(_OP, k=2, seed=0, vector_dtype=torch.float32),
        Raises((TypeError, ValueError), "precise"),
    ),
    (
        "lanczos top-3",
        lambda: lanczos(_OP, k=3, seed=0),
        Ok(lambda r: bool(torch.allclose(r.eigenvalues, TOP3, atol=1e-8))),
    ),
    (
        "lanczos which='SA'",
        lambda: lanczos(_OP, k=1, which="SA", seed=0),
        Ok(lambda r: abs(float(r.eigenvalues[0]) + 1.0) <= 1e-8),
    ),
    ("trace num_matvecs=1", lambda: trace(_OP, 1, seed=0), Raises(ValueError, "num_matvecs")),
    (
        "trace method='xx'",
        lambda: trace(_OP, 20, method="xx", seed=0),
        Raises(ValueError, "method"),
    ),
    (
        "trace distribution='xx'",
        lambda: trace(_OP, 20, distribution="xx", seed=0),
        Raises(ValueError, "distribution"),
    ),
    ("trace seed='a'", lambda: trace(_OP, 20, seed="a"), Raises(TypeError, "seed")),
    (
        "trace (hutch++) within its error bar",
        lambda: trace(_OP, 60, seed=0),
        Ok(lambda r: abs(r.estimate - float(EIG.sum())) <= 5 * r.stderr + 1e-8),
    ),
    (
        "trace (hutchinson) within its error bar",
        lambda: trace(_OP, 60, method="hutchinson", seed=0),
        Ok(lambda r: abs(r.estimate - float(EIG.sum())) <= 5 * r.stderr + 1e-8),
    ),
    (
        "hutchinson num_matvecs=0",
        lambda: hutchinson(_OP, 0, seed=0),
        Raises(ValueError, "num_matvecs"),
    ),
    (
        "hutchinson distribution='xx'",
        lambda: hutchinson(_OP, 10, distribution="xx", seed=0),
        Raises(ValueError, "distribution"),
    ),
    (
        "spectral_density num_runs=0",
        lambda: spectral_density(_OP, 0, 10, seed=0),
        Raises(ValueError, "num_runs"),
    ),
    (
        "spectral_density lanczos_steps=0",
        lambda: spectral_density(_OP, 2, 0, seed=0),
        Raises(ValueError, "lanczos_steps"),
    ),
    (
        "spectral_density scale='xx'",
        lambda: spectral_density(_OP, 2, 10, scale="xx", seed=0),
        Raises(ValueError, "scale"),
    ),
    (
        "spectral_density sigma=-1",
        lambda: spectral_density(_OP, 2, 10, sigma=-1.0, seed=0),
        Raises(ValueError, "sigma"),
    ),
    (
        "spectral_density integrates to 1",
        lambda: spectral_density(_OP, 4, 30, seed=0),
        Ok(lambda r: abs(float(np.trapezoid(r.density, r.grid)) - 1.0) <= 1e-2),
    ),
    (
        "deflated_power_iteration k=0",
        lambda: deflated_power_iteration(_OP, 0, seed=0),
        Raises(ValueError, "k"),
    ),
    (
        "deflated_power_iteration k > size",
        lambda: deflated_power_iteration(_OP, 31, seed=0),
        Raises(ValueError, "size"),
    ),
    (
        "deflated_power_iteration max_iter=0",
        lambda: deflated_power_iteration(_OP, 1, max_iter=0, seed=0),
        Raises(ValueError, "max_iter"),
    ),
    (
        "deflated_power_iteration tol=-1",
        lambda: deflated_power_iteration(_OP, 1, tol=-1.0, seed=0),
        Raises(ValueError, "tol"),
    ),
    (
        "deflated_power_iteration top-1",
        lambda: deflated_power_iteration(_OP, 1, max_iter=400, tol=1e-10, seed=0),
        Ok(lambda r: abs(float(r.eigenvalues[0]) - 9.0) <= 1e-6),
    ),
    (
        "power_iteration_one init_vec of the wrong shape",
        lambda: power_iteration_one(_OP, init_vec=torch.ones(5, dtype=DT)),
        Raises(ValueError, "init_vec"),
    ),
    (
        "stochastic_power_iteration k=0",
        lambda: stochastic_power_iteration(_OP, 0, seed=0),
        Raises(ValueError, "k"),
    ),
    (
        "stochastic_power_iteration momentum='a'",
        lambda: stochastic_power_iteration(_OP, 1, momentum="a", seed=0),
        Raises((TypeError, ValueError), "momentum"),
    ),
    (
        "stochastic_power_iteration on a fixed operator",
        lambda: stochastic_power_iteration(_OP, 1, max_iter=300, seed=0),
        Ok(lambda r: abs(float(r.eigenvalues[0]) - 9.0) <= 0.2),
    ),
    (
        "diagonal method='xx'",
        lambda: diagonal(_OP, 20, method="xx", seed=0),
        Raises(ValueError, "method"),
    ),
    ("diagonal num_matvecs=0", lambda: diagonal(_OP, 0, seed=0), Raises(ValueError, "num_matvecs")),
    (
        "diagonal within its error bars",
        lambda: diagonal(_OP, 200, seed=0),
        Ok(lambda r: bool((abs(r.estimate - torch.diagonal(A)) <= 5 * r.stderr + 1e-8).all())),
    ),
    (
        "lanczos_tridiagonal v0 of the wrong shape",
        lambda: lanczos_tridiagonal(_OP, torch.ones(5, dtype=DT), 5),
        Raises(ValueError, "v0"),
    ),
    (
        "lanczos_tridiagonal max_iter=0",
        lambda: lanczos_tridiagonal(_OP, torch.ones(N, dtype=DT), 0),
        Raises(ValueError, "max_iter"),
    ),
    (
        "time_limit=-1",
        lambda: lanczos(_OP, k=2, seed=0, time_limit=-1.0),
        Raises(ValueError, "time_limit"),
    ),
    (
        "time_limit='a'",
        lambda: trace(_OP, 20, seed=0, time_limit="a"),
        Raises((TypeError, ValueError), "time_limit"),
    ),
    (
        "checkpoint_every without checkpoint",
        lambda: lanczos(_OP, k=2, seed=0, checkpoint_every=5),
        Raises(ValueError, "checkpoint="),
    ),
    (
        "checkpoint that is not a path",
        lambda: spectral_density(_OP, 2, 4, seed=0, checkpoint=3),
        Raises(TypeError, "checkpoint must be a path"),
    ),
    (
        "checkpoint_seconds=-1",
        lambda: trace(_OP, 20, seed=0, checkpoint="x.ckpt", checkpoint_seconds=-1.0),
        Raises(ValueError, "checkpoint_seconds"),
    ),
    (
        "seed=None draws fresh probes",
        lambda: (trace(_OP, 20, method="hutchinson"), trace(_OP, 20, method="hutchinson")),
        Ok(lambda r: r[0].estimate != r[1].estimate),
    ),
]
for _name, _act, _expect in _ARGS:
    row("arguments", _name, None, _expect)(_act)


# -- checkpoints -----------------------------------------------------------------------------

_CKPT_DIR: list[Path] = []


def ckpt_dir() -> Path:
    if not _CKPT_DIR:
        import tempfile

        _CKPT_DIR.append(Path(tempfile.mkdtemp(prefix="reliability-")))
    return _CKPT_DIR[0]


_WriteError = _error_type("CheckpointWriteError")
_CorruptError = _error_type("CorruptCheckpointError")
_MismatchError = _error_type("CheckpointMismatchError")


row("checkpoints", "directory that does not exist", None, Raises(ValueError, "does not exist"))(
    lambda: lanczos(_OP, k=2, seed=0, checkpoint=ckpt_dir() / "missing" / "run.ckpt")
)
row(
    "checkpoints",
    "checkpoint path that is a directory",
    None,
    Raises(_WriteError, "is a directory"),
    issue17=True,
)(lambda: lanczos(_OP, k=2, seed=0, checkpoint=ckpt_dir(), checkpoint_every=4))


class Counting:
    """A LambdaOperator matvec that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return A @ v


def _unwritable_path() -> str:
    """A file path no process can create (``/proc`` on Linux, else a read-only folder)."""
    if Path("/proc/self").is_dir():
        return "/proc/run.ckpt"
    folder = ckpt_dir() / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o500)
    return str(folder / "run.ckpt")


_UNWRITABLE = _unwritable_path()


@row(
    "checkpoints",
    "unwritable location (found before any product)",
    None,
    Raises(_WriteError, "cannot be written", _UNWRITABLE),
    issue17=True,
)
def _unwritable() -> Any:
    counter = Counting()
    op = LambdaOperator(counter, N, dtype=DT)
    try:
        return lanczos(op, k=2, seed=0, checkpoint=_UNWRITABLE, checkpoint_every=4)
    finally:
        if counter.calls:
            raise AssertionError(f"{counter.calls} products before the location was refused")


@row(
    "checkpoints",
    "a write that fails mid-run keeps the partial result",
    None,
    Raises(_WriteError, "run.ckpt", "partial"),
    issue17=True,
)
def _disk_full() -> Any:
    import hessian_eigenthings.algorithms.checkpoint as ck

    real = os.fsync
    writes = [0]

    def full(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            writes[0] += 1
            if writes[0] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    path = ckpt_dir() / "run.ckpt"
    ck.os.fsync = full  # type: ignore[attr-defined]
    try:
        lanczos(_OP, k=3, seed=0, tol=1e-14, checkpoint=path, checkpoint_every=2)
    except _WriteError as err:
        partial = getattr(err, "partial", None)
        if partial is None or partial.eigenvalues.shape != (3,):
            raise AssertionError("no partial result on the error") from err
        raise
    finally:
        ck.os.fsync = real  # type: ignore[attr-defined]
        for p in ckpt_dir().glob("*run.ckpt*"):
            p.unlink()


@row("checkpoints", "corrupt checkpoint file", None, Raises(_CorruptError, "corrupt.ckpt"))
def _corrupt() -> Any:
    path = ckpt_dir() / "corrupt.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    try:
        return lanczos(_OP, k=2, seed=0, checkpoint=path)
    finally:
        path.unlink()


@row("checkpoints", "checkpoint of another configuration", None, Raises(_MismatchError, "k:"))
def _mismatch() -> Any:
    path = ckpt_dir() / "mismatch.ckpt"
    lanczos(_OP, k=2, seed=0, tol=1e-14, checkpoint=path, time_limit=1e-9)
    try:
        return lanczos(_OP, k=3, seed=0, tol=1e-14, checkpoint=path)
    finally:
        path.unlink(missing_ok=True)


@row("checkpoints", "resume after a time limit gives the same result", None, Ok(bool))
def _resume() -> bool:
    path = ckpt_dir() / "resume.ckpt"
    whole = lanczos(_OP, k=3, seed=0)
    cut = lanczos(_OP, k=3, seed=0, checkpoint=path, time_limit=1e-9)
    resumed = lanczos(_OP, k=3, seed=0, checkpoint=path)
    return (
        cut.stop_reason == "time_limit"
        and torch.equal(resumed.eigenvalues, whole.eigenvalues)
        and not path.exists()
    )


# -- custom operators ------------------------------------------------------------------------


def _lam(fn: Callable[[torch.Tensor], Any], **kw: Any) -> LambdaOperator:
    return LambdaOperator(fn, N, dtype=DT, **kw)


_ones = torch.ones(N, dtype=DT)
row("custom", "matvec_fn of the wrong shape", None, Raises(ValueError, f"({N},)"))(
    lambda: _lam(lambda v: v[:5]).matvec(_ones)
)
row("custom", "matvec_fn returning numpy", None, Raises((TypeError, ValueError), "tensor"))(
    lambda: _lam(lambda v: (A @ v).numpy()).matvec(_ones)
)
row(
    "custom",
    "matvec_fn returning int64",
    None,
    Raises(TypeError, "int64", "floating"),
    issue17=True,
)(lambda: _lam(lambda v: (A @ v).round().long()).matvec(_ones))
row(
    "custom",
    "matvec_fn returning float16 for a float64 operator",
    None,
    Raises(TypeError, "float16", "precise"),
    issue17=True,
)(lambda: lanczos(_lam(lambda v: (A @ v).half()), k=3, seed=0))
_P = torch.ones(1, dtype=DT, requires_grad=True)
row(
    "custom",
    "matvec_fn returning a tensor that requires grad (lanczos)",
    None,
    Ok(
        lambda r: not r.eigenvalues.requires_grad and torch.allclose(r.eigenvalues, TOP3),
        warns="requires grad",
    ),
    issue17=True,
)(lambda: lanczos(_lam(lambda v: (A @ v) * _P), k=3, seed=0))
row(
    "custom",
    "matvec_fn returning a tensor that requires grad (trace)",
    None,
    Ok(lambda r: abs(r.estimate - float(EIG.sum())) <= 5 * r.stderr + 1e-8),
    issue17=True,
)(lambda: trace(_lam(lambda v: (A @ v) * _P), 60, seed=0))


def _in_place(v: torch.Tensor) -> torch.Tensor:
    return v.copy_(A @ v)


row(
    "custom",
    "matvec_fn that overwrites its input",
    None,
    Ok(lambda r: bool(torch.allclose(r.eigenvalues, TOP3, atol=1e-8))),
    issue17=True,
)(lambda: lanczos(_lam(_in_place), k=3, seed=0))
_B = torch.randn(N, N, generator=_G, dtype=DT)
_SYMMETRY = (
    {"check_symmetry": True}
    if "check_symmetry" in inspect.signature(LambdaOperator).parameters
    else {}
)
row(
    "custom",
    "non-symmetric matvec_fn, symmetry probe on",
    None,
    Raises(ValueError, "not symmetric"),
    issue17=True,
)(lambda: lanczos(_lam(lambda v: _B @ v, **_SYMMETRY), k=3, seed=0))
row("custom", "symmetric matvec_fn, symmetry probe on", None, Ok(bool))(
    lambda: torch.allclose(
        lanczos(_lam(lambda v: A @ v, **_SYMMETRY), k=3, seed=0).eigenvalues, TOP3
    )
)
row("custom", "size=0", None, Raises(ValueError, "size"))(lambda: LambdaOperator(lambda v: v, 0))
row("custom", "size=2.5", None, Raises(ValueError, "size"))(
    lambda: LambdaOperator(lambda v: v, 2.5)  # type: ignore[arg-type]
)
row("custom", "integer dtype", None, Raises(TypeError, "floating"))(
    lambda: LambdaOperator(lambda v: v, 3, dtype=torch.int64)
)
row("custom", "matvec_fn not callable", None, Raises(TypeError, "callable"))(
    lambda: LambdaOperator(A, N)  # type: ignore[arg-type]
)
row(
    "custom",
    "matmat_fn of the wrong shape",
    None,
    Raises(ValueError, "matmat_fn", "shape"),
    issue17=True,
)(
    lambda: _lam(lambda v: A @ v, matmat_fn=lambda V: A @ V[:, :1]).matmat(
        torch.ones(N, 3, dtype=DT)
    )
)


def _nan_after(count: int) -> Callable[[torch.Tensor], torch.Tensor]:
    calls = [0]

    def fn(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return A @ v if calls[0] < count else torch.full_like(v, float("nan"))

    return fn


@row(
    "custom",
    "matvec_fn turning NaN mid-run (partial result)",
    None,
    Raises(NonFiniteError, "partial"),
)
def _nan_mid_run() -> Any:
    try:
        return lanczos(_lam(_nan_after(25)), k=3, seed=0, tol=1e-14)
    except NonFiniteError as err:
        if err.partial is None or err.matvec != 25:
            raise AssertionError("no partial result / wrong product index") from err
        raise


row("custom", "matvec_fn raising", None, Raises(ZeroDivisionError, "boom"))(
    lambda: lanczos(_lam(lambda v: (_ for _ in ()).throw(ZeroDivisionError("boom"))), k=2, seed=0)
)
row("custom", "to_scipy agrees with the matrix", None, Ok(bool))(
    lambda: np.allclose(sym_op().to_scipy() @ np.ones(N), (A @ _ones).numpy())
)
row("custom", "LambdaOperator on a float32 matrix, float64 vectors", None, Ok(bool))(
    lambda: (
        rel_err(
            LambdaOperator(lambda v: A.float() @ v, N, dtype=torch.float32).matvec(_ones), A @ _ones
        )
        <= 1e-6
    )
)


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_row(case: Case) -> None:
    verdict, detail = judge(case)
    assert verdict == "good", f"{case!r}: {verdict}: {detail}"


def test_the_table_covers_every_group() -> None:
    groups = {c.group for c in CASES}
    assert groups == {"data", "models", "losses", "vectors", "arguments", "checkpoints", "custom"}
    names = [repr(c) for c in CASES]
    assert len(names) == len(set(names)), "duplicate row names"


def main() -> None:
    counts: dict[str, dict[str, int]] = {}
    for case in CASES:
        verdict, detail = judge(case)
        counts.setdefault(case.group, {"good": 0, "misleading": 0, "silent": 0})[verdict] += 1
        if verdict != "good":
            print(f"{verdict:10s} {case!r}: {detail[:200]}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("good", "misleading", "silent")}
    for group, c in counts.items():
        print(f"{group:12s} {c}")
    print(f"{'total':12s} {total} of {len(CASES)}")


if __name__ == "__main__":
    sys.exit(main())
