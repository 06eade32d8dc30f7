"""A network in text: its layer tree with output shapes, parameters and multiply-adds.

Shapes are found by running one sample of zeros through the network in inference
mode (batch-norm statistics and Dropout untouched), recording what each layer
receives and returns, so any layer and any container is covered without knowing
its shape rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from xpnet.backend import get_array_module
from xpnet.backend import xp as active_xp
from xpnet.layers import Affine, Convolution, Deconvolution, TimeAffine
from xpnet.layers.compose import walk

__all__ = ["summary", "forward_flops", "trace"]

Shape = tuple[int, ...]
Calls = dict[int, list[tuple[Shape, Shape]]]


def _input_shape(network: Any, input_shape: Sequence[int] | None) -> Shape:
    shape = input_shape if input_shape is not None else getattr(network, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(network).__name__} has no input_shape; pass the shape of "
                         "one sample, e.g. input_shape=(1, 28, 28)")
    return tuple(int(d) for d in shape)


def trace(network: Any, input_shape: Sequence[int] | None = None) -> Calls:
    """``{id(layer): [(input shape, output shape), ...]}`` for every call of every layer
    under ``network.chain`` in one inference pass of a single sample (shapes without
    the batch axis).  ``input_shape`` defaults to ``network.input_shape``."""
    shape = _input_shape(network, input_shape)
    params = [*network.params.values(), *network.buffers.values()]
    xp = get_array_module(*params) if params else active_xp
    calls: Calls = {}
    patched: list[tuple[Any, Any]] = []

    def record(layer: Any, forward: Any) -> Any:
        def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
            y = forward(x, *args, **kwargs)
            calls.setdefault(id(layer), []).append((tuple(x.shape[1:]), tuple(y.shape[1:])))
            return y
        return wrapper

    try:
        for layer in walk(network.chain):
            # An instance attribute shadows the class's method; the old one (if the
            # instance had its own) is put back afterwards.
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = record(layer, layer.forward)
        network.predict(xp.zeros((1, *shape), dtype=network.dtype), train_flg=False)
    finally:
        for layer, own in patched:
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    return calls


def _macs(layer: Any, in_shape: Shape, out_shape: Shape) -> int:
    """Multiply-adds of one call of a convolution or fully connected layer (else 0)."""
    W = layer.params.get("W") if hasattr(layer, "params") else None
    if W is None:
        return 0
    if isinstance(layer, Deconvolution):  # each input pixel scatters C_out*KH*KW
        return math.prod(in_shape) * (W.size // W.shape[0])
    if isinstance(layer, Convolution):  # each output value gathers C*KH*KW
        return math.prod(out_shape) * (W.size // W.shape[0])
    if isinstance(layer, (Affine, TimeAffine)):  # each output value gathers D
        return math.prod(out_shape) * W.shape[0]
    return 0


def forward_flops(network: Any, input_shape: Sequence[int] | None = None) -> int:
    """Multiply-adds of one image's forward pass through the convolution, transposed
    convolution and fully connected layers (others are not counted).

    The convention of the papers' "FLOPs" (VGG-16 at 224x224: 15.5 G): one
    multiply-add counts once; twice that many floating-point operations run.
    A layer used twice counts twice.  ``input_shape`` defaults to the network's.
    """
    calls = trace(network, input_shape)
    return sum(_macs(layer, i, o) for layer in walk(network.chain)
               for i, o in calls.get(id(layer), ()))


def _label(layer: Any) -> str:
    """The layer's class and, where it has them, its geometry."""
    text = type(layer).__name__
    block = getattr(layer, "block_name", None)
    if block:
        text += f" {block!r}"
    merge = getattr(layer, "merge", None)
    if isinstance(merge, str):
        text += f" ({merge})"
    W = getattr(layer, "params", {}).get("W")
    if W is not None and W.ndim == 4:
        text += f" {W.shape[2]}x{W.shape[3]}"
    elif hasattr(layer, "pool_h"):
        text += f" {layer.pool_h}x{layer.pool_w}"
    if W is not None and W.ndim == 4 or hasattr(layer, "pool_h"):
        text += f" s{layer.stride}" + (f" p{layer.pad}" if layer.pad else "")
    if hasattr(layer, "dropout_ratio"):
        text += f" {layer.dropout_ratio:g}"
    return text


def _tree(layer: Any, depth: int, seen: set[int]) -> Iterator[tuple[int, Any, bool]]:
    """(depth, layer, first time seen) for ``layer``'s children, depth first."""
    for child in (layer.children() if hasattr(layer, "children") else ()):
        first = id(child) not in seen
        seen.add(id(child))
        yield depth, child, first
        if first:
            yield from _tree(child, depth + 1, seen)


def _count(layer: Any) -> int:
    return sum(int(a.size) for node in walk(layer)
               for a in (getattr(node, "params", {}) or {}).values())


def summary(network: Any, input_shape: Sequence[int] | None = None) -> str:
    """The network's layers as an indented tree, one per line: output shape (one
    sample), parameter count, forward multiply-adds and parameter names; a container's
    line counts everything it holds.  Totals at the end: parameters (equal to
    ``network.num_params``), buffers and :func:`forward_flops`.

    ``input_shape`` (one sample, e.g. (1, 28, 28)) defaults to ``network.input_shape``.
    """
    shape = _input_shape(network, input_shape)
    calls = trace(network, shape)
    names: dict[tuple[int, str], str] = {}
    for name in network.params:
        layer, key = network.params.slot(name)
        names[id(layer), key] = name

    def macs(node: Any) -> int:
        return sum(_macs(n, i, o) for n in walk(node) for i, o in calls.get(id(n), ()))

    rows = [("layer", "output", "params", "mult-adds", "names")]
    for depth, layer, first in _tree(network.chain, 0, set()):
        seen = calls.get(id(layer))
        out = str(seen[0][1]) if seen else "-"
        label = "  " * depth + _label(layer) + ("" if first else " (shared, again)")
        n, m = (_count(layer), macs(layer)) if first else (0, 0)
        own = ", ".join(names.get((id(layer), k), k) for k in getattr(layer, "params", {}))
        rows.append((label, out, f"{n:,}" if n else "", f"{m:,}" if m else "", own))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{type(network).__name__}"
             + (f" ({network.model_name})" if getattr(network, "model_name", None) else "")
             + f": input {shape}, {network.dtype}, {network.backend_name}"]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  "
                     f"{r[3]:>{widths[3]}}  {r[4]}".rstrip())
    lines.append(f"loss: {type(network.loss_layer).__name__}")
    frozen = len(getattr(network, "frozen", ()))
    n_buffers = sum(int(a.size) for a in network.buffers.values())
    lines.append(f"total params: {network.num_params:,}"
                 + (f" ({frozen} arrays frozen)" if frozen else "")
                 + f"; buffers: {n_buffers:,}")
    lines.append(f"forward mult-adds per sample: {macs(network.chain):,}")
    return "\n".join(lines)
