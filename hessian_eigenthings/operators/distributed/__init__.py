"""Operators for data (and parameters) split over ``torch.distributed`` ranks."""

from hessian_eigenthings._deprecation import renamed_attributes
from hessian_eigenthings.operators.distributed.ddp import (
    DDPCurvatureOperator,
    DDPEmpiricalFisherOperator,
    DDPGGNOperator,
    DDPHessianOperator,
    DDPMCFisherOperator,
)
from hessian_eigenthings.operators.distributed.sharded import ShardedHessianOperator

__all__: list[str] = [
    # data parallel (replicated parameters): one all-reduce per matvec
    "DDPCurvatureOperator",
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    # parameters sharded with FSDP2
    "ShardedHessianOperator",
]


__getattr__ = renamed_attributes(
    __name__, {"DDPOperatorMixin": ("DDPCurvatureOperator", lambda: DDPCurvatureOperator)}
)
