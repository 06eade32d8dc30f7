"""xpnet.datasets: bundled MNIST, IDX parsing, look-up order, downloads, caches, splits.

Host-only (no backend fixture).  Downloads go to a local http.server on 127.0.0.1 serving
small synthetic IDX files; the user cache is a tmp_path via XDG_CACHE_HOME.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from xpnet.datasets import (
    DatasetCorruptError,
    DatasetNotFoundError,
    fetch,
    idx,
    load_fashion_mnist,
    load_mnist,
    mnist,
    npycache,
    paths,
    shuffle_dataset,
    train_val_split,
)
from xpnet.datasets.specs import DatasetSpec, FileSpec, verify_checksums

NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
BUNDLED = mnist.BUNDLED_MNIST_DIR


# --------------------------------------------------------------------------- helpers


def images_idx(n: int, rows: int = 28, cols: int = 28, seed: int = 0, magic: int = 2051,
               count: int | None = None) -> bytes:
    """Uncompressed IDX image bytes with random pixels (``count`` overrides the header)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, rows, cols), dtype=np.uint8)
    header = np.array([magic, n if count is None else count, rows, cols], ">u4").tobytes()
    return header + pixels.tobytes()


def labels_idx(n: int, seed: int = 0, magic: int = 2049, count: int | None = None,
               values: np.ndarray | None = None) -> bytes:
    """Uncompressed IDX label bytes, digits 0..9 unless ``values`` is given."""
    if values is None:
        values = np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.uint8)
    header = np.array([magic, n if count is None else count], ">u4").tobytes()
    return header + np.asarray(values, np.uint8).tobytes()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def synthetic_files(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, bytes]:
    """The four .gz files of a tiny MNIST-layout data set."""
    return {
        NAMES[0]: gz(images_idx(n_train, seed=seed)),
        NAMES[1]: gz(labels_idx(n_train, seed=seed)),
        NAMES[2]: gz(images_idx(n_test, seed=seed + 1)),
        NAMES[3]: gz(labels_idx(n_test, seed=seed + 1)),
    }


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def synthetic_spec(*file_sets: dict[str, bytes], n_train: int = 30, n_test: int = 10,
                   **changes) -> DatasetSpec:
    """An MNIST spec whose checksums are those of ``file_sets``; nothing bundled."""
    fspecs = [FileSpec(name, gz_sha256=tuple(sha256(fs[name]) for fs in file_sets))
              for name in NAMES]
    fields = dict(name="mnist", title="MNIST", train_images=fspecs[0], train_labels=fspecs[1],
                  test_images=fspecs[2], test_labels=fspecs[3], train_count=n_train,
                  test_count=n_test, mirrors=(), bundled_dir=None, system_dirs=())
    fields.update(changes)
    return DatasetSpec(**fields)


def decoded(files: dict[str, bytes]):
    """The arrays the loader should return for ``files`` (uint8, unflattened)."""
    raw = {name: gzip.decompress(data) for name, data in files.items()}
    return (
        (idx.parse_images(raw[NAMES[0]], "x"), idx.parse_labels(raw[NAMES[1]], "x")),
        (idx.parse_images(raw[NAMES[2]], "x"), idx.parse_labels(raw[NAMES[3]], "x")),
    )


def cache_dir() -> Path:
    return paths.dataset_cache_dir("mnist")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A private user cache, no XPNET_* variables, no proxies.  The in-memory cache is
    keyed by path, size and mtime, so entries cannot leak between tests' tmp files."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("XPNET_DATA", "XPNET_OFFLINE", "XPNET_NPY_CACHE", "http_proxy", "https_proxy",
                "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture
def use_spec(monkeypatch):
    """Install a spec as DATASETS[spec.name] for the test."""
    def install(spec: DatasetSpec) -> DatasetSpec:
        monkeypatch.setitem(mnist.DATASETS, spec.name, spec)
        return spec
    return install


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        status, body, mode = route
        if status != 200:
            self.send_error(status)
            return
        self.send_response(200)
        declared = len(body) + 1000 if mode == "cut" else len(body)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        if mode == "cut":  # promise more than we send, then hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server: ``server.routes[path] = (status, body, mode)``; ``server.url``."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes = {}
    srv.hits = []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def serve(srv, prefix: str, files: dict[str, bytes], status: int = 200, mode: str = "") -> str:
    for name, data in files.items():
        srv.routes[f"/{prefix}/{name}"] = (status, data, mode)
    return f"{srv.url}/{prefix}/"


# --------------------------------------------------------------------------- bundled MNIST


def test_bundled_files_match_recorded_checksums():
    readme = (BUNDLED / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme or "Attribution-Share Alike 3.0" in readme
    assert "LeCun" in readme and "Cortes" in readme and "Burges" in readme
    for fspec in mnist.MNIST.files:
        data = (BUNDLED / fspec.filename).read_bytes()
        assert sha256(data) in fspec.gz_sha256
        assert sha256(data) in readme and fspec.raw_md5 in readme
        assert hashlib.md5(gzip.decompress(data)).hexdigest() == fspec.raw_md5


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("one_hot", [True, False])
def test_load_mnist_shapes_dtypes_ranges(normalize, flatten, one_hot):
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize, flatten, one_hot)
    for x, t, n in ((x_train, t_train, 60000), (x_test, t_test, 10000)):
        assert x.shape == ((n, 784) if flatten else (n, 1, 28, 28))
        assert x.dtype == (np.float32 if normalize else np.uint8)
        assert x.min() == 0 and x.max() == (1.0 if normalize else 255)
        if one_hot:
            assert t.shape == (n, 10) and t.dtype == np.float32
            assert np.array_equal(t.sum(axis=1), np.ones(n, np.float32))
            assert set(np.unique(t)) == {0.0, 1.0}
        else:
            assert t.shape == (n,) and t.dtype == np.uint8
            assert t.max() == 9


def test_mnist_label_counts_and_values():
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=False)
    train_counts = np.bincount(t_train, minlength=10)
    assert train_counts.sum() == 60000 and np.all((5000 <= train_counts) & (train_counts <= 7000))
    test_counts = np.bincount(t_test, minlength=10)
    assert np.all((800 <= test_counts) & (test_counts <= 1200))
    assert t_train[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first training labels
    (xn, _), _ = load_mnist(normalize=True)
    assert np.array_equal(xn, x_train.astype(np.float32) / 255.0)
    (_, oh), _ = load_mnist(one_hot_label=True)
    assert np.array_equal(oh.argmax(axis=1), t_train)


def test_load_returns_fresh_copies():
    (x1, t1), _ = load_mnist(normalize=False)
    x1[:] = 7
    t1[:] = 3
    (x2, t2), _ = load_mnist(normalize=False)
    assert x2.max() == 255 and t2[0] == 5


def test_offline_still_loads_bundled_mnist(monkeypatch):
    monkeypatch.setenv("XPNET_OFFLINE", "1")
    _forbid_network(monkeypatch)
    (x, t), _ = load_mnist()
    assert x.shape == (60000, 784)


def test_datasets_does_not_import_the_backend():
    code = ("import sys, xpnet.datasets; "
            "bad = [m for m in sys.modules if m.startswith('xpnet.') "
            "and not m.startswith('xpnet.datasets')] + "
            "[m for m in ('cupy',) if m in sys.modules]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --------------------------------------------------------------------------- checksums


def test_verify_checksums_accepts_any_recorded_digest():
    spec = FileSpec("f.gz", raw_md5="r" * 32, gz_md5=("m" * 32,), gz_sha256=("s" * 64,))
    verify_checksums("p", spec, sha256="s" * 64, md5="x", raw_md5=None)
    verify_checksums("p", spec, sha256="x", md5="m" * 32, raw_md5=None)
    verify_checksums("p", spec, sha256="x", md5="y", raw_md5=lambda: "r" * 32)
    with pytest.raises(DatasetCorruptError, match="checksum mismatch") as err:
        verify_checksums("/some/path", spec, sha256="x", md5="y", raw_md5=lambda: "z")
    assert "/some/path" in str(err.value) and "s" * 64 in str(err.value)


def _mnist_dir_with_test_labels(tmp_path: Path, labels_file: str, data: bytes) -> Path:
    """A data_dir linking the bundled files except t10k labels, which get ``data``."""
    d = tmp_path / "mnist"
    d.mkdir()
    for name in NAMES[:3]:
        (d / name).symlink_to(BUNDLED / name)
    (d / labels_file).write_bytes(data)
    return d


def test_uncompressed_copy_accepted_by_raw_md5(tmp_path):
    raw = gzip.decompress((BUNDLED / NAMES[3]).read_bytes())
    d = _mnist_dir_with_test_labels(tmp_path, "t10k-labels-idx1-ubyte", raw)
    _, (_, t_test) = load_mnist(data_dir=d)
    assert np.array_equal(t_test, np.frombuffer(raw, np.uint8, offset=8))


def test_wrong_data_with_valid_structure_rejected_by_checksum(tmp_path):
    raw = bytearray(gzip.decompress((BUNDLED / NAMES[3]).read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # still a valid label file
    bad = _mnist_dir_with_test_labels(tmp_path, NAMES[3], gz(bytes(raw)))
    with pytest.raises(DatasetCorruptError, match="checksum mismatch") as err:
        load_mnist(data_dir=bad)
    assert str(bad / NAMES[3]) in str(err.value)
    assert mnist.MNIST.test_labels.raw_md5 in str(err.value)


# --------------------------------------------------------------------------- IDX parser


def _corrupt_cases():
    good_images = images_idx(5)
    good_gz = gz(good_images)
    crc_broken = bytearray(good_gz)
    crc_broken[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    return {
        "truncated-gzip": (good_gz[:-20], "images", "gzip"),
        "bad-crc": (bytes(crc_broken), "images", "CRC"),
        "short-data": (good_images[:-100], "images", "truncated"),
        "header-count-too-big": (images_idx(5, count=6), "images", "truncated"),
        "trailing-bytes": (images_idx(5, count=4), "images", "trailing"),
        "short-header": (good_images[:10], "images", "header"),
        "wrong-magic": (images_idx(5, magic=2049), "images", "magic"),
        "labels-as-images": (labels_idx(5), "images", "magic"),
        "wrong-size": (images_idx(5, rows=27), "images", "27x28"),
        "bad-label": (labels_idx(5, values=np.array([1, 2, 10, 3, 4])), "labels", "range"),
        "label-count": (labels_idx(5, count=7), "labels", "truncated"),
        "labels-wrong-magic": (labels_idx(5, magic=2051), "labels", "magic"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_idx_rejects_corrupt_files_naming_the_path(tmp_path, case):
    data, kind, words = _corrupt_cases()[case]
    path = tmp_path / f"{case}.idx"
    path.write_bytes(data)
    reader = idx.read_images if kind == "images" else idx.read_labels
    with pytest.raises(DatasetCorruptError, match=words) as err:
        reader(path)
    assert str(path) in str(err.value) and err.value.path == str(path)


def test_idx_reads_gzip_and_raw_alike(tmp_path):
    data = images_idx(4, seed=3)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "a.gz").write_bytes(gz(data))
    a, b = idx.read_images(tmp_path / "a"), idx.read_images(tmp_path / "a.gz")
    assert a.shape == (4, 28, 28) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not a.flags.writeable
    labels = idx.read_labels(_write(tmp_path / "l", labels_idx(4, values=[9, 0, 1, 2])))
    assert labels.tolist() == [9, 0, 1, 2]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_loader_rejects_image_label_count_mismatch(tmp_path, use_spec):
    files = synthetic_files()
    files[NAMES[3]] = gz(labels_idx(9))  # 10 test images, 9 labels
    use_spec(synthetic_spec(files))
    d = write_files(tmp_path / "d", files)
    with pytest.raises(DatasetCorruptError, match="9 labels") as err:
        load_mnist(data_dir=d)
    assert str(d / NAMES[3]) in str(err.value)


def test_loader_rejects_unexpected_sample_count(tmp_path, use_spec):
    files = synthetic_files(n_train=30)
    use_spec(synthetic_spec(files, n_train=31))
    with pytest.raises(DatasetCorruptError, match="training set has 31"):
        load_mnist(data_dir=write_files(tmp_path / "d", files))


# --------------------------------------------------------------------------- look-up order


def test_lookup_order(tmp_path, monkeypatch):
    files = synthetic_files()
    explicit = write_files(tmp_path / "explicit", files)
    env_root = tmp_path / "env"
    write_files(env_root / "mnist", files)
    bundled = write_files(tmp_path / "bundled", files)
    system = write_files(tmp_path / "system", files)
    spec = synthetic_spec(files, bundled_dir=bundled, system_dirs=(system,))
    cache = write_files(cache_dir(), files)
    monkeypatch.setenv("XPNET_DATA", str(env_root))

    assert fetch.locate(spec, explicit).source == explicit
    assert fetch.locate(spec).source == env_root / "mnist"
    monkeypatch.delenv("XPNET_DATA")
    assert fetch.locate(spec).source == bundled
    spec = dataclasses.replace(spec, bundled_dir=None)
    assert fetch.locate(spec).source == cache
    (cache / NAMES[0]).unlink()  # an incomplete directory is skipped
    assert fetch.locate(spec).source == system
    assert fetch.locate(dataclasses.replace(spec, system_dirs=())) is None


def test_default_search_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XPNET_DATA", str(tmp_path / "env"))
    cache = paths.cache_root()
    assert fetch.search_dirs(mnist.MNIST, tmp_path / "mine") == [
        tmp_path / "mine", tmp_path / "env" / "mnist", BUNDLED, cache / "mnist"]
    assert fetch.search_dirs(mnist.FASHION_MNIST) == [
        tmp_path / "env" / "fashion-mnist", cache / "fashion-mnist",
        Path("/usr/share/datasets/fashion-mnist")]


def test_cache_root_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert paths.dataset_cache_dir("mnist") == tmp_path / "c" / "xpnet" / "mnist"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "xpnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "xpnet"


def test_explicit_dir_beats_env_beats_cache_end_to_end(tmp_path, monkeypatch, use_spec):
    a, b, c = synthetic_files(seed=1), synthetic_files(seed=2), synthetic_files(seed=3)
    use_spec(synthetic_spec(a, b, c))
    dir_a = write_files(tmp_path / "a", a)
    write_files(tmp_path / "env" / "mnist", b)
    write_files(cache_dir(), c)
    monkeypatch.setenv("XPNET_DATA", str(tmp_path / "env"))
    (_, t), _ = load_mnist(data_dir=dir_a)
    assert np.array_equal(t, decoded(a)[0][1])
    (_, t), _ = load_mnist()
    assert np.array_equal(t, decoded(b)[0][1])
    monkeypatch.delenv("XPNET_DATA")
    (x, t), (x_test, t_test) = load_mnist(normalize=False, flatten=False)
    (ex, et), (ex_test, et_test) = decoded(c)
    assert np.array_equal(x[:, 0], ex) and np.array_equal(t, et)
    assert np.array_equal(x_test[:, 0], ex_test) and np.array_equal(t_test, et_test)


def test_incomplete_explicit_dir_warns_and_falls_back(tmp_path, use_spec):
    files = synthetic_files()
    use_spec(synthetic_spec(files))
    write_files(cache_dir(), files)
    partial = write_files(tmp_path / "partial", {NAMES[0]: files[NAMES[0]]})
    with pytest.warns(UserWarning, match="does not hold"):
        (_, t), _ = load_mnist(data_dir=partial)
    assert np.array_equal(t, decoded(files)[0][1])


def test_fashion_mnist_loads_from_xpnet_data(tmp_path, monkeypatch, use_spec):
    files = synthetic_files(seed=5)
    use_spec(synthetic_spec(files, name="fashion-mnist", title="Fashion-MNIST"))
    write_files(tmp_path / "env" / "fashion-mnist", files)
    monkeypatch.setenv("XPNET_DATA", str(tmp_path / "env"))
    (x, t), (x_test, t_test) = load_fashion_mnist(flatten=False, one_hot_label=True)
    assert x.shape == (30, 1, 28, 28) and x.dtype == np.float32 and t.shape == (30, 10)
    assert np.array_equal(t.argmax(1), decoded(files)[0][1])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.setenv("XPNET_OFFLINE", "1")
    (x, t), (x_test, t_test) = load_fashion_mnist(normalize=False)
    assert x.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert np.array_equal(np.bincount(t), np.full(10, 6000))


# --------------------------------------------------------------------------- downloads


def _cache_listing() -> list[str]:
    d = cache_dir()
    return sorted(os.listdir(d)) if d.exists() else []


def test_download_good_files_land_in_cache(server, use_spec):
    files = synthetic_files()
    use_spec(synthetic_spec(files, mirrors=(serve(server, "good", files),)))
    (x, t), (x_test, t_test) = load_mnist(normalize=False, flatten=False)
    assert _cache_listing() == sorted(NAMES)
    for name, data in files.items():
        assert sha256((cache_dir() / name).read_bytes()) == sha256(data)
    assert np.array_equal(t_test, decoded(files)[1][1])
    assert len(server.hits) == 4
    load_mnist()  # served from the cache: no new request
    assert len(server.hits) == 4


def test_download_only_missing_files(server, use_spec):
    files = synthetic_files()
    write_files(cache_dir(), {n: files[n] for n in NAMES[:2]})
    use_spec(synthetic_spec(files, mirrors=(serve(server, "good", files),)))
    load_mnist()
    assert sorted(server.hits) == sorted(f"/good/{n}" for n in NAMES[2:])
    assert _cache_listing() == sorted(NAMES)


def test_download_wrong_file_rejected_and_nothing_left(server, use_spec):
    files = synthetic_files()
    wrong = synthetic_files(seed=9)
    use_spec(synthetic_spec(files, mirrors=(serve(server, "bad", wrong),)))
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch") as err:
        load_mnist()
    assert f"{server.url}/bad/" in str(err.value)
    assert _cache_listing() == []


def test_download_forbidden_mirror_then_good_one(server, use_spec):
    files = synthetic_files()
    mirrors = (serve(server, "forbidden", files, status=403), serve(server, "good", files))
    use_spec(synthetic_spec(files, mirrors=mirrors))
    (_, t), _ = load_mnist()
    assert np.array_equal(t, decoded(files)[0][1])
    assert server.hits[:2] == [f"/forbidden/{NAMES[0]}", f"/good/{NAMES[0]}"]
    assert _cache_listing() == sorted(NAMES)


def test_download_cut_mid_body_rejected_and_nothing_left(server, use_spec):
    files = synthetic_files()
    use_spec(synthetic_spec(files, mirrors=(serve(server, "cut", files, mode="cut"),)))
    # The server hangs up at once, so the default 30 s socket timeout costs nothing;
    # a 5 s one could expire first on a starved machine (this test failed once,
    # unexplained, under load average 5).
    with pytest.raises(DatasetNotFoundError, match="connection closed after") as err:
        fetch.ensure_files(mnist.DATASETS["mnist"])
    assert "403" not in str(err.value)
    assert _cache_listing() == []


def test_download_all_mirrors_fail_lists_each(server, use_spec):
    files = synthetic_files()
    mirrors = (serve(server, "forbidden", files, status=403), f"{server.url}/missing/")
    use_spec(synthetic_spec(files, mirrors=mirrors))
    with pytest.raises(DatasetNotFoundError) as err:
        load_mnist()
    assert "403" in str(err.value) and "404" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert _cache_listing() == []


def test_download_refuses_other_schemes(tmp_path):
    source = write_files(tmp_path / "src", synthetic_files())
    fspec = FileSpec(NAMES[0], gz_sha256=(sha256((source / NAMES[0]).read_bytes()),))
    with pytest.raises(DatasetNotFoundError, match="unsupported URL scheme"):
        fetch.download_file(fspec, [source.as_uri() + "/"], tmp_path / "dest")
    assert os.listdir(tmp_path / "dest") == []


def _forbid_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network used while XPNET_OFFLINE=1")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "build_opener", no_network)


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_opens_no_socket_and_names_files(monkeypatch, use_spec, server, value):
    files = synthetic_files()
    spec = use_spec(synthetic_spec(files, mirrors=(serve(server, "good", files),)))
    monkeypatch.setenv("XPNET_OFFLINE", value)
    _forbid_network(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as err:
        load_mnist()
    message = str(err.value)
    for fspec in spec.files:
        assert fspec.filename in message and fspec.gz_sha256[0] in message
    assert str(cache_dir()) in message and "XPNET_DATA" in message
    assert err.value.missing == NAMES
    assert server.hits == []


def test_offline_fashion_error_names_md5s(monkeypatch, use_spec):
    use_spec(dataclasses.replace(mnist.FASHION_MNIST, system_dirs=()))
    monkeypatch.setenv("XPNET_OFFLINE", "1")
    _forbid_network(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as err:
        load_fashion_mnist()
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in str(err.value)
    assert "fashion-mnist" in str(err.value)


# --------------------------------------------------------------------------- .npy cache


def test_npy_cache_used_and_self_checking(tmp_path, monkeypatch, use_spec):
    files = synthetic_files()
    use_spec(synthetic_spec(files))
    d = write_files(tmp_path / "d", files)
    first = load_mnist(normalize=False, data_dir=d)
    entries = sorted(npycache.cache_dir().glob("*.npy"))
    assert len(entries) == 4

    mnist.clear_memory_cache()
    real_decompress = mnist.decompress

    def no_gunzip(*args):
        raise AssertionError("parsed again although the .npy cache holds the arrays")

    monkeypatch.setattr(mnist, "decompress", no_gunzip)
    second = load_mnist(normalize=False, data_dir=d)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    # a damaged entry, and an entry holding a pickle, are ignored and rewritten
    victim = max(entries, key=lambda p: p.stat().st_size)
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0xFF
    victim.write_bytes(bytes(blob))
    pickled = min(entries, key=lambda p: p.stat().st_size)
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    mnist.clear_memory_cache()
    monkeypatch.setattr(mnist, "decompress", real_decompress)
    third = load_mnist(normalize=False, data_dir=d)
    for a, b in zip(first, third, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for entry in entries:  # both rewritten as plain arrays
        assert np.load(entry, allow_pickle=False).dtype == np.uint8


def test_npy_cache_does_not_bypass_checksums(tmp_path, use_spec):
    files = synthetic_files()
    use_spec(synthetic_spec(files))
    d = write_files(tmp_path / "d", files)
    load_mnist(data_dir=d)
    mnist.clear_memory_cache()
    use_spec(synthetic_spec(synthetic_files(seed=4)))  # now d's files are the wrong ones
    with pytest.raises(DatasetCorruptError, match="checksum mismatch"):
        load_mnist(data_dir=d)


def test_npy_cache_can_be_turned_off(tmp_path, monkeypatch, use_spec):
    monkeypatch.setenv("XPNET_NPY_CACHE", "0")
    files = synthetic_files()
    use_spec(synthetic_spec(files))
    load_mnist(data_dir=write_files(tmp_path / "d", files))
    assert not npycache.cache_dir().exists()


# --------------------------------------------------------------------------- shuffle / split


def test_shuffle_dataset_keeps_pairs():
    x = np.arange(50).reshape(25, 2)
    t = np.arange(25)
    xs, ts = shuffle_dataset(x, t, seed=0)
    assert np.array_equal(xs[:, 0] // 2, ts)
    assert sorted(ts.tolist()) == list(range(25)) and not np.array_equal(ts, t)
    assert np.array_equal(t, np.arange(25))  # inputs untouched
    xs2, ts2 = shuffle_dataset(x, t, seed=0)
    assert np.array_equal(xs, xs2) and np.array_equal(ts, ts2)
    xs[:] = -1
    assert x.min() == 0  # copies
    x4 = np.zeros((25, 1, 2, 2))
    assert shuffle_dataset(x4, t, seed=np.random.default_rng(1))[0].shape == x4.shape


def test_shuffle_dataset_errors():
    with pytest.raises(ValueError, match="disagree"):
        shuffle_dataset(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="one sample per row"):
        shuffle_dataset(np.float32(1), np.zeros(1))
    with pytest.raises(ValueError, match="seed"):
        shuffle_dataset(np.zeros(3), np.zeros(3), seed=-1)


def test_train_val_split():
    x = np.arange(200).reshape(100, 2)
    t = np.arange(100)
    (xt, tt), (xv, tv) = train_val_split(x, t, val_ratio=0.2, seed=3)
    assert xt.shape == (80, 2) and xv.shape == (20, 2) and tt.shape == (80,) and tv.shape == (20,)
    assert sorted(np.concatenate([tt, tv]).tolist()) == list(range(100))
    assert np.array_equal(xt[:, 0] // 2, tt) and np.array_equal(xv[:, 0] // 2, tv)
    again = train_val_split(x, t, val_ratio=0.2, seed=3)
    assert np.array_equal(again[1][1], tv)
    (xt, tt), (xv, tv) = train_val_split(x, t, val_ratio=0.3, shuffle=False)
    assert tv.tolist() == list(range(30)) and tt.tolist() == list(range(30, 100))
    xv[:] = -1
    assert x.min() == 0


@pytest.mark.parametrize("ratio, error", [
    (0.0, ValueError), (1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
    (True, TypeError), ("0.2", TypeError), (0.001, ValueError),
])
def test_train_val_split_rejects_bad_ratio(ratio, error):
    with pytest.raises(error, match="val_ratio"):
        train_val_split(np.zeros((10, 2)), np.zeros(10), val_ratio=ratio)


def test_train_val_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="disagree"):
        train_val_split(np.zeros((10, 2)), np.zeros(9))
