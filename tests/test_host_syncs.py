"""Host synchronisations per product in the loss functions: counted, and zero after warm-up.

The GGN calls ``loss.hvp`` (and ``batch_weight``, and the loss for the determinism probe)
once per microbatch, hundreds of times in a Lanczos run; a host sync or a copy of host
data to the device in there stalls the GPU every time. On CPU the accelerator is stood in
for by the ``meta`` device (see ``tests/_host_syncs.py``); the CUDA tests at the bottom
check the same with ``torch.cuda.set_sync_debug_mode("error")``.

Before this was fixed, the standard cross-entropy made per call (meta analogue, CPU class
weights): ``hvp`` 1 copy (``torch.tensor(float(num_classes), device=...)``, or the class
weights), the loss 2 copies of the class weights, ``batch_weight`` 1; probability targets
one more (``torch.tensor(float(rows), device=...)``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hessian_eigenthings.loss_fns.fused_ce import ce_hvp_eager, fused_ce_hvp
from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output
from tests._host_syncs import HostSyncCounter

CUDA = torch.cuda.is_available()


def test_counter_sees_scalar_reads_and_host_copies():
    x = torch.ones(3)
    with HostSyncCounter() as c:
        x.sum().item()
        bool(x[0] > 0)
        float(x[1])
        x.tolist()
        with pytest.raises(NotImplementedError):  # meta has no data, but the copy is counted
            torch.zeros(2, device="meta").to("cpu")
    assert c.syncs == 5 and c.host_to_device == 0
    with HostSyncCounter() as c:
        torch.tensor(2.0, device="meta")
        torch.as_tensor([1, 2], device="meta")
        x.to("meta")
        torch.empty(3, device="meta").copy_(x)
        torch.full((), 2.0, device="meta")  # a fill kernel, not a copy: not counted
        torch.as_tensor(torch.zeros(2, device="meta"), device="meta")  # already there
    assert c.host_to_device == 4, c.events
    with HostSyncCounter() as c, pytest.raises(RuntimeError):
        torch.ones(2, device="meta").sum().item()
    assert c.syncs == 1


CE_CASES: list[dict[str, Any]] = [
    {},
    {"label_smoothing": 0.1},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.2},
    {"reduction": "sum", "weight": True},
    {"probabilities": True},
    {"probabilities": True, "weight": True, "label_smoothing": 0.1},
]


def _ce_case(opts: dict[str, Any], device: str) -> tuple[Any, torch.Tensor, Any, torch.Tensor]:
    opts = dict(opts)
    gen = torch.Generator().manual_seed(0)
    probabilities = opts.pop("probabilities", False)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(5, generator=gen) + 0.5  # stays on the host, as users pass it
    z = torch.randn(4, 5, 3, generator=gen)
    if probabilities:
        y = torch.softmax(torch.randn(4, 5, 3, generator=gen), 1)
    else:
        y = torch.randint(0, 5, (4, 3), generator=gen)
        y[0, 1] = -100
    u = torch.randn(4, 5, 3, generator=gen)
    loss = cross_entropy_loss_of_output(**opts)
    return loss, z.to(device), (None, y.to(device)), u.to(device)


def _one_product(loss: Any, z: torch.Tensor, batch: Any, u: torch.Tensor) -> None:
    """What a data operator calls per microbatch: weight, loss (probe / Hessian), hvp."""
    loss.batch_weight(batch)
    loss(z, batch)
    loss.hvp(z, batch, u)


@pytest.mark.parametrize("opts", CE_CASES, ids=lambda o: "-".join(o) or "plain")
def test_cross_entropy_products_copy_and_sync_nothing_after_warm_up(opts):
    loss, z, batch, u = _ce_case(opts, "meta")
    with HostSyncCounter() as first:
        _one_product(loss, z, batch, u)
    # the class weights reach the device once per dtype (the loss's and float64 sums)
    assert first.syncs == 0
    assert first.host_to_device <= (2 if "weight" in opts else 0), first.events
    with HostSyncCounter() as later:
        for _ in range(3):
            _one_product(loss, z, batch, u)
    assert (later.syncs, later.host_to_device) == (0, 0), later.events


@pytest.mark.parametrize("opts", CE_CASES, ids=lambda o: "-".join(o) or "plain")
def test_cross_entropy_on_cpu_does_not_synchronise(opts):
    loss, z, batch, u = _ce_case(opts, "cpu")
    with HostSyncCounter() as c:
        _one_product(loss, z, batch, u)
    assert c.syncs == 0, c.events


def test_class_weights_are_a_snapshot_taken_at_construction():
    """The cached device copies must not drift from the host weights: both are frozen."""
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = cross_entropy_loss_of_output(weight=w)
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    before = loss(z, (None, y))
    w[0] = 100.0  # changes the weighted mean
    assert torch.equal(loss(z, (None, y)), before)
    want = torch.nn.functional.cross_entropy(z, y, weight=torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(before, want)


@pytest.mark.parametrize("n_valid", [None, 7, 7.0])
def test_fused_eager_normaliser_is_made_on_the_device(n_valid):
    z = torch.randn(3, 11, device="meta")
    t = torch.zeros(3, dtype=torch.long, device="meta")
    with HostSyncCounter() as c:
        ce_hvp_eager(z, t, z, n_valid=n_valid)
    assert (c.syncs, c.host_to_device) == (0, 0), c.events


# ---------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("opts", CE_CASES, ids=lambda o: "-".join(o) or "plain")
def test_cuda_cross_entropy_products_do_not_synchronise(opts):
    loss, z, batch, u = _ce_case(opts, "cuda")
    _one_product(loss, z, batch, u)  # warm-up: the class weights are copied once here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _one_product(loss, z, batch, u)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["eager", "compile", "triton"])
def test_cuda_fused_ce_hvp_does_not_synchronise(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    z = torch.randn(64, 50257, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(z)
    t = torch.randint(0, 50257, (64,), device="cuda")
    for n_valid in (None, 64):
        fused_ce_hvp(z, t, u, n_valid=n_valid, backend=backend)  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n_valid in (None, 64):
            fused_ce_hvp(z, t, u, n_valid=n_valid, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
