"""One fixture for the whole suite: every array-touching test runs on numpy and cupy.

The cupy case carries the ``gpu`` marker and is skipped, with the reason, where CuPy
or a usable GPU is absent.
"""

from __future__ import annotations

import os

# pytest -n 2 already keeps both cores busy; BLAS threads on top of that spin and
# contend (small GEMMs become tens of times slower).  Must precede numpy's import.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from xpnet import backend  # noqa: E402

_GPU_SKIP_REASON: str | None = None
try:
    backend._import_cupy()
except backend.BackendError as exc:  # CuPy missing or no GPU: say which
    _GPU_SKIP_REASON = str(exc)

BACKEND_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "cupy",
        id="cupy",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(_GPU_SKIP_REASON is not None, reason=f"{_GPU_SKIP_REASON}"),
        ],
    ),
]


@pytest.fixture(params=BACKEND_PARAMS)
def xp(request):
    """The array module under test, made the active xpnet backend for the test."""
    with backend.use_backend(request.param) as module:
        backend.seed(0)
        yield module
    backend.seed(None)


@pytest.fixture
def rng():
    """A seeded host random generator for test inputs."""
    return np.random.default_rng(12345)


def to_numpy(a):
    """Host copy of an array from either backend (for assertions)."""
    return backend.to_cpu(a)


def assert_gradients_match(net, x, t, zero=(), h=1e-5, tol=1e-6):
    """A network's gradient() against its numerical_gradient(), float64, relative error
    <= ``tol`` for every trained (not frozen) parameter.

    ``zero``: keys whose true gradient is 0 (a conv bias right before batch norm):
    relative error means nothing there, so both are compared with 0.
    """
    from xpnet.gradcheck import relative_error

    analytic = {k: g.copy() for k, g in net.gradient(x, t).items()}
    numeric = net.numerical_gradient(x, t, h=h)
    assert list(analytic) == list(numeric) == [k for k in net.params if k not in net.frozen]
    for k in zero:
        assert float(abs(analytic.pop(k)).max()) < 1e-12, k
        assert float(abs(numeric.pop(k)).max()) < 1e-8, k
    errors = {k: relative_error(analytic[k], numeric[k]) for k in analytic}
    assert max(errors.values()) <= tol, errors
    for k, g in analytic.items():
        assert g.shape == net.params[k].shape and g.dtype == net.params[k].dtype


def gradients_with_fixed_masks(net, x, t):
    """(host gradients of net.loss(x, t), loss()): the dropout masks drawn for the
    gradient are drawn again for every loss() call, so central differences of loss()
    see the same network the gradient did."""
    masks = net.rng_states()

    def loss():
        net.set_rng_states(masks)
        return float(net.loss(x, t))

    net.set_rng_states(masks)
    return {k: to_numpy(g) for k, g in net.gradient(x, t).items()}, loss
