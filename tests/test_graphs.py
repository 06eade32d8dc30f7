"""CUDA graphs: the captured GEMM's layout logic, and TrainStep against the eager step.

The layout of every captured GEMM is checked on both backends: on NumPy by playing
cuBLAS's column-major ``gemm`` on the arrays' memory, on CuPy by calling cuBLAS.
A recorded step must give the eager step's results; that needs CuPy and a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet.backend import seed
from xpnet.backend.graphs import (
    CudaGraph,
    GraphFallbackWarning,
    _cublas_matmul,
    gemm_operand,
    matmul,
    prepare_gemm,
)
from xpnet.backend.kernels import use_cuda_kernels
from xpnet.models import DeepConvNet, MultiLayerNetExtend
from xpnet.optim import SGD, Adam, Momentum, StepLR
from xpnet.train import Trainer, TrainStep


def _column_major(a: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major (rows, cols) matrix with leading dimension ld at a's first element."""
    s = a.itemsize
    return np.lib.stride_tricks.as_strided(a, shape=(rows, cols), strides=(s, ld * s))


def _play_gemm(xp, a, b, out):
    """What cuBLAS computes from prepare_gemm's plan (NumPy: done here on the memory)."""
    if xp.__name__ == "cupy":
        return _cublas_matmul(xp, a, b, out)
    a, b, target, (op_b, op_a, n, m, k, ld_b, ld_a, ld_out) = prepare_gemm(xp, a, b, out)
    bm = _column_major(b, n, k, ld_b) if op_b == "N" else _column_major(b, k, n, ld_b).T
    am = _column_major(a, k, m, ld_a) if op_a == "N" else _column_major(a, m, k, ld_a).T
    _column_major(target, n, m, ld_out)[...] = bm @ am
    if out is not None and target is not out:
        out[...] = target
        return out
    return target


def _operand(xp, rng, shape, layout):
    """A (rows, cols) operand laid out as asked, inside a larger buffer where useful."""
    r, c = shape
    if layout == "c":
        return xp.asarray(rng.standard_normal((r, c)))
    if layout == "t":  # a transposed view, as W.T or col.T
        return xp.asarray(rng.standard_normal((c, r))).T
    if layout == "rows":  # a slice of rows, as x2d[part]
        return xp.asarray(rng.standard_normal((r + 3, c)))[2:2 + r]
    if layout == "pitch":  # rows with a pitch wider than the row
        return xp.asarray(rng.standard_normal((r, c + 4)))[:, 1:1 + c]
    if layout == "strided":  # neither rows nor columns contiguous: copied first
        return xp.asarray(rng.standard_normal((2 * r, 2 * c)))[::2, ::2]
    if layout == "reversed":  # a negative row stride: copied first
        return xp.asarray(rng.standard_normal((r + 2, c)))[::-1][:r]
    if layout == "broadcast":  # a zero row stride: copied first
        return xp.broadcast_to(xp.asarray(rng.standard_normal((1, c))), (r, c))
    raise AssertionError(layout)


LAYOUTS = ["c", "t", "rows", "pitch", "strided", "reversed", "broadcast"]


@pytest.mark.parametrize("la", LAYOUTS)
@pytest.mark.parametrize("lb", LAYOUTS)
@pytest.mark.parametrize("m, k, n", [(5, 3, 4), (1, 6, 2), (4, 1, 3), (3, 5, 1), (1, 1, 1),
                                     (0, 3, 2), (2, 0, 3)])
def test_captured_gemm_layouts(xp, rng, la, lb, m, k, n):
    a = _operand(xp, rng, (m, k), la)
    b = _operand(xp, rng, (k, n), lb)
    expected = to_numpy(a) @ to_numpy(b)
    np.testing.assert_allclose(to_numpy(_play_gemm(xp, a, b, None)), expected,
                               rtol=1e-12, atol=1e-12)
    for out in (xp.full((m + 2, n), np.nan)[1:1 + m],  # rows of a larger array
                xp.full((n, m), np.nan).T):  # column-major: written through a copy
        got = _play_gemm(xp, a, b, out)
        assert got is out
        np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12, atol=1e-12)


def _data(xp, rng, n, shape, steps):
    return [(xp.asarray(rng.random((n, *shape))), xp.asarray(rng.integers(0, 10, n)))
            for _ in range(steps)]


def test_gemm_operand_ignores_the_stride_of_a_length_one_axis():
    # The stride of a length-1 axis is never followed, so one that is not a whole
    # number of items (as_strided can build such arrays) must not force a copy.
    assert gemm_operand((3, 1), (8, 3), 4) == ("N", 2)
    assert gemm_operand((1, 3), (5, 4), 4) == ("N", 3)
    assert gemm_operand((3, 2), (8, 3), 4) is None


def _deep(dtype):
    return DeepConvNet(dtype=dtype)


def _extend(dtype):
    return MultiLayerNetExtend(784, [20, 20], 10, use_dropout=True, dropout_ratio=0.3,
                               use_batchnorm=True, dtype=dtype)


def _run(build, make_opt, batches, cuda_graph, schedule=False):
    seed(0)
    net = build()
    opt = make_opt()
    sched = StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    step = TrainStep(net, opt, cuda_graph=cuda_graph)
    losses, graphed = [], []
    for x, t in batches:
        losses.append(float(step(x, t)))
        graphed.append(step.graphed)
        if sched is not None:
            sched.step()
    return net, opt, losses, graphed


@pytest.mark.parametrize("model, shape", [(_deep, (1, 28, 28)), (_extend, (784,))],
                         ids=["deep-convnet", "mlp-extend-bn-dropout"])
@pytest.mark.parametrize("make_opt", [Adam, lambda: Momentum(lr=0.05)],
                         ids=["adam", "momentum"])
def test_train_step_graph_matches_eager(xp, rng, model, shape, make_opt):
    """Five steps, a new batch and a scheduled learning rate each time: the recorded
    step (float64) gives the eager step's losses and parameters."""
    batches = _data(xp, rng, 6, shape, 5)
    build = lambda: model("float64")  # noqa: E731
    net_e, opt_e, loss_e, _ = _run(build, make_opt, batches, False, schedule=True)
    net_g, opt_g, loss_g, graphed = _run(build, make_opt, batches, True, schedule=True)
    assert graphed == ([True] * 5 if xp.__name__ == "cupy" else [False] * 5)
    np.testing.assert_allclose(loss_g, loss_e, rtol=1e-10)
    assert opt_g.step_count == opt_e.step_count == 5
    for key, p in net_e.params.items():
        np.testing.assert_allclose(to_numpy(net_g.params[key]), to_numpy(p), rtol=1e-9,
                                   atol=1e-12, err_msg=key)
    for key, a in net_e.buffers.items():
        np.testing.assert_allclose(to_numpy(net_g.buffers[key]), to_numpy(a), rtol=1e-9,
                                   atol=1e-12, err_msg=key)


def _four_steps_eager_and_graphed(xp, rng, between):
    """Four Adam steps of a MultiLayerNetExtend (float64), eagerly and with cuda_graph;
    ``between(step, net, opt)`` runs after the second and returns more losses.
    Asserts that both give the same losses and parameters."""
    batches = _data(xp, rng, 6, (784,), 4)
    results = []
    for cuda_graph in (False, True):
        seed(0)
        net, opt = _extend("float64"), Adam()
        step = TrainStep(net, opt, cuda_graph=cuda_graph)
        losses = [float(step(*batches[0])), float(step(*batches[1]))]
        losses += between(step, net, opt, batches[2])
        losses += [float(step(*batches[3]))]
        results.append((losses, {k: to_numpy(p) for k, p in net.params.items()}))
    (loss_e, params_e), (loss_g, params_g) = results
    np.testing.assert_allclose(loss_g, loss_e, rtol=1e-10)
    for key in params_e:
        np.testing.assert_allclose(params_g[key], params_e[key], rtol=1e-9, atol=1e-12)


def test_train_step_records_again_after_state_is_replaced(xp, rng):
    """Loading optimizer state replaces the arrays a recording uses: it is redone."""

    def reload_then_step(step, net, opt, batch):
        opt.load_state_dict(opt.state_dict(), net.params)  # new m and v arrays
        return [float(step(*batch))]

    _four_steps_eager_and_graphed(xp, rng, reload_then_step)


def test_retiring_a_recording_empties_every_retired_pool():
    """Arrays that outlive a recording are freed later, into its retired pool: each
    retirement releases those blocks too, so re-recording does not pile them up."""

    class Pool:
        def __init__(self):
            self.emptied = 0

        def free_all_blocks(self):
            self.emptied += 1

    class Recording:
        def __init__(self):
            self.pool = Pool()

    step = TrainStep(network=None, optimizer=None, cuda_graph=True)
    first, second = Recording(), Recording()
    step._retire(first)
    step._retire(second)
    assert (first.pool.emptied, second.pool.emptied) == (2, 1)


def test_unrecordable_step_runs_eagerly_with_a_warning(xp, rng):
    batches = _data(xp, rng, 6, (784,), 3)
    seed(0)
    net_e, opt_e = _extend("float64"), SGD(lr=0.1, clip_norm=1.0)
    eager = [float(TrainStep(net_e, opt_e)(x, t)) for x, t in batches[:1]]
    seed(0)
    net_g, opt_g = _extend("float64"), SGD(lr=0.1, clip_norm=1.0)
    step = TrainStep(net_g, opt_g, cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [float(step(x, t)) for x, t in batches[:1]]
    assert not step.graphed
    if xp.__name__ == "cupy":
        assert any("clips the gradient norm" in str(w.message) for w in caught)
    else:
        assert not caught  # nothing to record on the CPU
    assert got == eager


def test_kernels_off_means_no_graph(xp, rng):
    if xp.__name__ != "cupy":
        pytest.skip("the CuPy kernels exist on CuPy only")
    batches = _data(xp, rng, 6, (784,), 2)
    seed(0)
    step = TrainStep(_extend("float32"), Adam(), cuda_graph=True)
    with use_cuda_kernels(False), pytest.warns(GraphFallbackWarning, match="turned off"):
        step(*batches[0])
        step(*batches[1])  # warned once
    assert not step.graphed


def test_trainer_with_cuda_graph_matches_eager(xp, rng):
    x = rng.random((60, 784)).astype(np.float32)
    t = rng.integers(0, 10, 60)
    out = []
    for cuda_graph in (False, True):
        seed(0)
        net = _extend("float64")
        trainer = Trainer(net, x, t, x[:20], t[:20], epochs=2, mini_batch_size=20,
                          verbose=False, seed=3, cuda_graph=cuda_graph)
        trainer.train()
        out.append((trainer.train_loss_list, {k: to_numpy(p) for k, p in net.params.items()}))
    (loss_e, params_e), (loss_g, params_g) = out
    np.testing.assert_allclose(loss_g, loss_e, rtol=1e-10)
    for key in params_e:
        np.testing.assert_allclose(params_g[key], params_e[key], rtol=1e-9, atol=1e-12)


def test_trainer_refuses_cuda_graph_with_clip_norm(xp, rng):
    x = rng.random((10, 784)).astype(np.float32)
    t = rng.integers(0, 10, 10)
    with pytest.raises(ValueError, match="cuda_graph cannot be combined with clip_norm"):
        Trainer(_extend("float32"), x, t, x, t, clip_norm=1.0, cuda_graph=True)


def test_captured_products_replay_with_new_inputs(xp, rng):
    """A recording of GEMMs in three layouts, replayed after its inputs changed in place."""
    if xp.__name__ != "cupy":
        pytest.skip("CUDA graphs exist on CuPy only")
    a = xp.asarray(rng.standard_normal((6, 40)))
    b = xp.asarray(rng.standard_normal((5, 40)))
    w = xp.asarray(rng.standard_normal((40, 7)))
    graph = CudaGraph()

    def products():
        return matmul(xp, a, w), matmul(xp, a, b.T), matmul(xp, b, a.T)

    with graph.private():
        products()  # compiles and fills the pool, as a warm-up step does
    recorded = graph.capture(products)
    for _ in range(2):
        a[...] = xp.asarray(rng.standard_normal(a.shape))
        graph.launch()
        ah, bh, wh = to_numpy(a), to_numpy(b), to_numpy(w)
        for got, want in zip(recorded, (ah @ wh, ah @ bh.T, bh @ ah.T), strict=True):
            np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-12)


def test_turning_kernels_off_after_recording_runs_eagerly(xp, rng):
    """The recording reads scalars the kernels-off path no longer writes: not replayed."""

    def step_without_kernels(step, net, opt, batch):
        with use_cuda_kernels(False), warnings.catch_warnings():
            warnings.simplefilter("ignore", GraphFallbackWarning)
            loss = float(step(*batch))
            assert not step.graphed
        return [loss]

    _four_steps_eager_and_graphed(xp, rng, step_without_kernels)
