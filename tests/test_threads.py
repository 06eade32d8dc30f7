"""xpnet's own CPU threads: the batch-parallel layers agree with the serial ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet.backend import threads
from xpnet.gradcheck import check_layer
from xpnet.layers import Affine, AvgPooling, Convolution, Pooling
from xpnet.layers import conv as conv_module
from xpnet.layers import dense as dense_module


@pytest.fixture
def restore_threads():
    before = threads.get_num_threads()
    yield
    threads.set_num_threads(before)


def run_with(n_threads, layer, x, dout):
    threads.set_num_threads(n_threads)
    y = layer.forward(x)
    dx = layer.backward(dout)
    return [to_numpy(a).copy() for a in (y, dx, *layer.grads.values())]


LAYERS = {
    "conv-stride1": lambda xp, rng: (
        Convolution(xp.asarray(rng.standard_normal((4, 3, 3, 3))),
                    xp.asarray(rng.standard_normal(4)), 1, 1), (9, 3, 8, 7)),
    "conv-stride2-col2im": lambda xp, rng: (
        Convolution(xp.asarray(rng.standard_normal((4, 3, 3, 3))),
                    xp.asarray(rng.standard_normal(4)), 2, 1), (9, 3, 9, 7)),
    "maxpool-pad": lambda xp, rng: (Pooling(3, 3, 2, 1), (19, 2, 7, 7)),
    "maxpool-tiles": lambda xp, rng: (Pooling(2, 2, 2), (19, 2, 6, 6)),
    "avgpool-overlap": lambda xp, rng: (AvgPooling(3, 3, 1, 1), (19, 2, 5, 5)),
    "affine": lambda xp, rng: (
        Affine(xp.asarray(rng.standard_normal((60, 5))), xp.asarray(rng.standard_normal(5))),
        (9, 3, 4, 5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_two_threads_agree_with_one(xp, rng, restore_threads, monkeypatch, name):
    """Forward, dx and parameter gradients with 2 threads match 1 thread, and two
    runs with 2 threads are bitwise equal (static split, partial sums in order)."""
    monkeypatch.setattr(conv_module, "CPU_CHUNK_BYTES", 1)  # several chunks per thread
    monkeypatch.setattr(dense_module, "SPLIT_MACS", 1)  # split even this small GEMM
    layer, x_shape = LAYERS[name](xp, rng)
    x = xp.asarray(rng.standard_normal(x_shape))
    dout = xp.asarray(rng.standard_normal(layer.forward(x).shape))
    serial = run_with(1, layer, x, dout)
    parallel = run_with(2, layer, x, dout)
    again = run_with(2, layer, x, dout)
    assert len(serial) == len(parallel)
    for s, p, a in zip(serial, parallel, again, strict=True):
        np.testing.assert_allclose(p, s, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(a, p)


def test_convolution_gradient_check_with_two_threads(xp, rng, restore_threads, monkeypatch):
    monkeypatch.setattr(conv_module, "CPU_CHUNK_BYTES", 1)
    threads.set_num_threads(2)
    layer = Convolution(xp.asarray(rng.standard_normal((3, 2, 3, 3))),
                        xp.asarray(rng.standard_normal(3)), 1, 1)
    x = xp.asarray(rng.standard_normal((5, 2, 5, 6)))
    dout = xp.asarray(rng.standard_normal((5, 3, 5, 6)))
    errors = check_layer(layer, x, dout)
    assert max(errors.values()) <= 1e-6, errors


def test_batch_slices_cover_the_batch_in_order(xp, restore_threads):
    threads.set_num_threads(3)
    slices = threads.batch_slices(xp, 10)
    if xp.__name__ == "numpy":
        assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 10)]
        assert threads.batch_slices(xp, 10, min_per_thread=4) == [slice(0, 5), slice(5, 10)]
        assert threads.batch_slices(xp, 2, min_per_thread=4) == [slice(0, 2)]
    else:  # GPU arrays are never split
        assert slices == [slice(0, 10)]


def test_parallel_map_runs_every_slice_on_threads_and_keeps_order(restore_threads):
    threads.set_num_threads(2)
    seen = []

    def work(s):
        seen.append(threading.get_ident())
        return s.start

    result = threads.parallel_map(np, work, [slice(0, 1), slice(1, 2)])
    assert result == [0, 1]
    assert len(set(seen)) == 2  # the caller and one worker


@pytest.mark.parametrize("failing", [{0}, {1}, {0, 1}])
def test_parallel_map_raises_the_first_failure_after_all_slices_finish(restore_threads,
                                                                         failing):
    threads.set_num_threads(2)
    finished = []

    def work(s):
        if s.start in failing:
            raise ValueError(f"slice {s.start} failed")
        finished.append(s.start)

    with pytest.raises(ValueError, match=f"slice {min(failing)} failed"):
        threads.parallel_map(np, work, [slice(0, 1), slice(1, 2)])
    assert sorted(finished) == sorted({0, 1} - failing)


def test_parallel_map_from_several_user_threads(restore_threads):
    """User threads with different slice counts share (and grow) the worker pool."""
    threads.set_num_threads(4)
    errors, results = [], []

    def user(parts):
        try:
            for _ in range(20):
                slices = [slice(k, k + 1) for k in range(parts)]
                results.append(threads.parallel_map(np, lambda s: s.start, slices)
                               == list(range(parts)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    users = [threading.Thread(target=user, args=(parts,)) for parts in (2, 4, 3, 2)]
    for u in users:
        u.start()
    for u in users:
        u.join()
    assert errors == []
    assert results == [True] * 80


def test_blas_single_threaded_inside_and_restored_after(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info()
                if p["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("no BLAS library that threadpoolctl can control")
    threads.set_num_threads(2)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        inside = threads.parallel_map(np, lambda s: blas_threads(), [slice(0, 1), slice(1, 2)])
        assert inside[0] == [1] * len(inside[0])
        assert blas_threads() == [2] * len(inside[0])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        threads.set_num_threads(bad)


def test_bad_environment_variable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("XPNET_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="XPNET_NUM_THREADS.*'two'"):
        threads._default_num_threads()
    monkeypatch.setenv("XPNET_NUM_THREADS", "3")
    assert threads._default_num_threads() == 3


@pytest.mark.parametrize("model", ["simple", "deep"])
def test_network_gradient_with_two_threads_matches_one(xp, rng, restore_threads, monkeypatch,
                                                       model):
    """The whole backward pass of the book's conv nets, batch split over two threads."""
    from xpnet.backend import seed
    from xpnet.models import DeepConvNet, SimpleConvNet

    monkeypatch.setattr(dense_module, "SPLIT_MACS", 1)
    size = 16 if model == "simple" else 12  # DeepConvNet halves it three times
    x = xp.asarray(rng.standard_normal((6, 1, size, size)))
    t = xp.asarray(rng.integers(0, 10, 6))

    def gradient(n_threads):
        threads.set_num_threads(n_threads)
        seed(0)
        if model == "simple":
            net = SimpleConvNet(input_dim=(1, size, size), hidden_size=8, weight_init_std=0.1,
                                dtype="float64")
        else:
            net = DeepConvNet(input_dim=(1, size, size), hidden_size=8, dtype="float64")
        grads = net.gradient(x, t)
        return {k: to_numpy(v) for k, v in grads.items()}

    serial, parallel = gradient(1), gradient(2)
    assert serial.keys() == parallel.keys()
    for key in serial:
        np.testing.assert_allclose(parallel[key], serial[key], rtol=1e-10, atol=1e-12,
                                   err_msg=key)
