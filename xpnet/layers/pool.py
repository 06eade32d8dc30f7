"""Max and average pooling, looping over window offsets only; global average pooling."""

from __future__ import annotations

from typing import Any

from xpnet.backend.kernels import cuda_kernels_enabled
from xpnet.backend.threads import batch_slices, parallel_map
from xpnet.layers import cuda_kernels
from xpnet.layers.base import Array, Layer, expect, expect_float_input
from xpnet.layers.im2col import checked_geometry, crop_padding, pad_into, window_view

# Fewer images than this per thread are not worth waking a worker thread for.
IMAGES_PER_THREAD = 8


class _Pool2d(Layer):
    """Shared geometry, checks and gradient scatter of the pooling layers (no parameters)."""

    pad_value = 0.0

    def __init__(self, pool_h: int, pool_w: int, stride: int = 1, pad: int = 0) -> None:
        super().__init__()
        for what, v, low in (("pool_h", pool_h, 1), ("pool_w", pool_w, 1),
                             ("stride", stride, 1), ("pad", pad, 0)):
            expect(int(v) == v and v >= low, self.name, what, f"an integer >= {low}", v)
        expect(2 * pad <= min(pool_h, pool_w), self.name, "pad",
               f"<= half the window ({min(pool_h, pool_w) // 2})", pad)
        self.pool_h, self.pool_w = int(pool_h), int(pool_w)
        self.stride, self.pad = int(stride), int(pad)
        self.x_shape: tuple | None = None

    def _geometry(self, x: Array):
        name = self.name
        expect_float_input(name, x)
        expect(x.ndim == 4, name, "input ndim (N, C, H, W)", 4, x.ndim)
        return checked_geometry(name, x.shape, self.pool_h, self.pool_w, self.stride,
                                self.pad, "window", contiguous_rows=False)

    def _windows(self, xp: Any, x: Array, g):
        """(index, i, j, view of the padded input) for each window offset."""
        xpad = x
        if g.pad:
            buf = xp.empty(g.padded_shape(x.shape[0]), dtype=x.dtype)
            xpad = pad_into(x, g, buf, value=self.pad_value)
        for i in range(g.kh):
            for j in range(g.kw):
                yield i * g.kw + j, i, j, window_view(xpad, i, j, g.oh, g.ow, g.stride)

    def _scatter(self, xp: Any, g, dx: Array, parts) -> Array:
        """Sum per-offset gradients (i, j, (n, C, OH, OW)) into dx (n, C, H, W)."""
        tiles = g.stride == g.kh == g.kw and g.pad == 0 and g.oh * g.kh == g.h \
            and g.ow * g.kw == g.w
        # Windows that tile the input exactly are each written once: no zero fill,
        # no read-modify-write.
        if g.pad:
            dpad = xp.zeros(g.padded_shape(dx.shape[0]), dtype=dx.dtype)
        else:
            dpad = dx
            if not tiles:
                xp.copyto(dx, 0)
        overlap = g.stride < g.kh or g.stride < g.kw
        for i, j, part in parts:
            target = window_view(dpad, i, j, g.oh, g.ow, g.stride)
            if overlap:
                target += part
            else:
                xp.copyto(target, part)
        if g.pad:
            xp.copyto(dx, crop_padding(dpad, g))
        return dx

    def _batch_parallel(self, xp: Any, n: int, fn) -> None:
        """Run ``fn(part)`` over the batch, one slice per thread."""
        parallel_map(xp, fn, batch_slices(xp, n, IMAGES_PER_THREAD))

    def _check_dout(self, dout: Array) -> None:
        g = self._g
        expected = (self.x_shape[0], self.x_shape[1], g.oh, g.ow)
        expect(tuple(dout.shape) == expected, self.name, "dout.shape", expected,
               tuple(dout.shape))


def _offset_dtype(xp: Any, g) -> Any:
    """The dtype of a cell's offset in its window: uint8 unless the window has more cells."""
    return xp.uint8 if g.kh * g.kw <= 256 else xp.int32


class Pooling(_Pool2d):
    """Max pooling.  x: (N, C, H, W) -> (N, C, OH, OW).

    Unlike the book, ``pad`` is honoured (padding with -inf, so a padded cell
    never wins).  The gradient goes to the first maximum of each window (raster
    order).  On the CPU, windows that tile the input (stride = window, no pad,
    as in the book's networks) are reduced one axis at a time; see below.
    """

    pad_value = float("-inf")

    def forward(self, x: Array, train: bool = True) -> Array:
        xp = self._xp(x=x)
        g = self._geometry(x)
        n, c = x.shape[:2]
        out = xp.empty((n, c, g.oh, g.ow), dtype=x.dtype)
        if cuda_kernels_enabled(xp):  # one kernel; the offsets come for free
            argmax = xp.empty(out.shape, dtype=_offset_dtype(xp, g))
            cuda_kernels.max_pool_into(xp.ascontiguousarray(x), g, out, argmax)
        else:
            # Only training needs the winners' positions; inference takes the maxima
            # alone (a backward after it finds them then, from the input).
            argmax = self._maxima_into(xp, x, g, out, train)
        self.x, self.x_shape, self._g, self._argmax = x, x.shape, g, argmax
        return out

    def _maxima_into(self, xp: Any, x: Array, g, out: Array, winners: bool) -> Any:
        """out = window maxima of x, batch-parallel; returns where the winners are
        (the tiling path's picks, else offsets), or None unless ``winners``."""
        n = x.shape[0]
        if _separable(xp, g):
            picks = _picks(xp, x.shape, g) if winners else None
            self._batch_parallel(xp, n, lambda part: _separable_max_into(
                xp, x[part], g, out[part], _part(picks, part)))
            return picks
        argmax = xp.empty(out.shape, dtype=_offset_dtype(xp, g)) if winners else None
        self._batch_parallel(xp, n, lambda part: self._max_into(xp, x, g, out, argmax, part))
        return argmax

    def _max_into(self, xp: Any, x: Array, g, out: Array, argmax: Array | None,
                  part: slice) -> None:
        """out[part] = window maxima of x[part]; argmax[part] = first winner's offset."""
        o = out[part]
        a = None if argmax is None else argmax[part]
        for k, _, _, v in self._windows(xp, x[part], g):
            if k == 0:
                xp.copyto(o, v)
                if a is not None:
                    xp.copyto(a, 0)
            elif a is None:
                xp.maximum(o, v, out=o)
            else:
                better = v > o  # strict: ties keep the first maximum
                xp.copyto(a, k, where=better)
                xp.maximum(o, v, out=o)

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("x_shape")
        self._check_dout(dout)
        g, x = self._g, self.x
        xp = self._xp(dout=dout, x=x)
        if self._argmax is None:  # forward ran in inference mode: find the winners now
            maxima = xp.empty(dout.shape, dtype=x.dtype)
            self._argmax = self._maxima_into(xp, x, g, maxima, winners=True)
        argmax = self._argmax
        dx = xp.empty(self.x_shape, dtype=dout.dtype)
        if cuda_kernels_enabled(xp):
            cuda_kernels.max_pool_backward_into(xp.ascontiguousarray(dout), argmax, g, dx)
            return dx
        if _separable(xp, g):
            self._batch_parallel(xp, dout.shape[0], lambda part: _separable_scatter(
                xp, dout[part], _part(argmax, part), g, dx[part]))
            return dx
        zero = dout.dtype.type(0)

        def backward_part(part: slice) -> None:
            d, a = dout[part], argmax[part]
            parts = ((i, j, xp.where(a == i * g.kw + j, d, zero))
                     for i in range(g.kh) for j in range(g.kw))
            self._scatter(xp, g, dx[part], parts)

        self._batch_parallel(xp, dout.shape[0], backward_part)
        return dx


# ------------------------------------------------- max pooling over tiling windows
# Windows that tile the input (stride = window, no padding: the book's 2x2/stride 2)
# are reduced one axis at a time on the CPU: first each window's row, (n, C, H, W)
# -> (n, C, H, OW), then the rows, -> (n, C, OH, OW).  Two passes over strided
# views instead of KH*KW, and the winner kept as two small "picks" (the winning
# column of every window row, the winning row of every window) rather than one
# offset; ties go to the first maximum in raster order, as on the other paths.
# NumPy only.  With a NaN in a window the output is NaN on every path, but which
# cell then gets the gradient can differ from the other paths' raster scan.

def _separable(xp: Any, g) -> bool:
    return (xp.__name__ == "numpy" and g.stride == g.kh == g.kw and g.pad == 0
            and g.oh * g.kh == g.h and g.ow * g.kw == g.w)


def _picks(xp: Any, x_shape: tuple, g) -> tuple[Array, Array]:
    """Empty (winning column per window row (n, C, H, OW), winning row per window)."""
    n, c = x_shape[:2]
    dtype = _offset_dtype(xp, g)
    return xp.empty((n, c, g.h, g.ow), dtype=dtype), xp.empty((n, c, g.oh, g.ow), dtype=dtype)


def _part(picks: tuple[Array, Array] | None, part: slice) -> tuple[Array, Array] | None:
    return None if picks is None else (picks[0][part], picks[1][part])


def _max_of(xp: Any, views: list[Array], out: Array, pick: Array | None) -> None:
    """out = elementwise max of ``views``; pick = index of the first view holding it."""
    if len(views) == 1:
        xp.copyto(out, views[0])
        if pick is not None:
            xp.copyto(pick, 0)
        return
    if pick is not None:
        xp.greater(views[1], views[0], out=pick)  # strict: a tie keeps the first
    xp.maximum(views[0], views[1], out=out)
    for k, v in enumerate(views[2:], 2):
        if pick is not None:
            xp.copyto(pick, k, where=v > out)
        xp.maximum(out, v, out=out)


def _separable_max_into(xp: Any, x: Array, g, out: Array,
                        picks: tuple[Array, Array] | None) -> None:
    """out (n, C, OH, OW) = maxima of the tiling windows of x (n, C, H, W)."""
    k = g.kh
    row_max = xp.empty((x.shape[0], x.shape[1], g.h, g.ow), dtype=x.dtype)
    col_pick, row_pick = (None, None) if picks is None else picks
    _max_of(xp, [x[..., j::k] for j in range(k)], row_max, col_pick)
    _max_of(xp, [row_max[:, :, i::k] for i in range(k)], out, row_pick)


def _separable_scatter(xp: Any, dout: Array, picks: tuple[Array, Array], g,
                       dx: Array) -> None:
    """dx (n, C, H, W): each dout to its window's winner, zeros elsewhere (no overlap)."""
    col_pick, row_pick = picks
    k = g.kh
    drow = xp.empty(col_pick.shape, dtype=dout.dtype)
    # Select by a bit mask (all ones or all zeros) over the floats' bits: a little
    # slower than a multiply by the 0/1 mask, but exact like a select, so an inf or
    # NaN in dout stays in its winner's cell (inf * 0 would spread NaN over the window).
    bits = xp.dtype(f"u{dout.dtype.itemsize}")
    _select_into(xp, dout.view(bits), row_pick, k, drow.view(bits), lambda a, i: a[:, :, i::k])
    _select_into(xp, drow.view(bits), col_pick, k, dx.view(bits), lambda a, j: a[..., j::k])


def _select_into(xp: Any, src: Array, pick: Array, k: int, dst: Array, place) -> None:
    """place(dst, i) = src where pick == i, else 0, for i < k (unsigned-int views)."""
    mask = xp.empty(pick.shape, dtype=src.dtype)
    for i in range(k):
        xp.equal(pick, i, out=mask)
        xp.negative(mask, out=mask)  # 1 -> all bits set
        xp.bitwise_and(src, mask, out=place(dst, i))


class AvgPooling(_Pool2d):
    """Average pooling.  x: (N, C, H, W) -> (N, C, OH, OW).

    Padded cells count as zeros in the average (PyTorch's count_include_pad=True).
    """

    def forward(self, x: Array, train: bool = True) -> Array:
        xp = self._xp(x=x)
        g = self._geometry(x)
        n, c = x.shape[:2]
        out = xp.empty((n, c, g.oh, g.ow), dtype=x.dtype)
        scale = x.dtype.type(1.0 / (g.kh * g.kw))

        def forward_part(part: slice) -> None:
            o = out[part]
            for k, _, _, v in self._windows(xp, x[part], g):
                if k == 0:
                    xp.copyto(o, v)
                else:
                    xp.add(o, v, out=o)
            o *= scale

        self._batch_parallel(xp, n, forward_part)
        self.x_shape, self._g = x.shape, g
        return out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("x_shape")
        self._check_dout(dout)
        g = self._g
        xp = self._xp(dout=dout)
        scale = dout.dtype.type(1.0 / (g.kh * g.kw))
        dx = xp.empty(self.x_shape, dtype=dout.dtype)

        def backward_part(part: slice) -> None:
            share = dout[part] * scale
            parts = ((i, j, share) for i in range(g.kh) for j in range(g.kw))
            self._scatter(xp, g, dx[part], parts)

        self._batch_parallel(xp, dout.shape[0], backward_part)
        return dx


class GlobalAveragePooling(Layer):
    """The mean of each channel over its pixels.  x: (N, C, H, W) -> (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.x_shape: tuple | None = None

    def forward(self, x: Array, train: bool = True) -> Array:
        expect_float_input(self.name, x)
        self._xp(x=x)
        expect(x.ndim == 4, self.name, "input ndim (N, C, H, W)", 4, x.ndim)
        n, c = x.shape[:2]
        self.x_shape = x.shape
        return x.reshape(n, c, -1).mean(axis=2)

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("x_shape")
        xp = self._xp(dout=dout)
        n, c, h, w = self.x_shape
        expect(tuple(getattr(dout, "shape", ())) == (n, c), self.name, "dout.shape", (n, c),
               tuple(getattr(dout, "shape", ())))
        dx = xp.empty(self.x_shape, dtype=dout.dtype)
        # Every pixel gets an equal share of its channel's gradient.
        xp.multiply(dout.reshape(n, c, 1, 1), dout.dtype.type(1.0 / (h * w)), out=dx)
        return dx
