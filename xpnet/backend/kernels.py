"""Hand-written CuPy kernels, compiled on first use and cached for the process.

CuPy has no cuDNN here, so xpnet's GPU speed is its own: every CuPy array
operation is one kernel launch with several microseconds of Python around it,
and a training step of small layers is bound by their number, not by the GPU.
The layers and optimizers that matter replace a dozen launches with one kernel
(``xpnet.layers.cuda_kernels``, the fused optimizer updates) when
:func:`cuda_kernels_enabled` says so; the generic ``xp`` code stays the reference,
and the tests compare the two.  ``XPNET_CUDA_KERNELS=0`` (or
:func:`use_cuda_kernels`) turns them off.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["cuda_kernels_enabled", "use_cuda_kernels", "elementwise_kernel"]

_enabled = os.environ.get("XPNET_CUDA_KERNELS", "1").strip() != "0"


def cuda_kernels_enabled(xp: Any) -> bool:
    """Whether to use the hand-written kernels for arrays of module ``xp``."""
    return _enabled and xp.__name__ == "cupy"


@contextlib.contextmanager
def use_cuda_kernels(enabled: bool) -> Iterator[None]:
    """Turn the hand-written CuPy kernels on or off within a block (tests, benchmarks)."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


@functools.cache
def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str,
                       options: tuple[str, ...] = ()) -> Any:
    """A ``cupy.ElementwiseKernel``, built once per process (CuPy caches the binary).

    ``options`` go to the compiler, e.g. ``("--fmad=false",)`` so that ``a*b + c`` is
    rounded twice, as the generic path's separate array operations round it.
    """
    import cupy  # noqa: PLC0415 - only reached with CuPy arrays

    return cupy.ElementwiseKernel(in_params, out_params, operation, name, options=options)
