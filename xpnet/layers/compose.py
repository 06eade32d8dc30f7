"""Layers that hold layers: Chain, Parallel, Identity, and the residual block.

A container is a :class:`~xpnet.layers.base.Layer` like any other (forward, backward,
empty params of its own); its :meth:`children` are what a network walks to find
parameters, buffers and arrays to move.  A residual block as data flows through it::

    Chain(Parallel(Chain(conv, bn, relu, conv, bn), Identity(), merge="add"), ReLU())

forward runs both branches on the same input and adds; backward sends dout down both
and adds their input gradients.  Nothing else needs to know it is a residual block.

A container given a ``name`` scopes the parameter names of what it holds
(``stage2.W1``); an unnamed one is transparent (see :func:`named_slots`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from xpnet.layers.activation import ReLU
from xpnet.layers.base import Array, Layer, expect

__all__ = ["Chain", "Parallel", "Identity", "residual", "backward", "named_slots", "walk"]


def backward(layer: Any, dout: Array, need_input_grad: bool = True) -> Array | None:
    """``layer.backward(dout)``, telling an xpnet layer whether its input gradient is read.

    A duck-typed layer with the book's ``backward(dout)`` is called as the book does.
    """
    if isinstance(layer, Layer):
        return layer.backward(dout, need_input_grad=need_input_grad)
    return layer.backward(dout)


def _check_name(cls: str, name: str | None) -> str | None:
    if name is not None and (not isinstance(name, str) or not name or "." in name):
        raise ValueError(f"{cls}: name must be a non-empty string without '.', got {name!r}")
    return name


class Chain(Layer):
    """Layers applied in order; backward in reverse order."""

    def __init__(self, *layers: Any, name: str | None = None) -> None:
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            missing = [a for a in ("forward", "backward", "params", "grads")
                       if not hasattr(layer, a)]
            if missing:
                raise TypeError(f"Chain: layer {i} ({layer!r}) lacks {', '.join(missing)}")
        self.layers = list(layers)
        self.block_name = _check_name("Chain", name)

    def children(self) -> tuple[Layer, ...]:
        return tuple(self.layers)

    def forward(self, x: Array, train: bool = True) -> Array:
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        for i in range(len(self.layers) - 1, -1, -1):
            dout = backward(self.layers[i], dout, need_input_grad or i > 0)
        return dout

    def __repr__(self) -> str:
        inner = "".join(f"\n  {line}" for layer in self.layers for line in repr(layer).split("\n"))
        label = f"{self.block_name!r}, " if self.block_name else ""
        return f"Chain({label}{inner}\n)" if self.layers else "Chain()"


class Identity(Layer):
    """y = x (the shortcut of a residual block)."""

    def forward(self, x: Array, train: bool = True) -> Array:
        return x

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        return dout if need_input_grad else None


class Parallel(Layer):
    """Branches that all see the same input; outputs added or concatenated on axis 1.

    ``merge="add"`` (a ResNet shortcut) needs branches of equal output shapes;
    ``merge="concat"`` (an Inception block) needs equal shapes but for the channels.
    A mismatch raises at the first forward, naming the block, the branch and both
    shapes.  backward gives each branch its part of dout and sums their input
    gradients.
    """

    def __init__(self, *branches: Any, merge: str = "add", name: str | None = None) -> None:
        super().__init__()
        expect(merge in ("add", "concat"), "Parallel", "merge", "'add' or 'concat'", repr(merge))
        expect(len(branches) >= 1, "Parallel", "number of branches", "at least 1", 0)
        self.branches = list(branches)
        self.merge = merge
        self.block_name = _check_name("Parallel", name)
        self._sizes: list[int] | None = None

    def children(self) -> tuple[Layer, ...]:
        return tuple(self.branches)

    def _label(self) -> str:
        return f"Parallel {self.block_name!r}" if self.block_name else "Parallel"

    def forward(self, x: Array, train: bool = True) -> Array:
        outs = [branch.forward(x, train) for branch in self.branches]
        first = outs[0].shape
        for i, y in enumerate(outs[1:], 1):
            same = y.shape == first if self.merge == "add" else (
                y.ndim == len(first) and y.ndim >= 2 and y.shape[0] == first[0]
                and y.shape[2:] == first[2:])
            if not same:
                verb = "added to" if self.merge == "add" else "concatenated (axis 1) with"
                raise ValueError(f"{self._label()}: branch {i} output shape {tuple(y.shape)} "
                                 f"cannot be {verb} branch 0's {tuple(first)}")
        xp = self._xp(x=x)
        if self.merge == "concat":
            self._sizes = [int(y.shape[1]) for y in outs]
            return xp.concatenate(outs, axis=1)
        if len(outs) == 1:
            return outs[0]
        out = outs[0] + outs[1]
        for y in outs[2:]:
            out += y
        return out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        if self.merge == "concat":
            if self._sizes is None:
                raise RuntimeError(f"{self._label()}.backward called before forward")
            bounds, start = [], 0
            for size in self._sizes:
                bounds.append((start, start + size))
                start += size
            parts = [dout[:, a:b] for a, b in bounds]
        else:
            parts = [dout] * len(self.branches)
        dx = None
        for branch, part in zip(self.branches, parts, strict=True):
            g = backward(branch, part, need_input_grad)
            if need_input_grad and g is not None:
                dx = g if dx is None else dx + g  # never in place: g may be dout itself
        return dx

    def __repr__(self) -> str:
        inner = "".join(f"\n  {line}" for b in self.branches for line in repr(b).split("\n"))
        label = f"{self.block_name!r}, " if self.block_name else ""
        return f"Parallel({label}merge={self.merge!r},{inner}\n)"


def residual(block: Layer, shortcut: Layer | None = None, name: str | None = None) -> Chain:
    """The book's residual block: ReLU(block(x) + shortcut(x)); shortcut defaults to x."""
    return Chain(Parallel(block, Identity() if shortcut is None else shortcut, merge="add"),
                 ReLU(), name=name)


# ------------------------------------------------------------------- the walk
def walk(layer: Any) -> Iterator[Any]:
    """``layer`` and everything it holds, depth first, each instance once."""
    seen: set[int] = set()

    def visit(node: Any) -> Iterator[Any]:
        if id(node) in seen:
            return
        seen.add(id(node))
        yield node
        for child in (node.children() if hasattr(node, "children") else ()):
            yield from visit(child)

    return visit(layer)


def named_slots(root: Any) -> tuple[dict[str, tuple[Any, str]], dict[str, tuple[Any, str]]]:
    """Name every parameter and buffer under ``root``: ``(params, buffers)`` as
    ``{name: (layer, key)}``.

    The rule: layers are visited depth first; a layer's entries are numbered
    ``key + n`` with one counter per key name shared by all kinds of layer, ``n``
    being one more than the highest number any of its keys has had so far.  So
    Affine and Convolution layers give ``W1, b1, W2, b2, ...``, the BatchNormalization
    after the first gives ``gamma1, beta1`` (the book's keys), and a bias-free layer
    with only ``W`` followed by an Affine gives ``W1`` then ``W2, b2``, never two
    ``W1``.  A container with a ``name`` starts its own counters and prefixes what it
    holds with ``name.`` (``stage2.W1``); unnamed containers are transparent.
    A layer instance that appears twice is named once (shared weights).
    """
    params: dict[str, tuple[Any, str]] = {}
    buffers: dict[str, tuple[Any, str]] = {}
    seen: set[int] = set()

    def visit(node: Any, prefix: str, counters: dict[str, int]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        own = {"params": dict(getattr(node, "params", {}) or {}),
               "buffers": dict(getattr(node, "buffers", {}) or {})}
        keys = [*own["params"], *own["buffers"]]
        if keys:
            n = 1 + max(counters.get(k, 0) for k in keys)
            for k in keys:
                counters[k] = n
            for section, table in (("params", params), ("buffers", buffers)):
                for key in own[section]:
                    name = f"{prefix}{key}{n}"
                    if name in params or name in buffers:
                        raise ValueError(f"two entries would be named {name!r}; rename the "
                                         f"parameters of {node!r}")
                    table[name] = (node, key)
        scope = getattr(node, "block_name", None)
        inner_prefix, inner = (f"{prefix}{scope}.", {}) if scope else (prefix, counters)
        for child in (node.children() if hasattr(node, "children") else ()):
            visit(child, inner_prefix, inner)

    visit(root, "", {})
    return params, buffers
