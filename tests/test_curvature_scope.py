"""The math attention kernel only where it is needed; normalisation probes in the model's dtype.

``curvature_mode`` selects the math SDPA backend (twice and forward-mode differentiable,
but it stores a ``T x T`` matrix per head and layer). Only the Hessian's double backward
and the exact Jacobian-vector products of the GGN / Fishers need it; finite differences,
the ordinary forward + reverse pass of the GGN / Fishers and the determinism probe keep
the user's kernels. A model records, in every forward, whether the fused (flash) kernel
was allowed and whether it ran on dual (forward-mode) tensors: the CPU analogue of
inspecting the CUDA SDPA backend during each product.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output
from hessian_eigenthings.operators import _autodiff_safety as safety

DT = torch.float64


class RecordingAttention(nn.Module):
    """One attention layer over ``(B, T, 4)`` inputs, then a 3-class head on token 0."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)
        self.log: list[tuple[bool, bool]] = []  # (fused kernel allowed, dual tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        self.log.append(
            (torch.backends.cuda.flash_sdp_enabled(), fwAD.unpack_dual(q).tangent is not None)
        )
        return self.head(F.scaled_dot_product_attention(q, k, v).squeeze(1)[:, 0])


def _setup() -> tuple[RecordingAttention, list[Any]]:
    torch.manual_seed(0)
    model = RecordingAttention().to(DT)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 6, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g))]
    return model, data


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _per_sample(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _forward(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0])


CASES = {
    "hessian_autograd": lambda m, d: HessianOperator(m, d, _ce),
    "hessian_fd": lambda m, d: HessianOperator(m, d, _ce, method="finite_difference"),
    "ggn_forward_jvp": lambda m, d: GGNOperator(m, d, _forward, cross_entropy_loss_of_output()),
    "ggn_fd_jvp": lambda m, d: GGNOperator(
        m, d, _forward, cross_entropy_loss_of_output(), jvp="finite_difference"
    ),
    "fisher_forward_jvp": lambda m, d: EmpiricalFisherOperator(m, d, _per_sample),
    "fisher_two_pass": lambda m, d: EmpiricalFisherOperator(m, d, _per_sample, one_pass=False),
    "ggn_one_pass": lambda m, d: GGNOperator(
        m, d, _forward, cross_entropy_loss_of_output(), one_pass=True
    ),
}
# per forward of one product: was the fused kernel allowed? (dual forwards must not be)
EXPECTED = {
    "hessian_autograd": {(False, False)},
    "hessian_fd": {(True, False)},
    "ggn_forward_jvp": {(False, True), (True, False)},
    "ggn_fd_jvp": {(True, False)},
    # one pass (the empirical Fisher's default): the dual forward is the recorded one
    "fisher_forward_jvp": {(False, True)},
    "fisher_two_pass": {(False, True), (True, False)},
    "ggn_one_pass": {(False, True)},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_math_attention_only_in_double_backward_and_forward_mode_passes(name: str) -> None:
    model, data = _setup()
    op = CASES[name](model, data)
    assert model.log and all(fused for fused, _ in model.log), "determinism probe: user kernels"
    model.log.clear()
    v = torch.randn(op.size, dtype=DT, generator=torch.Generator().manual_seed(2))
    op.matvec(v)
    assert set(model.log) == EXPECTED[name], model.log
    assert torch.backends.cuda.flash_sdp_enabled()  # the user's selection is restored


def test_products_agree_with_the_scoped_kernels() -> None:
    """Autograd Hessian (math kernel) vs finite differences (fused kernel) on attention."""
    model, data = _setup()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    exact = HessianOperator(model, data, _ce).matvec(v)
    fd = HessianOperator(model, data, _ce, method="finite_difference").matvec(v)
    assert float((fd - exact).norm() / exact.norm()) <= 1e-6


# ---------------------------------------------------------------- probes in the model dtype
def _wrong_in_float32(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """layer_norm whose curvature is wrong for float32 inputs only (a dtype-specific bug)."""
    y = F.layer_norm(x, *args, **kwargs)
    return y + 0.05 * x.square() if x.dtype == torch.float32 else y


_wrong_in_float32.__name__ = "layer_norm"


@pytest.fixture
def float32_only_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safety, "_DECOMPOSED", {_wrong_in_float32: safety._layer_norm})
    monkeypatch.setattr(safety, "_PROBE_CACHE", {})


def test_probe_finds_a_kernel_broken_only_in_the_model_dtype(float32_only_bug: None) -> None:
    cpu = torch.device("cpu")
    assert safety.probe_second_order(torch.float32, cpu) == {_wrong_in_float32}
    assert safety.probe_second_order(torch.float64, cpu) == frozenset()


def test_curvature_mode_probes_in_the_dtype_it_is_given(
    float32_only_bug: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    routed: list[frozenset[Any]] = []
    real = safety._RouteOps

    def spy(ops: frozenset[Any]) -> Any:
        routed.append(ops)
        return real(ops)

    monkeypatch.setattr(safety, "_RouteOps", spy)
    with safety.curvature_mode(torch.device("cpu"), torch.float32):
        pass
    assert routed == [frozenset({_wrong_in_float32})]
    routed.clear()
    with safety.curvature_mode(torch.device("cpu"), torch.float64):
        pass
    assert routed == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_builtin_norms_pass_the_probe_in_reduced_precision(dtype: torch.dtype) -> None:
    """No false alarm: rounding of the dtype alone does not route a correct kernel."""
    safety._PROBE_CACHE.pop(("cpu", dtype), None)
    assert safety.probe_second_order(dtype, torch.device("cpu")) == frozenset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_probe_runs_the_model_dtype_kernels(dtype: torch.dtype) -> None:
    """The cuDNN / native CUDA normalisation kernels of the model's dtype, probed there."""
    broken = safety.probe_second_order(dtype, torch.device("cuda"))
    assert ("cuda", dtype) in safety._PROBE_CACHE
    assert broken <= set(safety._DECOMPOSED)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_math_attention_only_where_needed(name: str) -> None:
    """The CUDA SDPA backend flags seen by the model during each product."""
    model, data = _setup()
    model = model.cuda()
    data = [(x.cuda(), y.cuda()) for x, y in data]
    op = CASES[name](model, data)
    model.log.clear()
    op.matvec(torch.randn(op.size, dtype=DT, device="cuda"))
    assert set(model.log) == EXPECTED[name], model.log
