"""Operators for data (and parameters) split over ``torch.distributed`` ranks."""

from hessian_eigenthings.operators.distributed.ddp import (
    DDPEmpiricalFisherOperator,
    DDPGGNOperator,
    DDPHessianOperator,
    DDPMCFisherOperator,
    DDPOperatorMixin,
)
from hessian_eigenthings.operators.distributed.sharded import ShardedHessianOperator

__all__: list[str] = [
    # data parallel (replicated parameters): one all-reduce per matvec
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    "DDPOperatorMixin",
    # parameters sharded with FSDP2
    "ShardedHessianOperator",
]
