"""Algorithms that consume curvature operators: eigensolvers and estimators."""

# Long runs: the keywords every algorithm takes (checkpoint, time limit)
# Long runs: errors of non-finite products and unusable checkpoints
from hessian_eigenthings.algorithms import errors
from hessian_eigenthings.algorithms._run import LongRunOptions

# Stochastic estimators with error bars (trace, diagonal, SLQ spectral density) and the
# plain Lanczos tridiagonalisation that SLQ is built on
from hessian_eigenthings.algorithms.diagonal import diagonal
from hessian_eigenthings.algorithms.errors import *  # noqa: F403
from hessian_eigenthings.algorithms.estimator_results import (
    DiagonalResult,
    SpectralDensityResult,
    TraceResult,
)
from hessian_eigenthings.algorithms.hutch_plus_plus import hutch_plus_plus
from hessian_eigenthings.algorithms.hutchinson import hutchinson

# Eigensolvers: restarted Lanczos, (deflated) power iteration, stochastic power iteration
from hessian_eigenthings.algorithms.lanczos import LanczosProgress, LanczosState, lanczos
from hessian_eigenthings.algorithms.lanczos_tridiagonal import LanczosTridiag, lanczos_tridiagonal
from hessian_eigenthings.algorithms.power_iteration import (
    deflated_power_iteration,
    power_iteration_one,
)
from hessian_eigenthings.algorithms.results import EigenResult, StochasticEigenResult, StopReason
from hessian_eigenthings.algorithms.spectral_density import spectral_density
from hessian_eigenthings.algorithms.stochastic_power_iteration import stochastic_power_iteration
from hessian_eigenthings.algorithms.trace import trace
from hessian_eigenthings.algorithms.xtrace import xtrace

__all__ = [
    # eigensolvers
    "deflated_power_iteration",
    "lanczos",
    "power_iteration_one",
    "stochastic_power_iteration",
    # eigensolver results and Lanczos progress/state
    "EigenResult",
    "LanczosProgress",
    "LanczosState",
    "StochasticEigenResult",
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
    # estimator results, and why a run stopped (all results)
    "DiagonalResult",
    "SpectralDensityResult",
    "StopReason",
    "TraceResult",
    # long runs: keywords, non-finite products, checkpoints
    "LongRunOptions",
    *errors.__all__,
]
