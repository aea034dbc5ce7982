"""Algorithms that consume curvature operators: eigensolvers and estimators."""

# Stochastic estimators with error bars (trace, diagonal, SLQ spectral density) and the
# plain Lanczos tridiagonalisation that SLQ is built on
from hessian_eigenthings.algorithms.diagonal import diagonal
from hessian_eigenthings.algorithms.estimator_results import (
    DiagonalResult,
    SpectralDensityResult,
    TraceResult,
)
from hessian_eigenthings.algorithms.hutch_plus_plus import hutch_plus_plus
from hessian_eigenthings.algorithms.hutchinson import hutchinson
from hessian_eigenthings.algorithms.lanczos_tridiagonal import LanczosTridiag, lanczos_tridiagonal
from hessian_eigenthings.algorithms.spectral_density import spectral_density
from hessian_eigenthings.algorithms.trace import trace
from hessian_eigenthings.algorithms.xtrace import xtrace

__all__ = [
    # Lanczos tridiagonalisation
    "LanczosTridiag",
    "lanczos_tridiagonal",
    # stochastic estimators
    "diagonal",
    "hutch_plus_plus",
    "hutchinson",
    "spectral_density",
    "trace",
    "xtrace",
    # estimator results
    "DiagonalResult",
    "SpectralDensityResult",
    "TraceResult",
]
