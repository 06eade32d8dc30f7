"""What the digit-canvas examples share: the train / validation / test split, box IoU,
class colours and drawing.

The scripts run as ``python examples/NAME.py`` and import this module as a sibling, like
``_common``.  Canvases come from :func:`xpnet.datasets.load_digit_canvases`: the training
and validation canvases from its ``train`` split (MNIST's training digits), the test
canvases from its ``test`` split (MNIST's test digits, never seen in training).  The
validation canvases are the ones after the first ``n_train`` of the train split, so
settings are chosen on them and the test canvases are only read for the final numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _common import plt
from matplotlib.colors import ListedColormap

from xpnet.datasets import load_digit_canvases

#: the 11 classes of a pixel or a box: background, then the digits 0..9
CLASS_NAMES = ("bg", *(str(d) for d in range(10)))


def canvas_splits(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, dict]:
    """{'train', 'val', 'test'}: canvas dicts (see ``load_digit_canvases``).

    train and val are disjoint canvases of the train split (canvases ``[0, n_train)`` and
    ``[n_train, n_train + n_val)``; they may paste the same MNIST training digit, as any
    two canvases of the split may); test is the first ``n_test`` canvases of the test split.
    """
    both = load_digit_canvases("train", n=n_train + n_val, seed=seed)
    test = load_digit_canvases("test", n=n_test, seed=seed)
    train = {k: v[:n_train] for k, v in both.items()}
    val = {k: v[n_train:] for k, v in both.items()}
    return {"train": train, "val": val, "test": test}


def true_boxes(data: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (k, 4) and digit labels (k,) of canvas ``i`` (padding dropped)."""
    keep = data["labels"][i] >= 0
    return data["boxes"][i][keep], data["labels"][i][keep]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (m, 4): (n, m).

    Boxes are half-open ``(x0, y0, x1, y1)`` in pixels, as the canvases' boxes.
    """
    a = np.asarray(a, dtype=np.float64)[:, None, :]
    b = np.asarray(b, dtype=np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def class_colours() -> np.ndarray:
    """(11, 4) RGBA: black background, then tab10 for the digits 0..9."""
    return np.vstack([[0.0, 0.0, 0.0, 1.0], plt.get_cmap("tab10")(np.arange(10))])


def mask_cmap() -> ListedColormap:
    """A colormap for masks of class ids 0..10 (``imshow(..., vmin=0, vmax=10)``)."""
    return ListedColormap(class_colours())


def bare(ax: Any) -> None:
    """An image axis: no ticks, no grid."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def draw_boxes(ax: Any, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None,
               style: str = "-", text: bool = True) -> None:
    """Half-open pixel boxes on an ``imshow`` axis, coloured by digit, labelled."""
    colours = class_colours()
    for k, (box, lab) in enumerate(zip(boxes, labels, strict=True)):
        x0, y0, x1, y1 = (float(v) for v in box)
        colour = colours[int(lab) + 1]
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor=colour, linewidth=1.2, linestyle=style))
        if text:
            label = str(int(lab)) if scores is None else f"{int(lab)} {scores[k]:.2f}"
            ax.text(x0 - 0.5, y0 - 1.0, label, color=colour, fontsize=7, va="bottom",
                    ha="left", fontweight="bold")
