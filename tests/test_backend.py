"""The backend shim: selection, switching, errors, transfers, dtype and seeding."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from xpnet import backend
from xpnet.backend import BackendError, BackendMismatchError
from xpnet.backend import xp as xp_proxy


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_proxy_follows_active_backend(xp):
    assert xp_proxy.zeros(3).__class__ is xp.ndarray
    assert backend.get_backend() is xp
    assert backend.get_backend_name() == xp.__name__


def test_use_backend_restores_previous():
    before = backend.get_backend_name()
    with backend.use_backend("numpy") as module:
        assert module is np
    assert backend.get_backend_name() == before


def test_unknown_backend_lists_valid_names():
    with pytest.raises(BackendError, match=r"unknown backend 'tpu'.*numpy, cupy"):
        backend.set_backend("tpu")
    with pytest.raises(BackendError, match="unknown backend"):
        with backend.use_backend("jax"):
            pass


def test_env_var_selects_numpy():
    out = run_python("from xpnet.backend import xp; print(xp.__name__ if hasattr(xp,'__name__')"
                     " else xp.zeros(1).__class__.__module__)", DL_BACKEND="numpy")
    assert out.returncode == 0, out.stderr
    assert "numpy" in out.stdout


def test_env_var_unknown_backend_is_clear():
    out = run_python("from xpnet.backend import xp; xp.zeros(1)", DL_BACKEND="tensorflow")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "BackendError" in last and "DL_BACKEND='tensorflow'" in last and "numpy, cupy" in last


@pytest.mark.skipif(backend.is_gpu_available(), reason="CuPy and a GPU are present")
def test_cupy_requested_but_unusable_says_why():
    """Import works without CuPy; first use raises naming the extra to install (or no GPU)."""
    out = run_python("import xpnet.layers, xpnet.backend as b; print('imported');"
                     " b.xp.zeros(1)", DL_BACKEND="cupy")
    assert "imported" in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert "BackendError" in last
    assert ("xpnet[cuda12]" in last) or ("no" in last and "GPU" in last), last
    with pytest.raises(BackendError):
        backend.set_backend("cupy")
    assert not backend.is_gpu_available()


def test_get_array_module_and_transfers(xp, rng):
    a = xp.asarray(rng.standard_normal(4))
    assert backend.get_array_module(a) is xp
    assert backend.get_array_module(None, 3.0) is np
    host = backend.to_cpu(a)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, backend.to_cpu(backend.to_backend(host)))
    assert isinstance(backend.to_backend(host), xp.ndarray)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.is_gpu_available(), reason="needs CuPy and a GPU")
def test_mixed_arrays_rejected():
    import cupy

    with pytest.raises(BackendMismatchError):
        backend.get_array_module(np.zeros(2), cupy.zeros(2))
    g = backend.to_gpu(np.arange(3.0))
    assert isinstance(g, cupy.ndarray)
    np.testing.assert_array_equal(backend.to_cpu(g), np.arange(3.0))


def test_check_same_backend_names_caller(xp):
    assert backend.check_same_backend("Layer", x=xp.zeros(2), W=xp.ones(2)) is xp


def test_default_dtype_settable():
    assert backend.get_default_dtype() == np.float32
    backend.set_default_dtype(np.float64)
    try:
        assert backend.get_default_dtype() == np.float64
    finally:
        backend.set_default_dtype(np.float32)
    with pytest.raises(ValueError, match="float"):
        backend.set_default_dtype(np.int32)


def test_seeded_random_is_reproducible(xp):
    backend.seed(42)
    a = backend.to_cpu(backend.get_rng().normal((3, 4), std=0.1))
    u = backend.to_cpu(backend.get_rng().random(5))
    backend.seed(42)
    b = backend.to_cpu(backend.get_rng().normal((3, 4), std=0.1))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and u.dtype == np.float32
    assert ((u >= 0) & (u < 1)).all()
    p = backend.to_cpu(backend.get_rng().permutation(10))
    assert sorted(p.tolist()) == list(range(10))


def test_random_state_roundtrip():
    backend.seed(1)
    rng = backend.get_rng("numpy")
    state = rng.get_state()
    first = rng.random(4)
    rng.set_state(state)
    np.testing.assert_array_equal(first, rng.random(4))


def test_device_name_mentions_device(xp):
    name = backend.device_name()
    assert ("CPU" in name) if xp is np else ("GPU" in name)
    if xp is np:  # and how many threads xpnet's CPU loops use
        assert f"{backend.get_num_threads()} xpnet threads" in name
