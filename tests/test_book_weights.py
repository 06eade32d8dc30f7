"""Safe import of the book's pickled weights (xpnet.book_weights)."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import sys
import time
import tomllib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from xpnet import backend
from xpnet.book_weights import (
    ALLOWED_GLOBALS,
    BookPickleError,
    detect_model,
    import_book_params,
    main,
    read_book_pickle,
    to_xpnet,
)
from xpnet.datasets import load_mnist
from xpnet.layers import Dropout
from xpnet.models import DeepConvNet, SimpleConvNet
from xpnet.state import load_state

ROOT = Path(__file__).resolve().parents[1]
BOOK_DIR = Path(__file__).resolve().parents[2] / "shared/data/book-weights"


def _arrays(rng) -> dict[str, np.ndarray]:
    return {
        "W1": rng.standard_normal((16, 1, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(16),
        "W2": np.asfortranarray(rng.standard_normal((7, 5))),  # stored Fortran-ordered
        "b2": rng.standard_normal(5).astype(">f8"),             # big-endian
        "s": np.array(3.25),                                    # 0-d
        "e": np.zeros((0, 4), np.float32),                      # empty
        "n": np.arange(6, dtype=np.int64).reshape(2, 3),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------- round trips
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("container", [dict, OrderedDict])
def test_dict_of_arrays_round_trips_exactly(protocol, container, rng, tmp_path):
    arrays = _arrays(rng)
    data = pickle.dumps(container(arrays), protocol=protocol)
    got = read_book_pickle(_write(tmp_path / "p.pkl", data))
    src = tmp_path / "p.pkl"
    assert type(got) is dict and list(got) == list(arrays)
    plain = pickle.loads(data)  # numpy's own unpickling: the dtypes to expect
    for k, a in arrays.items():
        assert got[k].dtype == plain[k].dtype and got[k].shape == a.shape, k
        np.testing.assert_array_equal(got[k], a)
        np.testing.assert_array_equal(got[k], plain[k], strict=True)
        assert got[k].flags.writeable and got[k].flags.owndata
    shapes = import_book_params(src, tmp_path / "p.npz", model="none", dtype="keep")
    assert shapes == {k: a.shape for k, a in arrays.items()}
    params = load_state(tmp_path / "p.npz").params
    assert set(params) == set(arrays)
    for k, a in arrays.items():
        assert params[k].dtype.newbyteorder("=") == a.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(params[k], a)


def test_import_casts_floats_to_the_default_dtype_only(rng, tmp_path):
    arrays = _arrays(rng)
    src = _write(tmp_path / "p.pkl", pickle.dumps(arrays))
    import_book_params(src, tmp_path / "d.npz", model="none")
    params = load_state(tmp_path / "d.npz").params
    assert backend.get_default_dtype() == np.float32
    assert {k: a.dtype for k, a in params.items()} == {
        k: (np.dtype(np.float32) if a.dtype.kind == "f" else a.dtype) for k, a in arrays.items()}
    import_book_params(src, tmp_path / "64.npz", model="none", dtype="float64")
    assert load_state(tmp_path / "64.npz").params["W1"].dtype == np.float64
    with pytest.raises(ValueError, match="float type or 'keep'"):
        import_book_params(src, tmp_path / "i.npz", dtype="int32")
    with pytest.raises(ValueError, match="destination is the source"):
        import_book_params(src, src)


# --------------------------------------------------------- crafted pickles
def _arg(a) -> bytes:
    if a is None:
        return b"N"
    if isinstance(a, bool):
        return b"\x88" if a else b"\x89"
    if isinstance(a, str):
        raw = a.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(a, list):
        return b"](" + b"".join(map(_arg, a)) + b"e"
    raise TypeError(a)


def _craft(module: str, name: str, *args) -> bytes:
    """Protocol 2: ``{'W1': module.name(*args)}``, the call made while unpickling."""
    return (b"\x80\x02}" + _arg("W1") + b"c" + f"{module}\n{name}\n".encode()
            + b"(" + b"".join(map(_arg, args)) + b"tRs.")


def _touch(path: str) -> np.ndarray:
    Path(path).touch()
    return np.zeros(1)


class _Reduces:
    """An arbitrary class whose ``__reduce__`` names a function with a side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


class _SetsState:
    """An arbitrary class whose unpickling (``__setstate__``) has a side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


def _payloads(tmp_path: Path, marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the global the refusal must name)."""
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    inner = _write(tmp_path / "inner.pkl", _craft("os", "system", touch))
    me = __name__
    return {
        "os.system": (_craft("os", "system", touch), "os.system"),
        "posix.system": (_craft("posix", "system", touch), "posix.system"),
        "builtins.eval": (_craft("builtins", "eval", code), "builtins.eval"),
        "builtins.exec": (_craft("builtins", "exec", code), "builtins.exec"),
        "subprocess.Popen": (_craft("subprocess", "Popen", ["touch", str(marker)]),
                             "subprocess.Popen"),
        # numpy.load of a pickle with allow_pickle=True runs that pickle
        "numpy.load": (_craft("numpy", "load", str(inner), None, True), "numpy.load"),
        # protocol 0's INST opcode: module.name(*args) with the global inline
        "INST os.system": (b"(" + f"V{touch}\nios\nsystem\n".encode() + b".", "os.system"),
        "__reduce__": (pickle.dumps({"W1": _Reduces(marker)}, protocol=2), f"{me}._touch"),
        "__reduce__ p5": (pickle.dumps({"W1": _Reduces(marker)}, protocol=5), f"{me}._touch"),
        "__setstate__": (pickle.dumps({"W1": _SetsState(marker)}, protocol=4),
                         f"{me}._SetsState"),
        # the payload hidden as an item of an object array
        "object array item": (pickle.dumps({"W1": np.array([_Reduces(marker)], dtype=object)}),
                              "numpy.dtype('O8')"),
    }


PAYLOADS = ["os.system", "posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
            "numpy.load", "INST os.system", "__reduce__", "__reduce__ p5", "__setstate__",
            "object array item"]


def _wait_for(marker: Path, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while not marker.exists() and time.monotonic() < end:
        time.sleep(0.02)
    return marker.exists()


@pytest.mark.parametrize("name", PAYLOADS)
def test_crafted_pickle_is_live_under_plain_pickle(name, tmp_path):
    """The payloads really run under pickle.load, so their refusal below means something."""
    marker = tmp_path / "marker"
    data, _ = _payloads(tmp_path, marker)[name]
    out = pickle.loads(data)
    for v in (out.values() if isinstance(out, dict) else ()):
        if isinstance(v, subprocess.Popen):
            v.wait(timeout=10)
    assert _wait_for(marker), name


@pytest.mark.parametrize("name", PAYLOADS)
def test_crafted_pickle_is_refused_before_it_runs(name, tmp_path):
    marker = tmp_path / "marker"
    data, refused = _payloads(tmp_path, marker)[name]
    src = _write(tmp_path / "evil.pkl", data)
    with pytest.raises(BookPickleError) as info:
        read_book_pickle(src)
    assert refused in str(info.value) and str(src) in str(info.value)
    with pytest.raises(BookPickleError):
        import_book_params(src, tmp_path / "out.npz")
    time.sleep(0.1)  # a Popen would have had time to run
    assert not marker.exists()
    assert not (tmp_path / "out.npz").exists()


def test_refusal_names_the_global_as_module_dot_name(tmp_path):
    src = _write(tmp_path / "evil.pkl", _craft("os", "system", "true"))
    with pytest.raises(BookPickleError, match=r"refused global os\.system \(a pickle of "):
        read_book_pickle(src)


@pytest.mark.parametrize("array", [
    np.array([1, 2], dtype=object),
    np.array([None, "x"], dtype=object),
    np.zeros(2, dtype=[("a", "f8"), ("b", "O")]),
], ids=["ints", "mixed", "structured-with-object-field"])
def test_object_dtype_arrays_are_refused(array, tmp_path):
    for protocol in (2, 5):
        src = _write(tmp_path / "o.pkl", pickle.dumps({"W1": array}, protocol=protocol))
        with pytest.raises(BookPickleError, match="object dtype"):
            read_book_pickle(src)


def test_a_build_cannot_change_an_admitted_global(tmp_path):
    # GLOBAL numpy.dtype, then BUILD with {'x': 1}: would set an attribute on a function
    data = b"\x80\x02cnumpy\ndtype\n}" + _arg("x") + b"K\x01sb."
    with pytest.raises(BookPickleError, match="malformed pickle"):
        read_book_pickle(_write(tmp_path / "b.pkl", data))
    assert not hasattr(ALLOWED_GLOBALS["numpy.dtype"], "x")


def test_persistent_ids_are_refused(tmp_path):
    with pytest.raises(BookPickleError, match="refused persistent id"):
        read_book_pickle(_write(tmp_path / "p.pkl", b"\x80\x02Pfoo\n."))


def test_ndarray_cannot_be_called_directly(tmp_path):
    # numpy.ndarray((10**12,)) would allocate; it is only a token for _reconstruct
    data = b"\x80\x02}" + _arg("W1") + b"cnumpy\nndarray\n(J\x00\xca\x9a;\x85tRs."
    with pytest.raises(BookPickleError, match="malformed pickle"):
        read_book_pickle(_write(tmp_path / "n.pkl", data))


@pytest.mark.parametrize("cut", [1, 2, 40, -2, -1])
def test_truncated_pickle_is_a_clear_error(cut, rng, tmp_path):
    data = pickle.dumps(_arrays(rng), protocol=3)
    src = _write(tmp_path / "t.pkl", data[:cut])
    with pytest.raises(BookPickleError, match=r"t\.pkl: truncated pickle"):
        read_book_pickle(src)


@pytest.mark.parametrize("data, message", [
    (b"", "the file is empty"),
    (b"hello world\n", "damaged or not a pickle"),
    (b"PK\x03\x04rest", "zip (.npz) archive, not a pickle"),
    (pickle.dumps([np.zeros(2)]), "expected a dict of NumPy arrays, found a list"),
    (pickle.dumps({}), "holds no arrays"),
    (pickle.dumps({"W1": 1.5, 2: np.zeros(2)}), "'W1' is a float, expected a NumPy array"),
    (pickle.dumps({2: np.zeros(2)}), "key 2 is a int, expected str"),
    (pickle.dumps({"W1": {"nested": np.zeros(2)}}), "'W1' is a dict"),
    (pickle.dumps({"W1": np.array(["a", "b"])}), "dtype <U1, expected a numeric dtype"),
    (pickle.dumps({"W1": np.float64(1.0)}), "refused global numpy._core.multiarray.scalar"),
])
def test_malformed_contents_are_clear_errors(data, message, tmp_path):
    with pytest.raises(BookPickleError, match=None) as info:
        read_book_pickle(_write(tmp_path / "m.pkl", data))
    assert message in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BookPickleError, match="no such file"):
        read_book_pickle(tmp_path / "absent.pkl")
    with pytest.raises(BookPickleError, match="is a directory"):
        read_book_pickle(tmp_path)


# ------------------------------------------------------ the book's networks
def _deep_like(rng) -> dict[str, np.ndarray]:
    net = DeepConvNet(dtype="float64")
    return {k: rng.standard_normal(np.shape(v)) for k, v in net.params.items()}


def test_detect_model_and_conversion(rng):
    deep = _deep_like(rng)
    simple = {k: rng.standard_normal(np.shape(v))
              for k, v in SimpleConvNet(dtype="float64").params.items()}
    assert detect_model(deep) == "deep-convnet"
    assert detect_model(simple) == "simple-convnet"
    # an 8-layer MLP has the same keys but only 2-D weights: no rescaling
    mlp = {**{f"W{i}": np.zeros((3, 3)) for i in range(1, 9)},
           **{f"b{i}": np.zeros(3) for i in range(1, 9)}}
    assert detect_model(mlp) == "none"
    assert detect_model({"W1": np.zeros((1, 1, 3, 3))}) == "none"
    out, note = to_xpnet(deep, "deep-convnet")
    np.testing.assert_array_equal(out["W8"], deep["W8"] * 0.25)
    np.testing.assert_array_equal(out["b8"], deep["b8"] * 0.5)
    assert all(out[k] is deep[k] for k in deep if k not in ("W8", "b8")) and "dropout" in note
    assert to_xpnet(simple, "simple-convnet") == (simple, "")
    with pytest.raises(ValueError, match="model must be one of"):
        to_xpnet(deep, "resnet")


def test_deep_convnet_scores_equal_the_books_inference(rng, tmp_path):
    """xpnet with the imported weights computes what the book's DeepConvNet does at
    inference: its Dropout layers multiply by 1 - ratio there (xpnet's do nothing)."""
    raw = _deep_like(rng)
    src = _write(tmp_path / "deep.pkl", pickle.dumps(raw, protocol=3))
    import_book_params(src, tmp_path / "deep.npz", dtype="float64")
    net = DeepConvNet(dtype="float64")
    net.load_params(tmp_path / "deep.npz")
    x = rng.random((4, 1, 28, 28))

    book = DeepConvNet(dtype="float64")  # the book's forward, on the raw weights
    for k, v in raw.items():
        book.params[k][...] = v
    h = x
    for layer in book.layers:
        h = layer.forward(h, train=False)
        if isinstance(layer, Dropout):
            h = h * (1.0 - layer.dropout_ratio)
    np.testing.assert_allclose(net.predict(x), h, rtol=1e-12, atol=1e-12)


def _book_file(name: str, md5: str) -> Path:
    path = BOOK_DIR / name
    if not path.is_file():
        pytest.skip(f"the book's weights are absent: {path} (see docs/transfer_learning.md)")
    got = hashlib.md5(path.read_bytes()).hexdigest()
    assert got == md5, f"{path}: md5 {got}, the README there records {md5}"
    return path


BOOK_NETS = [
    pytest.param(DeepConvNet, "deep_convnet_params.pkl", "264de587216110d89785733a725459eb",
                 0.9935, id="DeepConvNet"),
    pytest.param(SimpleConvNet, "simple_convnet_params.pkl", "a80b018bc754c0a3a47189e3165f73dd",
                 0.9890, id="SimpleConvNet"),
]


@pytest.mark.parametrize("cls, name, md5, book_accuracy", BOOK_NETS)
def test_book_weights_give_the_books_accuracy(cls, name, md5, book_accuracy, xp, tmp_path):
    src = _book_file(name, md5)
    dst = tmp_path / "imported.npz"
    shapes = import_book_params(src, dst)
    net = cls()
    assert shapes == {k: tuple(v.shape) for k, v in net.params.items()}
    report = net.load_params(dst)
    assert report.missing == [] and report.unexpected == []
    (_, _), (x_test, t_test) = load_mnist(flatten=False, normalize=True)
    acc = net.accuracy(xp.asarray(x_test), xp.asarray(t_test))
    print(f"{cls.__name__} with the book's weights on {xp.__name__}: test accuracy {acc:.4f} "
          f"(book {book_accuracy:.4f})")
    # the book prints 4 digits: allow its rounding (+-0.00005) plus one image either way
    assert abs(acc - book_accuracy) <= 0.00015, acc


# ------------------------------------------------------------ command line
def test_cli_prints_what_it_wrote(rng, tmp_path, capsys):
    src = _write(tmp_path / "p.pkl", pickle.dumps(_deep_like(rng)))
    assert main([str(src), str(tmp_path / "p.npz")]) == 0
    out = capsys.readouterr().out
    assert "model deep-convnet" in out and "W8 * 0.25" in out
    assert "  W1     (16, 1, 3, 3)      float32" in out
    assert out.index("  W1 ") < out.index("  b1 ") < out.index("  W2 ")
    assert set(load_state(tmp_path / "p.npz").params) == {f"{p}{i}" for p in "Wb"
                                                         for i in range(1, 9)}


@pytest.mark.parametrize("make, message", [
    (lambda p: _write(p, _craft("os", "system", "true")), "refused global os.system"),
    (lambda p: p, "no such file"),
    (lambda p: _write(p, pickle.dumps({"W1": np.array(["a"])})), "expected a numeric dtype"),
])
def test_cli_errors_are_one_line_exit_2(make, message, tmp_path, capsys):
    src = make(tmp_path / "in.pkl")
    with pytest.raises(SystemExit) as info:
        main([str(src), str(tmp_path / "out.npz")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("xpnet-import-weights:")
    assert not (tmp_path / "out.npz").exists()


def test_cli_as_a_module_and_the_console_script(rng, tmp_path):
    src = _write(tmp_path / "p.pkl", pickle.dumps({"W1": np.ones((2, 3))}))
    proc = subprocess.run([sys.executable, "-m", "xpnet.book_weights", str(src),
                           str(tmp_path / "p.npz"), "--dtype", "keep"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DL_BACKEND": "numpy"})
    assert proc.returncode == 0, proc.stderr
    assert "W1     (2, 3)             float64" in proc.stdout
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["xpnet-import-weights"] == "xpnet.book_weights:main"
