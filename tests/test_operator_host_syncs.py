"""One host synchronisation per product, in every data operator.

A Lanczos run makes hundreds of products; every host read of a device value in one
stalls the GPU. The data loop reads exactly one thing per product: the sum of the
product (its finiteness) together with the total weight (a token count tensor, to
refuse an all-ignored dataset). Counted with ``tests/_host_syncs.py`` on CPU, where the
same reads happen (``.item()``, ``bool(t)``, ``tolist``); before, token-weighted products
made two (the finiteness read, then ``bool(weight > 0)``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    supervised_forward,
    supervised_loss,
)
from hessian_eigenthings.operators.fisher import MCFisherOperator
from tests._host_syncs import HostSyncCounter

CUDA = torch.cuda.is_available()


def _problem(device: str = "cpu") -> tuple[nn.Module, list[Any], Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 5, (8,), generator=g)
    y[2] = -100  # token-style weights: tensors counting non-ignored targets
    data = [(x.to(device), y.to(device)), (x[:5].to(device), y[:5].to(device))]
    ce = cross_entropy_loss_of_output()

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return ce(m(batch[0]), batch)

    loss.batch_weight = ce.batch_weight  # type: ignore[attr-defined]
    return model, data, loss


def _ops(model: nn.Module, data: list[Any], loss: Any) -> dict[str, Any]:
    ce = cross_entropy_loss_of_output()
    per_sample = supervised_loss(nn.CrossEntropyLoss(reduction="none"))
    return {
        "hessian": HessianOperator(model, data, loss, microbatch_size=3),
        "hessian_fd": HessianOperator(model, data, loss, method="finite_difference"),
        "ggn": GGNOperator(model, data, supervised_forward, ce, microbatch_size=3),
        "ggn_fd": GGNOperator(model, data, supervised_forward, ce, jvp="finite_difference"),
        "empirical_fisher": EmpiricalFisherOperator(model, data, per_sample),
        "mc_fisher": MCFisherOperator(model, data, supervised_forward, seed=0),
    }


@pytest.mark.parametrize(
    "name", ["hessian", "hessian_fd", "ggn", "ggn_fd", "empirical_fisher", "mc_fisher"]
)
def test_one_host_sync_per_product(name: str) -> None:
    model, data, loss = _problem()
    op = _ops(model, data, loss)[name]
    v = torch.randn(op.size)
    op.matvec(v)  # warm-up: one-time probes
    with HostSyncCounter() as c:
        op.matvec(v)
        op.matmat(torch.stack([v, 2 * v], dim=1))
    assert c.syncs == 2, c.events  # one per product: the matvec, and the block in one pass
    assert c.host_to_device == 0, c.events


def test_all_ignored_dataset_is_still_refused() -> None:
    model, data, loss = _problem()
    ignored = [(x, torch.full_like(y, -100)) for x, y in data]
    with pytest.raises(ValueError, match="every target ignored"):  # by the construction probe
        HessianOperator(model, ignored, loss, check_determinism=False)
    # and by the product, whose weight is read in the one host sync, if the labels change
    # after construction (a dataset re-labelled in place)
    op = HessianOperator(model, data, loss, check_determinism=False)
    for _, y in data:
        y.fill_(-100)
    with pytest.raises(ValueError, match="every target ignored"):
        op.matvec(torch.randn(op.size))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["hessian", "ggn", "empirical_fisher"])
def test_cuda_product_synchronises_once(name: str) -> None:
    model, data, loss = _problem("cuda")
    op = _ops(model, data, loss)[name]
    v = torch.randn(op.size, device="cuda")
    op.matvec(v)
    torch.cuda.synchronize()
    with HostSyncCounter() as c:
        op.matvec(v)
    assert c.syncs == 1, c.events
