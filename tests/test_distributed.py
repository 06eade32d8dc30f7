"""Data parallelism (xpnet.train.distributed): one process, the flat buffer, and real
2-rank jobs started as ``mpiexec -n 2 python -m mpi4py SCRIPT`` under a timeout.

The 2-rank tests are skipped, with the reason, where mpi4py or mpiexec is missing
(``pip install 'xpnet[mpi]'`` provides both).  NCCL tests need CuPy and a GPU (one
GPU for the one-rank communicator, two for a 2-rank job).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from xpnet import backend
from xpnet.train import distributed as dist
from xpnet.train.distributed import (
    FlatBuffer,
    GradientAllReduce,
    SettingsMismatchError,
    SingleProcess,
    average_buffers,
    broadcast_parameters,
    check_same_settings,
    check_world,
    settings_digest,
    shard,
    world,
)

from .conftest import _GPU_SKIP_REASON, to_numpy

TIMEOUT = 120  # seconds for one mpiexec job
ROOT = Path(__file__).resolve().parents[1]


def _mpiexec() -> str | None:
    """mpiexec next to this interpreter (the mpich wheel puts it there), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _mpi_skip_reason() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'xpnet[mpi]')"
    if _mpiexec() is None:
        return "mpiexec not found (pip install 'xpnet[mpi]' installs MPICH's)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_skip_reason() is not None,
                               reason=f"{_mpi_skip_reason()}")


def _gpu_count() -> int:
    if _GPU_SKIP_REASON is not None:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "XPNET_NUM_THREADS"):
        env[var] = "1"  # two ranks share the test's cores
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PMI_SIZE", None)  # a test process is never a rank itself
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str] | None = None,
         timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run a job to its end; a job past ``timeout`` is killed (its process group)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or _env(), cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not end within {timeout} s (a hang):\n{out}")
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


def _mpirun(script: Path, *args: str, n: int = 2, module: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    runner = [sys.executable, "-m", "mpi4py"] if module else [sys.executable]
    return _run([_mpiexec(), "-n", str(n), *runner, str(script), *args], env=env)


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------ one process
def test_world_is_single_process_without_mpiexec(monkeypatch):
    for var in dist._MPI_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    monkeypatch.setattr(dist, "_worlds", {})
    assert not dist.launched_under_mpi()
    comm = world()
    assert isinstance(comm, SingleProcess)
    assert (comm.rank, comm.size, comm.is_root, comm.kind) == (0, 1, True, "single")
    assert world() is comm
    assert "mpi4py.MPI" not in sys.modules  # MPI was not touched
    with pytest.raises(ValueError, match="kind must be"):
        world("gloo")


def test_single_process_is_a_no_op(xp):
    from xpnet.models import MultiLayerNetExtend

    comm = SingleProcess()
    net = MultiLayerNetExtend(6, [5], 3, use_batchnorm=True)
    x = xp.asarray(np.random.default_rng(0).standard_normal((4, 6)), dtype=net.dtype)
    grads = net.gradient(x, xp.asarray([0, 1, 2, 0]))
    before = {k: to_numpy(v).copy() for k, v in {**net.params, **net.buffers}.items()}
    expected = {k: to_numpy(g).copy() for k, g in grads.items()}
    same = dict(grads)
    ar = GradientAllReduce(comm)
    ar(grads, net.params)
    assert ar.calls == 0 and all(grads[k] is same[k] for k in grads)
    for k, g in grads.items():
        np.testing.assert_array_equal(to_numpy(g), expected[k])
    broadcast_parameters(net, comm)
    average_buffers(net, comm)
    for k, v in {**net.params, **net.buffers}.items():
        np.testing.assert_array_equal(to_numpy(v), before[k])
    assert comm.allgather({"a": 1}) == [{"a": 1}]
    check_world(comm, {"lr": 0.1})
    buf = xp.arange(5.0)
    comm.allreduce_sum(buf)
    comm.broadcast(buf)
    np.testing.assert_array_equal(to_numpy(buf), np.arange(5.0))
    with pytest.raises(ValueError, match="root 1"):
        comm.broadcast(buf, root=1)


class _FakeComm(dist.Communicator):
    """A 'world' of ``size`` identical ranks in one process: sums are size * buf."""

    kind = "fake"

    def __init__(self, size: int) -> None:
        self.size, self.calls = size, 0

    def allreduce_sum(self, buf):
        self.calls += 1
        buf *= self.size

    def broadcast(self, buf, root=0):
        pass

    def allgather(self, obj):
        return [obj] * self.size


def test_gradient_allreduce_one_call_over_one_flat_buffer(xp):
    grads = {"W1": xp.asarray(np.arange(12.0).reshape(3, 4)), "b1": xp.asarray([1.0, 2.0]),
             "W2": xp.asarray(np.ones((2, 2, 3)) * 3)}
    expected = {k: to_numpy(v).copy() for k, v in grads.items()}
    comm = _FakeComm(4)
    ar = GradientAllReduce(comm)
    for step in range(3):
        ar(grads, {})
        assert comm.calls == step + 1 == ar.calls  # one collective per step
        for k, v in grads.items():
            np.testing.assert_array_equal(to_numpy(v), expected[k])  # 4 * g / 4
            assert v.shape == expected[k].shape
        buf = ar.flat.buffer
        assert buf.size == 12 + 2 + 12
        grads = {k: xp.asarray(v) for k, v in expected.items()}  # fresh arrays each step
        assert ar.flat.pack(grads) is buf  # the same buffer, step after step


def test_flat_buffer_pack_unpack_is_exact(xp):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 5)).astype(np.float32)
    arrays = {
        "b": xp.asarray(rng.standard_normal(7).astype(np.float32)),
        "a": xp.asarray(rng.standard_normal((2, 3, 4)).astype(np.float32)),
        "scalar": xp.asarray(np.float32(np.pi)),
        "strided": xp.asarray(base)[:, ::2],  # not contiguous
        "tiny": xp.asarray(np.array([np.finfo(np.float32).tiny, -0.0, np.inf], np.float32)),
    }
    flat = FlatBuffer()
    buf = flat.pack(arrays)
    assert flat.names == ("a", "b", "scalar", "strided", "tiny")  # sorted: alike on all ranks
    assert buf.shape == (24 + 7 + 1 + 18 + 3,) and buf.dtype == np.float32
    assert flat.nbytes == buf.size * 4
    out = {}
    flat.unpack(out)
    for k, v in arrays.items():
        got = to_numpy(out[k])
        assert got.shape == v.shape and got.dtype == v.dtype
        assert got.tobytes() == np.ascontiguousarray(to_numpy(v)).tobytes()  # bit for bit
    # a new layout makes a new buffer; the same layout reuses it
    assert flat.pack(arrays) is buf
    arrays["b"] = xp.zeros(8, dtype=np.float32)
    assert flat.pack(arrays) is not buf
    with pytest.raises(TypeError, match="mixed dtypes"):
        FlatBuffer().pack({"a": xp.zeros(2, np.float32), "b": xp.zeros(2, np.float64)})
    with pytest.raises(ValueError, match="nothing"):
        FlatBuffer().pack({})


def test_shard_splits_a_global_batch():
    perm = np.random.default_rng(0).permutation(100)
    batch = perm[10:22]
    parts = [shard(batch, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate(parts), batch)  # every sample once
    np.testing.assert_array_equal(shard(batch, 0, 1), batch)
    with pytest.raises(ValueError, match="multiple of 5"):
        shard(batch, 0, 5)
    with pytest.raises(ValueError, match="rank must be"):
        shard(batch, 3, 3)
    with pytest.raises(ValueError, match="size must be"):
        shard(batch, 0, 0)


def test_settings_mismatch_names_what_differs():
    class TwoRanks(_FakeComm):
        def allgather(self, obj):  # rank 1 runs other settings
            other = {"lr": 0.2, "epochs": 3, "model": "mlp"}
            return [obj, settings_digest(other) if isinstance(obj, str) else other]

    assert settings_digest({"a": 1, "b": [1, 2]}) == settings_digest({"b": [1, 2], "a": 1})
    with pytest.raises(SettingsMismatchError) as info:
        check_same_settings(TwoRanks(2), {"lr": 0.1, "epochs": 3, "model": "mlp"})
    text = str(info.value)
    assert "lr: rank 0: 0.1, rank 1: 0.2" in text
    assert "epochs" not in text and "model" not in text
    check_same_settings(_FakeComm(2), {"lr": 0.1})  # identical ranks pass


def test_device_mismatch_is_refused():
    class Mixed(_FakeComm):
        def allgather(self, obj):
            return [True, False, True]

    with pytest.raises(dist.DeviceMismatchError, match=r"ranks \[1\] have no usable GPU"):
        dist.check_devices(Mixed(3), uses_gpu=True)


# ------------------------------------------------------------------ 2 ranks
TRAIN = """
    import sys
    import numpy as np
    from xpnet import backend
    from xpnet.backend import to_backend, to_cpu
    from xpnet.models import MultiLayerNet, SimpleConvNet
    from xpnet.optim import SGD, Adam
    from xpnet.train.distributed import (GradientAllReduce, broadcast_parameters,
                                         check_world, shard, world)

    out = sys.argv[1]
    comm = world()
    check_world(comm, {"script": "train"})
    CONFIGS = {
        "mlp_sgd_f64": (lambda: MultiLayerNet(20, [16, 12], 5, dtype="float64",
                                              weight_decay_lambda=0.01),
                        lambda: SGD(lr=0.1), (20,), "float64"),
        "mlp_adam_f32": (lambda: MultiLayerNet(20, [16], 5, dtype="float32"),
                         lambda: Adam(lr=0.01), (20,), "float32"),
        "conv_adam_f64": (lambda: SimpleConvNet((1, 8, 8), {"filter_num": 4, "filter_size": 3,
                                                           "pad": 1, "stride": 1},
                                                hidden_size=10, output_size=5,
                                                weight_init_std=0.1, dtype="float64"),
                          lambda: Adam(lr=0.01), (1, 8, 8), "float64"),
    }
    N, B, STEPS = 48, 12, 6
    for name, (make_net, make_opt, shape, dtype) in CONFIGS.items():
        backend.seed(1 + comm.rank)  # different weights per rank: the broadcast must fix it
        net = make_net()
        broadcast_parameters(net, comm)
        opt, ar = make_opt(), GradientAllReduce(comm)
        data = np.random.default_rng(0)  # the same data and order on every rank
        x = data.standard_normal((N, *shape)).astype(dtype)
        t = data.integers(0, 5, N)
        order = np.random.default_rng(1)
        saved = {}
        for step in range(STEPS):
            pos = step % (N // B)
            if pos == 0:
                perm = order.permutation(N)
            mine = shard(perm[pos * B:(pos + 1) * B], comm.rank, comm.size)
            grads = net.gradient(to_backend(x[mine]), to_backend(t[mine]))
            ar(grads, net.params)
            if step == 0:
                saved.update({"grad_" + k: to_cpu(g).copy() for k, g in grads.items()})
            opt.update(net.params, grads)
        saved.update({k: to_cpu(v) for k, v in net.params.items()})
        saved["calls"] = np.array(ar.calls)
        np.savez(f"{out}/{name}_{comm.size}_{comm.rank}.npz", **saved)
    print(f"rank {comm.rank} of {comm.size} done {type(comm).__name__}", flush=True)
"""


def _compare_runs(out: Path, size: int) -> None:
    tolerances = {"f64": dict(rtol=1e-12, atol=1e-14), "f32": dict(rtol=1e-5, atol=1e-6)}
    for name in ("mlp_sgd_f64", "mlp_adam_f32", "conv_adam_f64"):
        one = dict(np.load(out / f"{name}_1_0.npz"))
        ranks = [dict(np.load(out / f"{name}_{size}_{r}.npz")) for r in range(size)]
        assert int(ranks[0]["calls"]) == 6 and int(one["calls"]) == 0
        for k, ref in one.items():
            if k == "calls":
                continue
            for r in range(1, size):  # all ranks hold bit-identical parameters
                assert ranks[r][k].tobytes() == ranks[0][k].tobytes(), (name, k, r)
            tol = tolerances[name[-3:]]
            np.testing.assert_allclose(ranks[0][k], ref, err_msg=f"{name} {k}", **tol)
        # the test can fail: the gradients are not trivially equal to the parameters' sign
        assert np.abs(one["grad_W1"]).max() > 1e-3


@needs_mpi
@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    script = _script(tmp_path, "train.py", TRAIN)
    single = _run([sys.executable, str(script), str(tmp_path)])
    assert single.returncode == 0, single.stdout
    assert "rank 0 of 1 done SingleProcess" in single.stdout
    job = _mpirun(script, str(tmp_path))
    assert job.returncode == 0, job.stdout
    assert job.stdout.count(" of 2 done MPICommunicator") == 2
    _compare_runs(tmp_path, 2)


COLLECTIVES = """
    import json
    import sys
    import numpy as np
    from xpnet import backend
    from xpnet.backend import to_cpu
    from xpnet.models import MultiLayerNetExtend
    from xpnet.train.distributed import (SettingsMismatchError, DeviceMismatchError,
        average_buffers, broadcast_parameters, check_devices, check_world, world)

    comm = world()
    r = comm.rank
    report = {}
    # batch norm statistics drift apart per rank, then are averaged
    backend.seed(10 + r)
    net = MultiLayerNetExtend(6, [5, 4], 3, use_batchnorm=True, dtype="float64")
    broadcast_parameters(net, comm)
    gathered = comm.allgather([to_cpu(v) for v in net.params.values()])
    report["params_equal"] = all(np.array_equal(a, b)
                                 for a, b in zip(gathered[0], gathered[1]))
    x = np.random.default_rng(r).standard_normal((8, 6)) * (r + 1)
    net.gradient(x, np.arange(8) % 3)
    mine = {k: to_cpu(v).copy() for k, v in net.buffers.items()}
    everyone = comm.allgather(mine)
    average_buffers(net, comm)
    report["buffers_averaged"] = all(
        np.allclose(to_cpu(net.buffers[k]), sum(e[k] for e in everyone) / comm.size,
                    rtol=1e-15, atol=0) for k in mine)
    report["buffers_differed"] = any(not np.array_equal(everyone[0][k], everyone[1][k])
                                     for k in mine)
    # collectives on a strided array and on rank 1's broadcast
    a = np.arange(12.0).reshape(3, 4)[:, ::2] * (r + 1)
    buf = np.full(5, float(r))
    comm.broadcast(buf, root=1)
    report["bcast_from_1"] = buf.tolist()
    summed = np.ascontiguousarray(a).reshape(-1)
    comm.allreduce_sum(summed)
    report["sum"] = summed.tolist()
    # refusals: every rank raises, naming what differs
    try:
        check_world(comm, {"lr": 0.1 * (r + 1), "epochs": 2})
    except SettingsMismatchError as exc:
        report["settings"] = str(exc)
    try:
        check_devices(comm, uses_gpu=(r == 0))
    except DeviceMismatchError as exc:
        report["devices"] = str(exc)
    with open(f"{sys.argv[1]}/report{r}.json", "w") as f:
        json.dump(report, f)
"""


@needs_mpi
@pytest.mark.slow
def test_two_rank_collectives_and_refusals(tmp_path):
    job = _mpirun(_script(tmp_path, "collectives.py", COLLECTIVES), str(tmp_path))
    assert job.returncode == 0, job.stdout
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert rep["params_equal"] and rep["buffers_averaged"] and rep["buffers_differed"]
        assert rep["bcast_from_1"] == [1.0] * 5
        assert rep["sum"] == (np.arange(12.0).reshape(3, 4)[:, ::2] * 3).reshape(-1).tolist()
        assert "lr: rank 0: 0.1, rank 1: 0.2" in rep["settings"]
        assert "epochs" not in rep["settings"]
        assert "ranks [1] have no usable GPU while ranks [0] have one" in rep["devices"]


FAILING = """
    import numpy as np
    from xpnet.train.distributed import world

    comm = world()
    buf = np.ones(1000)
    for i in range(10**6):
        if comm.rank == 1 and i == 5:
            raise RuntimeError("boom on rank 1 at step 5")
        comm.allreduce_sum(buf)  # rank 0 waits here for a rank that has died
        buf[:] = 1.0
"""


@needs_mpi
@pytest.mark.parametrize("module", [True, False], ids=["python-m-mpi4py", "python-script"])
def test_exception_on_one_rank_ends_the_job(tmp_path, module):
    start = time.monotonic()
    job = _mpirun(_script(tmp_path, "failing.py", FAILING), module=module)
    assert job.returncode != 0
    assert "RuntimeError: boom on rank 1 at step 5" in job.stdout
    assert time.monotonic() - start < 60, "the job hung before aborting"


LOOPING = """
    import os, sys, time
    import numpy as np
    from xpnet.train.distributed import world

    comm = world()
    buf = np.ones(1000)
    comm.allreduce_sum(buf)
    with open(os.path.join(sys.argv[1], f"pid{comm.rank}"), "w") as f:
        f.write(str(os.getpid()))
    while True:
        comm.allreduce_sum(buf)
        buf[:] = 1.0
        time.sleep(0.01)
"""


@needs_mpi
def test_killed_rank_ends_the_job_within_30s(tmp_path):
    script = _script(tmp_path, "looping.py", LOOPING)
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py",
                             str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        pids = [tmp_path / "pid0", tmp_path / "pid1"]
        while not all(p.exists() and p.read_text() for p in pids):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        pid0, pid1 = (int(p.read_text()) for p in pids)
        os.kill(pid1, signal.SIGKILL)  # rank 1 only
        killed = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - killed < 30
        assert proc.returncode != 0
        for _ in range(100):  # rank 0 goes with the job
            try:
                os.kill(pid0, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("rank 0 outlived the job")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


# ------------------------------------------------------------------ NCCL (GPU)
class _DeviceArray(np.ndarray):
    """A NumPy array dressed as a CuPy one (``.data.ptr``, ``.device.id``)."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return SimpleNamespace(id=0)


def test_nccl_calls_follow_cupys_signatures(monkeypatch):
    """Without a GPU: NCCLCommunicator against a stand-in for CuPy's NCCL binding
    (argument order as in cupy/cuda/nccl.pyx: allReduce(send, recv, count, dtype, op,
    stream), bcast(buf, count, dtype, root, stream))."""
    calls = []

    class Comm:
        def __init__(self, ndev, uid, rank):
            calls.append(("init", ndev, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):
            calls.append(("allReduce", send, recv, count, dtype, op, stream))

        def bcast(self, buf, count, dtype, root, stream):
            calls.append(("bcast", buf, count, dtype, root, stream))

    nccl = SimpleNamespace(NcclCommunicator=Comm, get_unique_id=lambda: (7,) * 128,
                           NCCL_SUM=0, NCCL_FLOAT16=6, NCCL_FLOAT32=7, NCCL_FLOAT64=8,
                           NCCL_INT32=2, NCCL_INT64=4)
    used = []
    cuda = SimpleNamespace(nccl=nccl, runtime=SimpleNamespace(getDeviceCount=lambda: 1),
                           Device=lambda i: SimpleNamespace(use=lambda: used.append(i)),
                           get_current_stream=lambda: SimpleNamespace(ptr=1234))
    cupy = SimpleNamespace(cuda=cuda, ndarray=_DeviceArray)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    monkeypatch.setattr(backend, "_import_cupy", lambda: cupy)
    comm = dist.NCCLCommunicator(None)
    assert (comm.rank, comm.size, comm.device_id, used) == (0, 1, 0, [0])
    assert calls == [("init", 1, (7,) * 128, 0)]
    buf = np.zeros(6, np.float32).view(_DeviceArray)
    comm.allreduce_sum(buf)
    comm.broadcast(buf[2:], root=0)
    ptr = buf.ctypes.data
    assert calls[1:] == [("allReduce", ptr, ptr, 6, 7, 0, 1234),
                         ("bcast", ptr + 8, 4, 7, 0, 1234)]
    with pytest.raises(TypeError, match="CuPy arrays"):
        comm.allreduce_sum(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="unsupported dtype"):
        comm.allreduce_sum(np.zeros(3, np.complex64).view(_DeviceArray))
    with pytest.raises(ValueError, match="contiguous 1-D"):
        comm.allreduce_sum(np.zeros((2, 3), np.float32).view(_DeviceArray))


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP_REASON is not None, reason=f"{_GPU_SKIP_REASON}")
def test_nccl_one_rank_communicator():
    import cupy

    try:
        comm = dist.NCCLCommunicator(None)
    except dist.DistributedError as exc:
        pytest.skip(str(exc))
    assert (comm.rank, comm.size, comm.kind) == (0, 1, "nccl")
    buf = cupy.arange(10, dtype=cupy.float32)
    comm.allreduce_sum(buf)
    comm.broadcast(buf)
    np.testing.assert_array_equal(buf.get(), np.arange(10, dtype=np.float32))
    with backend.use_backend("cupy"):
        grads = {"W": cupy.ones((3, 4), cupy.float32) * 2, "b": cupy.arange(4.0)[:4]}
        grads["b"] = grads["b"].astype(cupy.float32)
        ar = GradientAllReduce(comm)
        ar(grads, {})
        assert ar.calls == 1
        np.testing.assert_array_equal(grads["W"].get(), np.full((3, 4), 2, np.float32))
        with pytest.raises(TypeError, match="CuPy arrays"):
            comm.allreduce_sum(np.zeros(3, np.float32))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 GPUs for a 2-rank NCCL job "
                    f"({_gpu_count()} found)")
@needs_mpi
def test_two_gpu_ranks_over_nccl_match_one_process(tmp_path):
    script = _script(tmp_path, "train.py", TRAIN)
    env = _env(DL_BACKEND="cupy")
    single = _run([sys.executable, str(script), str(tmp_path)], env=env)
    assert single.returncode == 0, single.stdout
    job = _mpirun(script, str(tmp_path), env=env)
    assert job.returncode == 0, job.stdout
    assert "done NCCLCommunicator" in job.stdout
    _compare_runs(tmp_path, 2)


# ------------------------------------------------------------------ the benchmark
@needs_mpi
@pytest.mark.slow
def test_bench_distributed_quick_and_projection(tmp_path):
    bench = ROOT / "benchmarks" / "bench_distributed.py"
    meas = tmp_path / "bench.json"
    run = _run([sys.executable, str(bench), "--quick", "--json", str(meas)])
    assert run.returncode == 0, run.stdout
    res = json.loads(meas.read_text())
    assert [c["ranks"] for c in res["cases"]] == [1, 2, 1]
    two = res["cases"][1]
    assert two["best_round"]["communicator"] == "MPICommunicator"
    assert two["best_round"]["batch_per_rank"] * 2 == res["sizes"]["batch"]
    assert res["grad_bytes"] == 4 * res["params"] > 0
    assert two["allreduce_ms"] > 0 and res["cases"][0]["allreduce_ms"] < two["allreduce_ms"]
    pytest.importorskip("matplotlib")
    png, md = tmp_path / "scaling.png", tmp_path / "scaling.md"
    proj = _run([sys.executable, str(bench), "--project", str(meas), "--png", str(png),
                 "--md", str(md)])
    assert proj.returncode == 0, proj.stdout
    assert png.stat().st_size > 10_000 and "p=100" in md.read_text()


def test_ring_allreduce_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_distributed", ROOT / "benchmarks" / "bench_distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.ring_allreduce_s(1, 1e6, 1e9, 1e-6) == 0
    # 2(p-1)/p * bytes / bandwidth + 2(p-1) * latency
    assert bench.ring_allreduce_s(4, 1e6, 1e9, 1e-6) == pytest.approx(1.5e-3 + 6e-6)
    assert bench.gpu_step_ms(100) == pytest.approx(bench.gpu_step_ms(100.0))
    assert bench.gpu_step_ms(8) == bench.gpu_step_ms(32)  # launch-bound floor


# ------------------------------------------------------------ the command line
@needs_mpi
def test_train_py_on_two_ranks_equals_one_process(tmp_path):
    """`train.py --save` after 1 epoch: 2 ranks give one process's parameters (float32
    rounding of the reduction order); rank 0 alone prints and writes."""
    from xpnet.state import load_state

    common = ["--model", "mlp", "--epochs", "1", "--limit-train", "2000", "--seed", "0",
              "--quiet"]
    one = _run([sys.executable, str(ROOT / "train.py"), *common, "--save",
                str(tmp_path / "one.npz")])
    assert one.returncode == 0, one.stdout
    two = _mpirun(ROOT / "train.py", *common, "--save", str(tmp_path / "two.npz"))
    assert two.returncode == 0, two.stdout
    assert two.stdout.count("test accuracy:") == 1, two.stdout  # rank 0 only
    a, b = load_state(tmp_path / "one.npz").params, load_state(tmp_path / "two.npz").params
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


@needs_mpi
def test_train_py_refuses_a_batch_the_ranks_do_not_divide(tmp_path):
    done = _mpirun(ROOT / "train.py", "--model", "mlp", "--epochs", "1", "--limit-train",
                   "500", "--batch-size", "99")
    assert done.returncode != 0
    assert "multiple of the 2 processes" in done.stdout


@needs_mpi
def test_train_py_resumes_under_mpi_and_refuses_another_world_size(tmp_path):
    ck = str(tmp_path / "ck")
    common = ["--model", "mlp", "--limit-train", "1000", "--checkpoint-dir", ck, "--quiet"]
    first = _mpirun(ROOT / "train.py", *common, "--epochs", "1")
    assert first.returncode == 0, first.stdout
    again = _mpirun(ROOT / "train.py", *common, "--epochs", "2", "--resume")
    assert again.returncode == 0 and again.stdout.count("test accuracy:") == 1, again.stdout
    alone = _run([sys.executable, str(ROOT / "train.py"), *common, "--epochs", "3", "--resume"])
    assert alone.returncode != 0
    assert "world_size: 2 in the checkpoint, 1 now" in alone.stdout
