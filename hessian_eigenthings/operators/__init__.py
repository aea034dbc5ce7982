"""Curvature operators: the matrices, known only through matrix-vector products."""

from hessian_eigenthings.operators.base import CurvatureOperator
from hessian_eigenthings.operators.data_operator import DataCurvatureOperator
from hessian_eigenthings.operators.distributed import DDPHessianOperator
from hessian_eigenthings.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from hessian_eigenthings.operators.ggn import GGNOperator
from hessian_eigenthings.operators.hessian import HessianOperator
from hessian_eigenthings.operators.lambda_operator import LambdaOperator
from hessian_eigenthings.operators.output_curvature import OutputCurvatureOperator

__all__ = [
    "CurvatureOperator",
    "DataCurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LambdaOperator",
    "MCFisherOperator",
    "OutputCurvatureOperator",
    # also under operators.distributed (the 1.0.0a5 manual's "Module Exports" list it here)
    "DDPHessianOperator",
]
