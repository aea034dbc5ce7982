"""Vector arithmetic backends consumed by the algorithms."""

from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
from hessian_eigenthings.backends.distributed import ReplicatedBackend, ShardedBackend
from hessian_eigenthings.backends.single_device import SingleDeviceBackend

__all__ = [
    "LinAlgBackend",
    "ReplicatedBackend",
    "ShardedBackend",
    "SingleDeviceBackend",
    "fresh_seed",
]
