"""Devices are compared by what they denote, and a torchrun rank uses its own GPU.

A CUDA tensor always reports its index (``cuda:0``) while users write ``"cuda"``; a CPU
tensor reports ``cpu`` while ``"cpu:0"`` / ``torch.device("cpu", 0)`` are valid spellings
of the same device. The CPU spellings are the analogue tested everywhere; the CUDA cases
run under ``-m cuda`` (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from hessian_eigenthings import LambdaOperator, lanczos
from hessian_eigenthings.algorithms.lanczos_tridiagonal import lanczos_tridiagonal
from hessian_eigenthings.backends.devices import canonical_device, pins_for, same_device

CUDA = torch.cuda.is_available()
CPU_SPELLINGS = ["cpu:0", torch.device("cpu", 0), "cpu"]


def _diag_op(device: Any, n: int = 6) -> tuple[LambdaOperator, torch.Tensor]:
    d = torch.arange(1.0, n + 1, dtype=torch.float64)
    return LambdaOperator(lambda v: d.to(v.device) * v, n, dtype=torch.float64, device=device), d


def test_canonical_device_and_same_device() -> None:
    for spelling in CPU_SPELLINGS:
        assert canonical_device(spelling) == torch.device("cpu")
        assert same_device(spelling, torch.zeros(1).device)
    assert canonical_device("meta") == torch.device("meta")
    assert not same_device("cpu", "meta")


@pytest.mark.parametrize("device", CPU_SPELLINGS, ids=str)
def test_lambda_operator_accepts_vectors_on_any_spelling_of_its_device(device: Any) -> None:
    op, d = _diag_op(device)
    assert op.device == torch.device("cpu")  # stored as a tensor there reports it
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), d * v, rtol=0, atol=0)
    torch.testing.assert_close(op.matmat(v[:, None].repeat(1, 2)), (d * v)[:, None].repeat(1, 2))


@pytest.mark.parametrize("device", CPU_SPELLINGS, ids=str)
def test_lanczos_and_tridiagonal_accept_any_spelling(device: Any) -> None:
    op, d = _diag_op(device)
    res = lanczos_tridiagonal(op, torch.ones(6, dtype=torch.float64), 6)
    torch.testing.assert_close(torch.linalg.eigvalsh(res.matrix()), d)
    eig = lanczos(op, k=2, seed=0, basis_device=device)
    torch.testing.assert_close(eig.eigenvalues, torch.tensor([6.0, 5.0], dtype=torch.float64))


def test_a_vector_on_another_device_is_still_refused() -> None:
    op, _ = _diag_op("cpu")
    with pytest.raises(ValueError, match="expected a vector on device cpu, got meta"):
        op.matvec(torch.zeros(6, dtype=torch.float64, device="meta"))


# ---------------------------------------------------------------- collectives under NCCL
class _FakeGroup:
    def __init__(self, bound: torch.device | None) -> None:
        self.bound_device_id = bound


@pytest.fixture
def nccl_without_set_device(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A rank of an NCCL job on a 4-GPU node that never called ``torch.cuda.set_device``."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    return monkeypatch


def test_nccl_control_tensors_go_to_the_local_rank_gpu(nccl_without_set_device: Any) -> None:
    from hessian_eigenthings.backends.distributed import collective_device

    group = _FakeGroup(None)
    assert collective_device(group, torch.device("cpu")) == torch.device("cuda", 3)
    # a tensor already on a GPU stays there
    assert collective_device(group, torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_nccl_bound_device_and_selected_device_win(nccl_without_set_device: Any) -> None:
    from hessian_eigenthings.backends.distributed import collective_device

    bound = _FakeGroup(torch.device("cuda", 2))
    assert collective_device(bound, torch.device("cpu")) == torch.device("cuda", 2)
    nccl_without_set_device.setattr(torch.cuda, "current_device", lambda: 1)
    assert collective_device(_FakeGroup(None), torch.device("cpu")) == torch.device("cuda", 1)


def test_gloo_keeps_cpu_control_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from hessian_eigenthings.backends.distributed import collective_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device(None, torch.device("cpu")) == torch.device("cpu")


# ---------------------------------------------------------------- pinned host basis
def test_pinning_is_requested_only_for_host_buffers_of_cuda_operators() -> None:
    assert pins_for(torch.device("cpu"), torch.device("cuda", 0))
    assert not pins_for(torch.device("cpu"), torch.device("cpu"))
    assert not pins_for(torch.device("cuda", 0), torch.device("cuda", 0))
    assert not pins_for(torch.device("meta"), torch.device("cuda", 0))


def test_lanczos_host_basis_of_a_cpu_operator_is_not_pinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lanczos_module = importlib.import_module("hessian_eigenthings.algorithms.lanczos")

    requests: list[tuple[torch.device, torch.device]] = []
    real = lanczos_module.host_zeros

    def recording(shape: tuple[int, ...], **kw: Any) -> torch.Tensor:
        requests.append((kw["device"], kw["serves"]))
        return real(shape, **kw)

    monkeypatch.setattr(lanczos_module, "host_zeros", recording)
    op, _ = _diag_op("cpu", n=40)
    lanczos(op, k=2, seed=0, basis_device="cpu", basis_size=4)
    assert requests, "the basis is allocated through host_zeros"
    assert all(not pins_for(store, serves) for store, serves in requests)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_lambda_operator_spelled_without_index() -> None:
    d = torch.arange(1.0, 7.0, dtype=torch.float64, device="cuda")
    op = LambdaOperator(lambda v: d * v, 6, dtype=torch.float64, device="cuda")
    assert op.device == torch.device("cuda", torch.cuda.current_device())
    v = torch.randn(6, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(op.matvec(v), d * v)
    eig = lanczos(op, k=2, seed=0)
    torch.testing.assert_close(eig.eigenvalues.cpu(), torch.tensor([6.0, 5.0], dtype=torch.float64))
    res = lanczos_tridiagonal(op, torch.ones(6, dtype=torch.float64, device="cuda"), 6)
    torch.testing.assert_close(torch.linalg.eigvalsh(res.matrix()).cpu(), d.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_operator_host_basis_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    lanczos_module = importlib.import_module("hessian_eigenthings.algorithms.lanczos")

    made: list[torch.Tensor] = []
    real = lanczos_module.host_zeros

    def recording(shape: tuple[int, ...], **kw: Any) -> torch.Tensor:
        made.append(real(shape, **kw))
        return made[-1]

    monkeypatch.setattr(lanczos_module, "host_zeros", recording)
    d = torch.linspace(1.0, 2.0, 200, dtype=torch.float64, device="cuda")
    op = LambdaOperator(lambda v: d * v, 200, dtype=torch.float64, device="cuda")
    res = lanczos(op, k=2, seed=0, basis_device="cpu")
    assert res.eigenvectors.device.type == "cpu"
    assert made and all(t.device.type == "cpu" and t.is_pinned() for t in made)
