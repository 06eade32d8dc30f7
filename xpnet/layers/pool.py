"""Max and average pooling, looping over window offsets only."""

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
    never wins).  The gradient goes to the first maximum of each window.
    """

    pad_value = float("-inf")

    def forward(self, x: Array, train: bool = True) -> Array:
        xp = self._xp(x=x)
        g = self._geometry(x)
        n, c = x.shape[:2]
        out = xp.empty((n, c, g.oh, g.ow), dtype=x.dtype)
        argmax_dtype = _offset_dtype(xp, g)
        if cuda_kernels_enabled(xp):  # one kernel; the offsets come for free
            argmax = xp.empty(out.shape, dtype=argmax_dtype)
            cuda_kernels.max_pool_into(xp.ascontiguousarray(x), g, out, argmax)
        else:
            # Only training needs the winners' positions; inference takes the maxima
            # alone (a backward after it finds them then, from the input).
            argmax = xp.empty(out.shape, dtype=argmax_dtype) if train else None
            self._batch_parallel(
                xp, n, lambda part: self._max_into(xp, x, g, out, argmax, part))
        self.x, self.x_shape, self._g, self._argmax = x, x.shape, g, argmax
        return out

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

    def backward(self, dout: Array) -> Array:
        self._need_forward("x_shape")
        self._check_dout(dout)
        g, x = self._g, self.x
        xp = self._xp(dout=dout, x=x)
        if self._argmax is None:  # forward ran in inference mode: find the winners now
            self._argmax = xp.empty(dout.shape, dtype=_offset_dtype(xp, g))
            maxima = xp.empty(dout.shape, dtype=x.dtype)
            self._batch_parallel(
                xp, x.shape[0], lambda part: self._max_into(xp, x, g, maxima, self._argmax, part))
        argmax = self._argmax
        dx = xp.empty(self.x_shape, dtype=dout.dtype)
        if cuda_kernels_enabled(xp):
            cuda_kernels.max_pool_backward_into(xp.ascontiguousarray(dout), argmax, g, dx)
            return dx
        zero = dout.dtype.type(0)

        def backward_part(part: slice) -> None:
            d, a = dout[part], argmax[part]
            parts = ((i, j, xp.where(a == i * g.kw + j, d, zero))
                     for i in range(g.kh) for j in range(g.kw))
            self._scatter(xp, g, dx[part], parts)

        self._batch_parallel(xp, dout.shape[0], backward_part)
        return dx


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

    def backward(self, dout: Array) -> Array:
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
