"""xpnet's own CPU threads: the batch-parallel layers agree with the serial ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import xpnet
from tests.conftest import to_numpy
from xpnet.backend import threads
from xpnet.gradcheck import check_layer
from xpnet.layers import Affine, AvgPooling, Convolution, Pooling
from xpnet.layers import conv_functions as conv_module
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


def blas_threads():
    """The thread count of every loaded BLAS, as threadpoolctl reads it."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    counts = [p["num_threads"] for p in threadpoolctl.threadpool_info()
              if p["user_api"] == "blas"]
    if not counts:
        pytest.skip("no BLAS library that threadpoolctl can control")
    return counts


def in_thread(fn):
    """fn() run on a new thread; its result, or its exception raised here."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised on the caller below
            out["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_blas_single_threaded_inside_and_restored_after(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas_threads()
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


def test_blas_single_threaded_inside_regions_entered_from_a_worker_thread(restore_threads):
    """threadpoolctl lets only one thread change OpenBLAS (pthreads); xpnet's hold must
    work from any thread, and give the count back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas_threads()
    threads.set_num_threads(2)
    slices = [slice(0, 1), slice(1, 2)]
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        inside = in_thread(lambda: threads.parallel_map(np, lambda s: blas_threads(), slices))
        assert inside == [[1] * len(inside[0])] * 2
        assert blas_threads() == [2] * len(inside[0])
        # two user threads in regions at once: the last one out restores
        barrier = threading.Barrier(2, timeout=30)
        seen = []

        def user():
            seen.extend(threads.parallel_map(np, lambda s: (barrier.wait(), blas_threads())[1],
                                             [slice(0, 1)]))

        users = [threading.Thread(target=user) for _ in range(2)]
        for u in users:
            u.start()
        for u in users:
            u.join()
        assert seen == [[1] * len(inside[0])] * 2
        assert blas_threads() == [2] * len(inside[0])


@pytest.mark.parametrize("model", ["deep", "simple"])
def test_network_gradient_in_a_worker_thread_is_the_main_threads_bit_for_bit(restore_threads,
                                                                            monkeypatch, model):
    """Same thread count, BLAS at 2 threads outside xpnet's regions: a gradient computed
    on a worker thread (a notebook, a server) equals the main thread's bit for bit."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from xpnet.backend import seed
    from xpnet.models import DeepConvNet, SimpleConvNet

    blas_threads()
    monkeypatch.setattr(dense_module, "SPLIT_MACS", 1)  # the dense GEMMs in regions too
    rng = np.random.default_rng(3)
    x = rng.random((24, 1, 28, 28)).astype(np.float32)
    t = np.arange(24) % 10

    def gradient():
        seed(0)  # the same weights and dropout masks in both threads
        net = DeepConvNet() if model == "deep" else SimpleConvNet()
        return {k: v.copy() for k, v in net.gradient(x, t).items()}

    threads.set_num_threads(2)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        main = gradient()
        worker = in_thread(gradient)
    assert main.keys() == worker.keys()
    for k in main:
        np.testing.assert_array_equal(worker[k], main[k], err_msg=k)


def test_set_num_threads_1_holds_blas_at_one_thread_and_gives_it_back(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    n = len(blas_threads())
    threads.set_num_threads(3)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        threads.set_num_threads(1)
        assert blas_threads() == [1] * n
        assert threads.parallel_map(np, lambda s: blas_threads(), [slice(0, 2)]) == [[1] * n]
        assert blas_threads() == [1] * n  # still, after the region
        threads.set_num_threads(2)
        assert blas_threads() == [2] * n
        in_thread(lambda: threads.set_num_threads(1))  # from any thread
        assert blas_threads() == [1] * n
        threadpoolctl.threadpool_limits(2, user_api="blas")  # raised behind xpnet's back
        threads.set_num_threads(1)  # one thread again
        assert blas_threads() == [1] * n
        threads.set_num_threads(2)  # the count before the first pin
        assert blas_threads() == [2] * n


def test_xpnet_num_threads_1_holds_blas_at_one_thread_from_import():
    """A fresh process with XPNET_NUM_THREADS=1 (and no other thread variable): BLAS at
    one thread after ``import xpnet``, inside xpnet's regions and after a training step."""
    pytest.importorskip("threadpoolctl")
    script = textwrap.dedent("""
        import json
        import numpy as np
        import threadpoolctl

        def blas():
            return [p["num_threads"] for p in threadpoolctl.threadpool_info()
                    if p["user_api"] == "blas"]

        before = blas()
        import xpnet
        from xpnet.backend import get_num_threads, threads
        from xpnet.models import SimpleConvNet

        after_import = blas()
        inside = threads.parallel_map(np, lambda s: blas(), threads.batch_slices(np, 8))
        net = SimpleConvNet()
        x = np.random.default_rng(0).random((8, 1, 28, 28)).astype(np.float32)
        net.gradient(x, np.arange(8) % 10)
        print(json.dumps({"before": before, "after_import": after_import, "inside": inside,
                          "after_step": blas(), "xpnet": get_num_threads()}))
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env["XPNET_NUM_THREADS"] = "1"
    root = str(Path(xpnet.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    import json

    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if not seen["before"] or max(seen["before"]) == 1:
        pytest.skip(f"BLAS starts at one thread here ({seen['before']}): nothing to hold")
    one = [1] * len(seen["before"])
    assert seen["xpnet"] == 1
    assert seen["after_import"] == one, seen
    assert seen["inside"] == [one], seen
    assert seen["after_step"] == one, seen


class FakeBlas:
    """A BLAS library stand-in: a process-wide or a per-thread count."""

    def __init__(self, per_thread=False, obeys=True, count=4):
        self.name, self.per_thread, self.warned = "fake", per_thread, False
        self.obeys, self.default = obeys, count
        self.shared, self.local = count, threading.local()

    def get(self):
        return getattr(self.local, "count", self.default) if self.per_thread else self.shared

    def set(self, n):
        if not self.obeys:
            return
        if self.per_thread:
            self.local.count = n
        else:
            self.shared = n


def test_a_blas_that_does_not_take_the_limit_is_reported_once(restore_threads, monkeypatch):
    stubborn = FakeBlas(obeys=False)
    monkeypatch.setattr(threads, "_blas", [stubborn])
    threads.set_num_threads(2)
    with pytest.warns(RuntimeWarning, match="could not hold BLAS at one thread: fake still "
                                            "reports 4 threads"):
        threads.parallel_map(np, lambda s: None, [slice(0, 1), slice(1, 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threads.parallel_map(np, lambda s: None, [slice(0, 1), slice(1, 2)])


def test_per_thread_blas_is_held_on_every_thread_that_runs_a_slice(restore_threads,
                                                                    monkeypatch):
    """OpenBLAS on OpenMP keeps a count per calling thread: each slice's thread is set."""
    omp = FakeBlas(per_thread=True)
    monkeypatch.setattr(threads, "_blas", [omp])
    threads.set_num_threads(2)
    counts = threads.parallel_map(np, lambda s: (omp.get(), threading.get_ident()),
                                  [slice(0, 1), slice(1, 2)])
    assert [c for c, _ in counts] == [1, 1]
    assert counts[0][1] != counts[1][1]
    assert omp.get() == 4  # the caller's own count is given back
