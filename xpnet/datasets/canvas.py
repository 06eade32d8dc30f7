"""Canvases of several MNIST digits, for segmentation, detection and captioning demos.

These are **synthetic data built from MNIST digits**, not a real detection or segmentation
data set: each canvas is a black square onto which 1 to ``max_digits`` handwritten MNIST
digits are pasted at random positions and scales.  The labels follow from the construction:

* ``masks``: per pixel, 0 for background or ``1 + digit`` where that digit's ink is above
  ``ink_threshold`` (where two digits' ink meets, the brighter one owns the pixel);
* ``boxes``: the tight box ``(x0, y0, x1, y1)`` of each digit's ink above the threshold, in
  pixels, half-open (``x1``/``y1`` one past the last ink column/row), with ``labels``;
* ``captions``: the digits' English words from left to right (by box centre),
  e.g. ``"three one four"``, and the same as token ids over :data:`VOCAB`.

The train split pastes MNIST's 60,000 training digits, the test split its 10,000 test
digits, so no test digit is ever seen in training.  Everything is a deterministic function
of the arguments: canvases are made in blocks of :data:`BLOCK`, each from its own seeded
generator, so the first ``n`` canvases of a larger request are the same ``n`` canvases.
Generated sets are cached as ``.npz`` in ``<cache_root>/canvas`` (read with
``allow_pickle=False``, checked on load, written atomically; off with ``cache=False`` or
``XPNET_NPY_CACHE=0``, like :mod:`~xpnet.datasets.npycache`).

Pixel values are multiples of 1/255 (as MNIST's own), which lets the cache hold the images
as uint8 and return exactly the arrays a fresh generation gives.

>>> d = load_digit_canvases("train", n=100, seed=0)
>>> d["images"].shape, d["masks"].shape, d["boxes"].shape, d["tokens"].shape
((100, 1, 64, 64), (100, 64, 64), (100, 4, 4), (100, 6))
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import npycache
from .mnist import load_mnist
from .paths import cache_root

__all__ = [
    "BLOCK",
    "DIGIT_WORDS",
    "END_ID",
    "PAD_ID",
    "START_ID",
    "VOCAB",
    "caption_of",
    "decode_caption",
    "encode_caption",
    "load_digit_canvases",
    "resize_bilinear",
]

#: English words of the digits 0..9.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The caption vocabulary: token id -> word.  A digit d has id ``3 + d``.
VOCAB = ("<pad>", "<start>", "<end>", *DIGIT_WORDS)
PAD_ID, START_ID, END_ID = 0, 1, 2
_WORD_IDS = {w: i for i, w in enumerate(VOCAB)}

#: Canvases are generated in blocks of this many, one seeded generator per block.
BLOCK = 500
#: Candidate positions tried per digit before the digit is left out (see ``_place``).
CANDIDATES = 64
#: Bumped whenever the generation changes, so that old cache entries are not used.
FORMAT_VERSION = 1
_SPLITS = {"train": 0, "test": 1}
_KEYS = ("images_u8", "masks", "boxes", "labels", "counts", "tokens", "captions",
         "source_index", "frames", "params")


# --------------------------------------------------------------------------- vocabulary


def caption_of(digits: Sequence[int]) -> str:
    """The caption of digits already in left-to-right order: ``[3, 1, 4]`` -> 'three one four'."""
    return " ".join(DIGIT_WORDS[int(d)] for d in digits)


def encode_caption(caption: str | Sequence[str], length: int | None = None) -> np.ndarray:
    """Token ids ``[<start>, words..., <end>]`` (int32), padded with ``<pad>`` to ``length``.

    ``caption`` is a string of words separated by spaces or a sequence of words; an unknown
    word, or a ``length`` too short for the tokens, raises ValueError.
    """
    words = caption.split() if isinstance(caption, str) else list(caption)
    unknown = [w for w in words if w not in _WORD_IDS or _WORD_IDS[w] < 3]
    if unknown:
        raise ValueError(f"encode_caption: not digit words of the vocabulary: {unknown}")
    ids = [START_ID, *(_WORD_IDS[w] for w in words), END_ID]
    if length is None:
        length = len(ids)
    if length < len(ids):
        raise ValueError(f"encode_caption: {len(ids)} tokens do not fit in length {length}")
    out = np.full(length, PAD_ID, dtype=np.int32)
    out[: len(ids)] = ids
    return out


def decode_caption(tokens: npt.ArrayLike) -> str:
    """The words of a token sequence, up to the first ``<end>``; ``<start>``/``<pad>`` skipped.

    Works on a generated sequence (which may lack ``<start>`` or ``<end>``); an id outside
    the vocabulary raises ValueError.
    """
    words = []
    for t in np.asarray(tokens).reshape(-1).tolist():
        if not 0 <= t < len(VOCAB):
            raise ValueError(f"decode_caption: token id {t} is outside 0..{len(VOCAB) - 1}")
        if t == END_ID:
            break
        if t >= 3:
            words.append(VOCAB[t])
    return " ".join(words)


# --------------------------------------------------------------------------- resizing


def _resize_matrix(out: int, inp: int) -> np.ndarray:
    """(out, inp) float32 matrix of bilinear weights (half-pixel centres, edges clamped)."""
    pos = np.clip((np.arange(out) + 0.5) * (inp / out) - 0.5, 0, inp - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, inp - 1)
    w = pos - lo
    m = np.zeros((out, inp), dtype=np.float64)
    rows = np.arange(out)
    np.add.at(m, (rows, lo), 1 - w)
    np.add.at(m, (rows, hi), w)
    return m.astype(np.float32)


def resize_bilinear(images: npt.ArrayLike, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes of ``images`` (..., h, w) to (..., height, width).

    Two matrix products per call (rows, then columns), so a whole batch of images of one
    size is resized at once; float32 out.  Half-pixel centres as in most image libraries;
    no anti-aliasing, so shrink by no more than about 2x.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim < 2 or height < 1 or width < 1:
        raise ValueError(f"resize_bilinear: need (..., h, w) and a positive size, "
                         f"got shape {x.shape} -> ({height}, {width})")
    ry = _resize_matrix(height, x.shape[-2])
    rx = _resize_matrix(width, x.shape[-1])
    return (ry @ x) @ rx.T


# --------------------------------------------------------------------------- generation


def _check(split: str, n: int, size: int, min_digits: int, max_digits: int, seed: int,
           scale_range: tuple[int, int], max_iou: float, min_gap: int,
           ink_threshold: float) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    lo, hi = scale_range
    checks = [
        (isinstance(n, (int, np.integer)) and n >= 1, f"n must be a positive int, not {n!r}"),
        (isinstance(seed, (int, np.integer)) and seed >= 0,
         f"seed must be a non-negative int, not {seed!r}"),
        (1 <= min_digits <= max_digits,
         f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}"),
        (8 <= lo <= hi <= size,
         f"need 8 <= scale_range[0] <= scale_range[1] <= size, got {scale_range}, {size}"),
        (0.0 <= max_iou <= 1.0, f"max_iou must be in [0, 1], not {max_iou}"),
        (min_gap >= 0, f"min_gap must be >= 0, not {min_gap}"),
        (0.0 <= ink_threshold < 1.0, f"ink_threshold must be in [0, 1), not {ink_threshold}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"load_digit_canvases: {message}")


def _ink_boxes(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight half-open boxes (c0, r0, c1, r1) of boolean images (M, h, w), and has-ink flags."""
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    h, w = ink.shape[1:]
    r0, r1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    c0, c1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    return np.stack([c0, r0, c1, r1], axis=1), rows.any(axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of half-open boxes (..., 4), broadcast against each other."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1)


def _place(u: np.ndarray, scale: np.ndarray, offsets: np.ndarray, active: np.ndarray,
           size: int, max_iou: float, min_gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the digit frames, one slot at a time, vectorised over canvases.

    u: (B, J, C, 2) uniforms giving C candidate positions per slot; scale: (B, J) frame
    sizes; offsets: (B, J, 4) ink boxes inside the frames; active: (B, J) slots to fill.
    A candidate is accepted when its ink box overlaps every earlier digit's by at most
    ``max_iou`` and its centre is at least ``min_gap`` px left or right of theirs (so that
    "left to right" is never ambiguous); the first accepted candidate wins, and a slot
    with none stays empty.  Returns frame corners (B, J, 2) as (x, y), ink boxes on the
    canvas (B, J, 4) and the placed flags (B, J).
    """
    b, slots = scale.shape
    corners = np.zeros((b, slots, 2), dtype=np.int64)
    boxes = np.zeros((b, slots, 4), dtype=np.int64)
    placed = np.zeros((b, slots), dtype=bool)
    rows = np.arange(b)
    for j in range(slots):
        room = (size - scale[:, j] + 1)[:, None, None]
        xy = (u[:, j] * room).astype(np.int64)  # (B, C, 2), each in [0, size - s]
        cand = offsets[:, j, None, :] + np.concatenate([xy, xy], axis=-1)  # (B, C, 4)
        ok = np.ones(cand.shape[:2], dtype=bool)
        if j:
            prev, prev_on = boxes[:, None, :j], placed[:, None, :j]  # (B, 1, j, ...)
            c = cand[:, :, None, :]
            clear = _iou(c, prev) <= max_iou
            gap = np.abs((c[..., 0] + c[..., 2]) - (prev[..., 0] + prev[..., 2]))
            clear &= gap >= 2 * min_gap  # twice the centre distance, in integers
            ok = (clear | ~prev_on).all(axis=2)
        first = ok.argmax(axis=1)
        placed[:, j] = active[:, j] & ok[rows, first]
        corners[:, j] = xy[rows, first]
        boxes[:, j] = cand[rows, first]
    return corners, boxes, placed


def _block(rng: np.random.Generator, digits: np.ndarray, digit_labels: np.ndarray,
           b: int, size: int, min_digits: int, max_digits: int, scale_range: tuple[int, int],
           max_iou: float, min_gap: int, ink_level: float) -> dict[str, np.ndarray]:
    """``b`` canvases from one generator (every draw has a fixed shape: see BLOCK)."""
    slots, smax = max_digits, scale_range[1]
    count = rng.integers(min_digits, max_digits + 1, size=b)
    source = rng.integers(0, len(digits), size=(b, slots))
    scale = rng.integers(scale_range[0], smax + 1, size=(b, slots))
    u = rng.random((b, slots, CANDIDATES, 2))

    # Every frame resized at once per scale, into the corner of a (smax, smax) patch.
    patches = np.zeros((b * slots, smax, smax), dtype=np.uint8)
    flat_src, flat_scale = source.reshape(-1), scale.reshape(-1)
    for s in np.unique(flat_scale):
        sel = np.flatnonzero(flat_scale == s)
        resized = resize_bilinear(digits[flat_src[sel]], int(s), int(s))
        patches[sel, :s, :s] = np.rint(np.clip(resized, 0, 255))
    ink = patches > ink_level
    offsets, has_ink = _ink_boxes(ink)
    active = (np.arange(slots) < count[:, None]) & has_ink.reshape(b, slots)
    corners, boxes, placed = _place(u, scale, offsets.reshape(b, slots, 4), active, size,
                                    max_iou, min_gap)

    # Paste slot by slot: a canvas holds one digit per slot, so each gather-max-scatter
    # has no repeated index.  The canvas is padded so a whole patch always fits.
    image = np.zeros((b, size + smax, size + smax), dtype=np.uint8)
    mask = np.zeros_like(image)
    grid = np.arange(smax)
    patches = patches.reshape(b, slots, smax, smax)
    labels = digit_labels[source].astype(np.int32)
    for j in range(slots):
        idx = np.flatnonzero(placed[:, j])
        rr = corners[idx, j, 1][:, None, None] + grid[None, :, None]
        cc = corners[idx, j, 0][:, None, None] + grid[None, None, :]
        at = (idx[:, None, None], rr, cc)
        old, new = image[at], patches[idx, j]
        wins = (new > old) & (new > ink_level)  # ties keep the earlier digit
        image[at] = np.maximum(old, new)
        digit = (labels[idx, j] + 1).astype(np.uint8)[:, None, None]
        mask[at] = np.where(wins, digit, mask[at])

    # Left to right by box centre; empty slots last.
    key = np.where(placed, boxes[..., 0] + boxes[..., 2], np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    placed = np.take_along_axis(placed, order, axis=1)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)

    frames = np.concatenate([take(corners), take(scale)[..., None]], axis=-1)
    out_labels = np.where(placed, take(labels), np.int32(-1))
    counts = placed.sum(axis=1)
    tokens = np.full((b, slots + 2), PAD_ID, dtype=np.int32)
    tokens[:, 0] = START_ID
    tokens[:, 1:-1] = np.where(placed, out_labels + 3, PAD_ID)
    tokens[np.arange(b), counts + 1] = END_ID
    return {
        "images_u8": image[:, :size, :size],
        "masks": mask[:, :size, :size],
        "boxes": np.where(placed[..., None], take(boxes), 0).astype(np.int32),
        "labels": out_labels,
        "counts": counts.astype(np.int32),
        "tokens": tokens,
        "source_index": np.where(placed, take(source), -1).astype(np.int32),
        "frames": np.where(placed[..., None], frames, 0).astype(np.int32),
    }


def _generate(split: str, n: int, seed: int, params: dict[str, Any]) -> dict[str, np.ndarray]:
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=False, flatten=False)
    digits, digit_labels = (x_train, t_train) if split == "train" else (x_test, t_test)
    digits = digits[:, 0]
    blocks = []
    for i in range(-(-n // BLOCK)):
        # Full blocks always, so a canvas does not depend on n (prefixes agree).
        rng = np.random.default_rng([seed, _SPLITS[split], i])
        blocks.append(_block(rng, digits, digit_labels, BLOCK, params["size"],
                             params["min_digits"], params["max_digits"],
                             tuple(params["scale_range"]), params["max_iou"],
                             params["min_gap"], params["ink_threshold"] * 255))
    out = {k: np.concatenate([blk[k] for blk in blocks])[:n] for k in blocks[0]}
    out["captions"] = np.array([caption_of(lab[lab >= 0]) for lab in out["labels"]], dtype=str)
    return out


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where generated canvas sets are kept."""
    return cache_root() / "canvas"


def _cache_path(params: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{params['split']}-n{params['n']}-seed{params['seed']}-{digest}.npz"


def _valid(entry: dict[str, np.ndarray], params: dict[str, Any]) -> bool:
    n, size, slots = params["n"], params["size"], params["max_digits"]
    shapes = {
        "images_u8": ((n, size, size), np.uint8), "masks": ((n, size, size), np.uint8),
        "boxes": ((n, slots, 4), np.int32), "labels": ((n, slots), np.int32),
        "counts": ((n,), np.int32), "tokens": ((n, slots + 2), np.int32),
        "source_index": ((n, slots), np.int32), "frames": ((n, slots, 3), np.int32),
    }
    if any(entry[k].shape != shape or entry[k].dtype != dt for k, (shape, dt) in shapes.items()):
        return False
    return (entry["captions"].shape == (n,) and entry["captions"].dtype.kind == "U"
            and str(entry["params"]) == json.dumps(params, sort_keys=True))


def _load_cached(path: Path, params: dict[str, Any]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            entry = {k: z[k] for k in _KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None  # missing or damaged: made again
    return entry if _valid(entry, params) else None


def _store(path: Path, entry: dict[str, np.ndarray]) -> None:
    """Write atomically (temporary file, then rename); errors are ignored."""
    npycache.write_quietly(path, lambda f: np.savez_compressed(f, **entry))


# --------------------------------------------------------------------------- public API


def load_digit_canvases(
    split: str = "train",
    n: int = 10000,
    size: int = 64,
    max_digits: int = 4,
    seed: int = 0,
    *,
    min_digits: int = 1,
    scale_range: tuple[int, int] = (20, 36),
    max_iou: float = 0.05,
    min_gap: int = 3,
    ink_threshold: float = 0.5,
    cache: bool = True,
) -> dict[str, np.ndarray]:
    """``n`` canvases of MNIST digits with masks, boxes and captions (host NumPy arrays).

    Parameters
    ----------
    split:
        'train' pastes MNIST training digits, 'test' MNIST test digits.
    n, size, seed:
        Number of canvases, their side in pixels, and the seed they follow from.
    min_digits, max_digits:
        Each canvas draws a digit count uniformly in this range.  A digit for which no
        free place is found among :data:`CANDIDATES` random ones is left out (rare with the
        defaults: see ``counts``).
    scale_range:
        Each digit's 28x28 MNIST frame is resized (bilinear) to s x s, s uniform in this
        inclusive range; the ink fills about 70% of the frame.
    max_iou, min_gap:
        A digit's ink box may overlap an earlier digit's by at most this IoU, and its centre
        must lie at least ``min_gap`` px left or right of the other centres.
    ink_threshold:
        A pixel belongs to a digit (mask, box) where the digit's ink exceeds this.
    cache:
        Read and write the ``.npz`` cache (see the module docstring).

    Returns a dict of fresh arrays, with ``J = max_digits`` slots per canvas, filled left to
    right, then padded:

    ==================  ==================  =====================================================
    key                 shape, dtype        meaning
    ==================  ==================  =====================================================
    ``images``          (n, 1, H, W) f32    pixel values in [0, 1], multiples of 1/255
    ``masks``           (n, H, W) uint8     0 background, 1 + digit on the digit's ink
    ``boxes``           (n, J, 4) int32     (x0, y0, x1, y1) half-open ink boxes; 0 as padding
    ``labels``          (n, J) int32        digit of each box; -1 as padding
    ``counts``          (n,) int32          number of digits on the canvas
    ``tokens``          (n, J + 2) int32    <start> words <end> <pad>...; ids into VOCAB
    ``captions``        (n,) str            e.g. 'three one four'
    ``source_index``    (n, J) int32        index of the digit in MNIST's split; -1 padding
    ``frames``          (n, J, 3) int32     (x, y, s): the s x s frame's top-left corner
    ==================  ==================  =====================================================
    """
    _check(split, n, size, min_digits, max_digits, seed, scale_range, max_iou, min_gap,
           ink_threshold)
    params = {"version": FORMAT_VERSION, "split": split, "n": int(n), "size": int(size),
              "min_digits": int(min_digits), "max_digits": int(max_digits), "seed": int(seed),
              "scale_range": [int(v) for v in scale_range], "max_iou": float(max_iou),
              "min_gap": int(min_gap), "ink_threshold": float(ink_threshold),
              "block": BLOCK, "candidates": CANDIDATES}
    use_cache = cache and npycache.enabled()
    path = _cache_path(params)
    entry = _load_cached(path, params) if use_cache else None
    if entry is None:
        entry = _generate(split, int(n), int(seed), params)
        entry["params"] = np.array(json.dumps(params, sort_keys=True))
        if use_cache:
            _store(path, entry)
    out = {k: np.ascontiguousarray(v) for k, v in entry.items() if k not in ("images_u8",
                                                                            "params")}
    images = np.divide(entry["images_u8"], np.float32(255.0), dtype=np.float32)
    return {"images": images[:, None], **out}
