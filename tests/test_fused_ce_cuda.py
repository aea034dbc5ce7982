"""The compiled Triton kernel on a GPU against a float64 reference (skipped without CUDA).

The CPU suite runs the same kernel through Triton's interpreter; these tests cover what
only a GPU shows: the compiled code paths (16-byte aligned interior blocks, the launch
table), bfloat16 rounding to nearest (the interpreter truncates), and launching on the
logits' device when it is not the current one. ``scripts/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import pytest
import torch

from hessian_eigenthings.loss_fns.fused_ce import ce_hvp_eager, ce_hvp_triton
from tests.helpers import rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
IGN = -100


def _problem(rows, vocab, dtype, device="cuda", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    z = (3 * torch.randn(rows, vocab, generator=gen, device=device)).to(dtype)
    u = torch.randn(rows, vocab, generator=gen, device=device).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    return z, t, u


def _reference(z, t, u, **kw):
    want = ce_hvp_eager(z.double(), t, u.double(), **kw)
    assert torch.isfinite(want).all()
    return want


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


@pytest.mark.parametrize("vocab", [7, 1000, 32000, 50257, 131072])
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_kernel_matches_float64_reference(vocab, dtype, bound):
    z, t, u = _problem(37, vocab, dtype)
    t[::5] = IGN
    got = ce_hvp_triton(z, t, u)
    assert got.dtype == dtype
    assert rel_err(got, _reference(z, t, u)) <= bound
    assert torch.all(got[::5] == 0)
    if dtype == torch.bfloat16:  # rounded to nearest on a GPU: as accurate as eager
        eager = rel_err(ce_hvp_eager(z, t, u), _reference(z, t, u))
        assert rel_err(got, _reference(z, t, u)) <= 1.5 * eager + 1e-6


def test_cuda_kernel_awkward_layouts_and_leading_neg_inf():
    vocab = 50257
    big = torch.randn(6, vocab + 11, device="cuda")
    z = big[:, 3 : 3 + vocab]  # odd row stride and storage offset
    u = torch.randn(6, vocab + 11, device="cuda")[:, 3:-8]
    u_t = torch.randn(vocab, 6, device="cuda").T  # column-major direction: plain frame
    t = torch.randint(0, vocab, (6,), device="cuda")
    t[1] = IGN
    z[0, :4096] = float("-inf")
    z[2, :20000] = float("-inf")
    t[0], t[2] = 5000, 30000
    for uu in (u, u_t):
        got = ce_hvp_triton(z, t, uu)
        assert torch.isfinite(got).all()
        assert rel_err(got, _reference(z, t, uu)) <= 1e-5
        assert torch.all(got[1] == 0)


def test_cuda_kernel_all_rows_ignored():
    z, t, u = _problem(16, 50257, torch.bfloat16)
    t[:] = IGN
    got = ce_hvp_triton(z, t, u)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_kernel_runs_on_the_logits_device_not_the_current_one():
    torch.cuda.set_device(0)
    z, t, u = _problem(8, 50257, torch.float32, device="cuda:1")
    got = ce_hvp_triton(z, t, u)
    torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    assert rel_err(got, _reference(z, t, u)) <= 1e-5


def test_cuda_kernel_uses_the_current_stream_of_the_logits_device():
    z, t, u = _problem(64, 50257, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ce_hvp_triton(z, t, u)
    side.synchronize()
    assert rel_err(got, _reference(z, t, u)) <= 1e-2
