"""xpnet.datasets.canvas: MNIST digit canvases with masks, boxes and captions (host arrays).

The user cache is a tmp_path via XDG_CACHE_HOME, so no test reads or writes the real one.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from xpnet.datasets import canvas, load_mnist
from xpnet.datasets.canvas import (
    END_ID,
    PAD_ID,
    START_ID,
    VOCAB,
    decode_caption,
    encode_caption,
    load_digit_canvases,
    resize_bilinear,
)

N = 60


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("XPNET_NPY_CACHE", raising=False)


@pytest.fixture(scope="module")
def mnist_u8():
    return load_mnist(normalize=False, flatten=False)


@pytest.fixture(scope="module")
def test_set():
    return load_digit_canvases("test", n=400, seed=7, cache=False)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def box_iou(a, b) -> float:
    """IoU of two half-open boxes (x0, y0, x1, y1)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# ------------------------------------------------------------------ shapes, determinism


def test_shapes_dtypes_and_ranges():
    d = load_digit_canvases("train", n=N, size=48, max_digits=3, seed=1,
                            scale_range=(16, 28), cache=False)
    expected = {
        "images": ((N, 1, 48, 48), np.float32), "masks": ((N, 48, 48), np.uint8),
        "boxes": ((N, 3, 4), np.int32), "labels": ((N, 3), np.int32),
        "counts": ((N,), np.int32), "tokens": ((N, 5), np.int32),
        "source_index": ((N, 3), np.int32), "frames": ((N, 3, 3), np.int32),
    }
    for key, (shape, dtype) in expected.items():
        assert d[key].shape == shape and d[key].dtype == dtype, key
    assert d["captions"].shape == (N,) and d["captions"].dtype.kind == "U"
    assert 0.0 <= d["images"].min() and d["images"].max() <= 1.0
    np.testing.assert_array_equal(np.rint(d["images"] * 255) / np.float32(255), d["images"])
    assert d["masks"].max() <= 10
    assert ((1 <= d["counts"]) & (d["counts"] <= 3)).all()
    boxes = d["boxes"][d["labels"] >= 0]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()


def test_same_arguments_same_canvases_and_seed_matters():
    a = load_digit_canvases("train", n=N, seed=3, cache=False)
    b = load_digit_canvases("train", n=N, seed=3, cache=False)
    assert_same(a, b)
    c = load_digit_canvases("train", n=N, seed=4, cache=False)
    assert not np.array_equal(a["images"], c["images"])


def test_a_smaller_request_is_a_prefix_of_a_larger_one():
    small = load_digit_canvases("train", n=canvas.BLOCK + 10, seed=2, cache=False)
    large = load_digit_canvases("train", n=canvas.BLOCK + 40, seed=2, cache=False)
    for k in small:
        np.testing.assert_array_equal(large[k][: len(small[k])], small[k])


def test_every_digit_count_occurs(test_set):
    counts = np.bincount(test_set["counts"], minlength=5)
    assert counts[0] == 0 and (counts[1:] > 40).all(), counts
    np.testing.assert_array_equal(test_set["counts"], (test_set["labels"] >= 0).sum(axis=1))


# ------------------------------------------------------------------ source digits


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_come_from_their_own_split(mnist_u8, split):
    d = load_digit_canvases(split, n=N, seed=5, cache=False)
    (x_train, t_train), (x_test, t_test) = mnist_u8
    own, other = (x_train, x_test) if split == "train" else (x_test, x_train)
    own_t = t_train if split == "train" else t_test
    on = d["labels"] >= 0
    src = d["source_index"]
    assert (src[on] >= 0).all() and (src[on] < len(own)).all() and (src[~on] == -1).all()
    np.testing.assert_array_equal(d["labels"][on], own_t[src[on]])
    canvas_u8 = np.rint(d["images"][:, 0] * 255).astype(np.int64)
    size = canvas_u8.shape[-1]
    layers = np.zeros((N, d["labels"].shape[1], size, size), dtype=np.int64)
    mismatches = 0
    for i, j in zip(*np.nonzero(on), strict=True):
        x, y, s = d["frames"][i, j]
        region = canvas_u8[i, y:y + s, x:x + s]
        patch = np.rint(resize_bilinear(own[src[i, j], 0], s, s)).astype(np.int64)
        layers[i, j, y:y + s, x:x + s] = patch
        assert (region >= patch).all()  # digits are composited by maximum
        if d["counts"][i] == 1:
            np.testing.assert_array_equal(region, patch)
            assert canvas_u8[i].sum() == patch.sum()  # nothing outside the frame
        idx = min(int(src[i, j]), len(other) - 1)
        wrong = np.rint(resize_bilinear(other[idx, 0], s, s)).astype(np.int64)
        mismatches += not (region >= wrong).all()
    assert mismatches > 0.9 * on.sum()  # the other split's digit does not fit the canvas
    np.testing.assert_array_equal(layers.max(axis=1), canvas_u8)
    # Where inks meet, the brightest digit owns the pixel (ties: either of them).
    owner_ink = np.zeros_like(canvas_u8)
    for j in range(layers.shape[1]):
        mine = d["masks"] == (d["labels"][:, j, None, None] + 1)
        owner_ink = np.maximum(owner_ink, np.where(mine, layers[:, j], 0))
    labelled = d["masks"] > 0
    np.testing.assert_array_equal(owner_ink[labelled], canvas_u8[labelled])


# ------------------------------------------------------------------ masks and boxes


def test_masks_agree_with_images_and_boxes(test_set):
    d = test_set
    np.testing.assert_array_equal(d["masks"] > 0, d["images"][:, 0] > 0.5)
    for i in range(len(d["counts"])):
        k = d["counts"][i]
        boxes, labels = d["boxes"][i, :k], d["labels"][i, :k]
        mask = d["masks"][i]
        for label in np.unique(mask[mask > 0]):
            ys, xs = np.nonzero(mask == label)
            inside = np.zeros(len(ys), dtype=bool)
            for (x0, y0, x1, y1) in boxes[labels == label - 1]:
                inside |= (x0 <= xs) & (xs < x1) & (y0 <= ys) & (ys < y1)
            assert inside.all(), (i, label)
        for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True):
            assert (mask[y0:y1, x0:x1] == label + 1).any(), (i, label)
        if k == 1:  # a lone digit's box is exactly the tight box of its mask
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(
                boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert (d["boxes"][i, k:] == 0).all() and (d["labels"][i, k:] == -1).all()


def test_boxes_overlap_little(test_set):
    worst = 0.0
    for i, k in enumerate(test_set["counts"]):
        b = test_set["boxes"][i, :k].astype(float)
        for p in range(k):
            for q in range(p + 1, k):
                worst = max(worst, box_iou(b[p], b[q]))
    assert worst <= 0.05


# ------------------------------------------------------------------ captions


def test_captions_read_the_digits_left_to_right(test_set):
    d = test_set
    for i, k in enumerate(d["counts"]):
        b = d["boxes"][i, :k]
        centres2 = b[:, 0] + b[:, 2]
        assert (np.diff(centres2) >= 2 * 3).all()  # left to right, min_gap apart
        words = [canvas.DIGIT_WORDS[v] for v in d["labels"][i, :k]]
        assert d["captions"][i] == " ".join(words)
        toks = d["tokens"][i]
        assert toks[0] == START_ID and toks[k + 1] == END_ID and (toks[k + 2:] == PAD_ID).all()
        np.testing.assert_array_equal(toks[1:k + 1], d["labels"][i, :k] + 3)
        assert decode_caption(toks) == d["captions"][i]
        np.testing.assert_array_equal(encode_caption(d["captions"][i], len(toks)), toks)


def test_vocabulary_helpers():
    assert VOCAB[:3] == ("<pad>", "<start>", "<end>") and VOCAB[3 + 7] == "seven"
    ids = encode_caption("three one four", 7)
    np.testing.assert_array_equal(ids, [START_ID, 6, 4, 7, END_ID, PAD_ID, PAD_ID])
    assert ids.dtype == np.int32
    assert decode_caption(ids) == "three one four"
    assert decode_caption([6, 4, END_ID, 9]) == "three one"  # stops at <end>
    assert decode_caption(np.array([[START_ID, 12]])) == "nine"
    assert canvas.caption_of([3, 1, 4]) == "three one four"
    with pytest.raises(ValueError, match="not digit words"):
        encode_caption("three eleven")
    with pytest.raises(ValueError, match="not digit words"):
        encode_caption(["<end>"])
    with pytest.raises(ValueError, match="do not fit"):
        encode_caption("one two", 3)
    with pytest.raises(ValueError, match="outside"):
        decode_caption([len(VOCAB)])


# ------------------------------------------------------------------ cache


def test_cache_hit_returns_identical_arrays(monkeypatch):
    first = load_digit_canvases("test", n=N, seed=9)
    entries = list(canvas.cache_dir().glob("*.npz"))
    assert len(entries) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again despite a cache entry")

    with monkeypatch.context() as m:
        m.setattr(canvas, "_generate", no_generation)
        second = load_digit_canvases("test", n=N, seed=9)
    assert_same(first, second)
    assert_same(first, load_digit_canvases("test", n=N, seed=9, cache=False))
    second["images"][:] = 0  # the caller's copy: the cache is unaffected
    assert_same(first, load_digit_canvases("test", n=N, seed=9))
    load_digit_canvases("test", n=N, seed=10)  # other parameters, other entry
    assert len(list(canvas.cache_dir().glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_entry_is_replaced(damage):
    first = load_digit_canvases("train", n=N, seed=11)
    (entry,) = canvas.cache_dir().glob("*.npz")
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[:1000]
    else:
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(64)
    entry.write_bytes(bytes(data))
    assert_same(first, load_digit_canvases("train", n=N, seed=11))
    assert_same(first, load_digit_canvases("train", n=N, seed=11))  # rewritten


def test_cache_off_writes_nothing(monkeypatch):
    load_digit_canvases("train", n=N, seed=12, cache=False)
    monkeypatch.setenv("XPNET_NPY_CACHE", "0")
    load_digit_canvases("train", n=N, seed=12)
    assert not canvas.cache_dir().exists() or not list(canvas.cache_dir().iterdir())


# ------------------------------------------------------------------ arguments, speed


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "val"}, "split"),
    ({"n": 0}, "n must"),
    ({"seed": -1}, "seed"),
    ({"max_digits": 0}, "min_digits"),
    ({"scale_range": (20, 80)}, "scale_range"),
    ({"max_iou": 1.5}, "max_iou"),
    ({"ink_threshold": 1.0}, "ink_threshold"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digit_canvases(**{"n": 10, "cache": False, **kwargs})


def test_resize_bilinear_keeps_constants_and_shapes():
    x = np.full((2, 3, 28, 28), 0.25, dtype=np.float32)
    y = resize_bilinear(x, 20, 36)
    assert y.shape == (2, 3, 20, 36) and y.dtype == np.float32
    np.testing.assert_allclose(y, 0.25, rtol=1e-6)
    ramp = np.arange(8, dtype=np.float32)[None, :].repeat(4, 0)
    np.testing.assert_allclose(resize_bilinear(ramp, 4, 8), ramp)  # identity size


@pytest.mark.slow
def test_ten_thousand_canvases_take_seconds():
    load_mnist()  # the MNIST files parsed once, outside the timing
    start = time.perf_counter()
    d = load_digit_canvases("train", n=10000, cache=False)
    assert time.perf_counter() - start < 15
    assert d["images"].shape == (10000, 1, 64, 64)
