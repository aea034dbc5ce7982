"""hessian-eigenthings: matrix-free curvature of neural networks in PyTorch.

Top-k eigenpairs, trace and spectral density of the Hessian, Generalized Gauss-Newton
and Fisher of a model on a dataset, without ever forming the matrix.

The top level re-exports the public names of each layer (each subpackage's ``__all__``,
grouped and commented there), so ``from hessian_eigenthings import HessianOperator,
lanczos`` works for every name below.
"""

import hessian_eigenthings.operators.distributed as _distributed
from hessian_eigenthings import algorithms, backends, loss_fns, operators, param_utils
from hessian_eigenthings._deprecation import renamed_attributes

# Eigensolvers (Lanczos, power iteration, stochastic power iteration) and their results;
# stochastic estimators with error bars, Lanczos tridiagonalisation (SLQ), and the errors
# of long runs (non-finite products, checkpoints)
from hessian_eigenthings.algorithms import *  # noqa: F403

# Vector backends (single device, replicated over ranks, sharded over ranks)
from hessian_eigenthings.backends import *  # noqa: F403

# Losses of the model output with closed-form HVPs: standard, HuggingFace, TransformerLens,
# and the fused cross-entropy HVP kernels
from hessian_eigenthings.loss_fns import *  # noqa: F403

# Operators: the matrices, known through matrix-vector products
from hessian_eigenthings.operators import *  # noqa: F403

# Distributed operators (torch.distributed: DDP data shards, FSDP2 parameter shards)
from hessian_eigenthings.operators.distributed import *  # noqa: F403

# Parameter selection and flat-vector helpers
from hessian_eigenthings.param_utils import *  # noqa: F403

__version__ = "2.0.0.dev0"

# Renamed names keep resolving, with a DeprecationWarning naming the replacement (classes
# are looked up here, so they stay out of __all__ and star imports do not warn).
__getattr__ = renamed_attributes(
    __name__,
    {"DDPOperatorMixin": ("DDPCurvatureOperator", lambda: _distributed.DDPCurvatureOperator)},
)

__all__ = [
    *operators.__all__,
    *_distributed.__all__,
    *algorithms.__all__,
    *loss_fns.__all__,
    *backends.__all__,
    *param_utils.__all__,
    "__version__",
]
