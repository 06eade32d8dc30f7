"""Convolution by im2col, processed in cache-sized chunks of the batch."""

from __future__ import annotations

from typing import Any

from xpnet.backend.graphs import matmul
from xpnet.backend.kernels import cuda_kernels_enabled
from xpnet.backend.threads import batch_slices, parallel_map, sum_in_order
from xpnet.layers import cuda_kernels
from xpnet.layers.base import Array, Layer, expect, expect_float_input
from xpnet.layers.im2col import (
    checked_geometry,
    crop_padding,
    fill_cols,
    geometry,
    pad_into,
    scatter_cols,
)

# On the CPU the patch matrix of a whole batch (tens of MB) falls out of cache
# between im2col and the GEMM; chunks of about this many bytes stay in cache.
# On the GPU one chunk is the whole batch.
CPU_CHUNK_BYTES = 4 << 20
GPU_CHUNK_BYTES = 1 << 30


def chunk_size(xp: Any, n: int, bytes_per_image: int) -> int:
    """How many images to process at once."""
    budget = CPU_CHUNK_BYTES if xp.__name__ == "numpy" else GPU_CHUNK_BYTES
    return max(1, min(n, budget // max(1, bytes_per_image)))


def _chunk_ranges(xp: Any, part: slice, g, dtype: Any):
    """(start, stop) of the chunks of ``part`` whose patch matrices fit the chunk budget."""
    step = chunk_size(xp, part.stop - part.start, g.ckk * g.length * dtype.itemsize)
    for start in range(part.start, part.stop, step):
        yield start, min(part.stop, start + step)


def _bias_gradient(xp: Any, dout: Array) -> Array:
    """dout (N, FN, OH, OW) summed over all but the channel axis.

    CuPy reduces over axes (0, 2, 3) with one thread block per channel, a handful
    of blocks for millions of numbers; on the GPU the pixels of each (image,
    channel) are summed first (N*FN blocks), then the images.
    """
    if cuda_kernels_enabled(xp):
        n, fn = dout.shape[:2]
        return dout.reshape(n, fn, -1).sum(axis=2).sum(axis=0)
    return dout.sum(axis=(0, 2, 3))


def _fold_bias(xp: Any) -> bool:
    """Whether the bias is added inside the GEMM, as a row of ones under the patches.

    On the CPU, NumPy's broadcast add over the strided, transposed GEMM output is a
    slow inner loop: with the bias in the GEMM, the output pass is a plain copy (or
    the ReLU), and in backward the same row makes dW's GEMM give db as well.  On the
    GPU the output pass is one kernel either way.
    """
    return xp.__name__ == "numpy"


def _contiguous_rows(xp: Any) -> bool | None:
    """Whole-row patch copies (the CPU's layout), unless the CuPy im2col kernel runs."""
    return False if cuda_kernels_enabled(xp) else None


class Convolution(Layer):
    """2-D convolution (cross-correlation, as in the book).

    W: (FN, C, KH, KW), b: (FN,).  x: (N, C, H, W) -> y: (N, FN, OH, OW) with
    OH = (H + 2*pad - KH) / stride + 1, which must be a whole number.

    Unlike the book, the patch matrix is not kept between forward and backward:
    backward rebuilds it chunk by chunk, which is cheaper than reading tens of MB
    back from memory, and keeps the layer's memory bounded for large batches (the
    chunks' scratch buffers are shared by all layers; ``free_workspace`` releases
    them).  On the CPU the batch is split over xpnet's threads
    (:mod:`xpnet.backend.threads`) and the bias is added inside the GEMM
    (:func:`_fold_bias`); on CuPy one kernel builds each patch matrix straight
    from the unpadded input (:mod:`xpnet.layers.cuda_kernels`).

    ``forward(x, relu=True)`` returns max(y, 0) from the same output pass;
    :class:`~xpnet.models.Sequential` uses it for a Convolution followed by a ReLU.
    """

    def __init__(self, W: Array, b: Array, stride: int = 1, pad: int = 0) -> None:
        super().__init__()
        expect(W.ndim == 4, self.name, "W.ndim", 4, W.ndim)
        expect(b.shape == (W.shape[0],), self.name, "b.shape", (W.shape[0],), tuple(b.shape))
        for what, v, low in (("stride", stride, 1), ("pad", pad, 0)):
            expect(int(v) == v and v >= low, self.name, what, f"an integer >= {low}", v)
        self.params = {"W": W, "b": b}
        self.stride, self.pad = int(stride), int(pad)
        self.x: Array | None = None

    def _geometry(self, xp: Any, x: Array):
        fn, c, kh, kw = self.params["W"].shape
        name = self.name
        expect(x.ndim == 4, name, "input ndim (N, C, H, W)", 4, x.ndim)
        expect(x.shape[1] == c, name, "input channels", c, x.shape[1])
        return checked_geometry(name, x.shape, kh, kw, self.stride, self.pad, "kernel",
                                _contiguous_rows(xp))

    def _chunks(self, tag: str, xp: Any, x: Array, g, part: slice, ones: bool = False):
        """Yield (start, stop, col) over x[part], col = im2col of x[start:stop].

        With ``ones``, col has one more row, all ones, below the patches (see
        :func:`_fold_bias`).
        """
        for start, stop in _chunk_ranges(xp, part, g, x.dtype):
            m = stop - start
            rows, length = g.col_shape(m)
            full = self._workspace(tag + ("col1" if ones else "col"), xp,
                                   (rows + ones, length), x.dtype)
            col = full[:rows]
            if ones:
                xp.copyto(full[rows], 1)
            if not g.contiguous_rows and cuda_kernels_enabled(xp):
                cuda_kernels.im2col_into(xp.ascontiguousarray(x[start:stop]), g, col)
            else:
                padded = self._workspace(tag + "padded", xp, g.padded_shape(m), x.dtype)
                pad_into(x[start:stop], g, padded)
                fill_cols(padded, g, col)
            yield start, stop, full

    def _dout_cols(self, xp: Any, dout: Array, start: int, stop: int, g) -> Array:
        """dout[start:stop] laid out like the columns of ``col``: (FN, m*OH*pitch)."""
        fn, m = dout.shape[1], stop - start
        buf = self._workspace("dcols", xp, (fn, m, g.oh, g.pitch), dout.dtype)
        if g.pitch > g.ow:
            xp.copyto(buf[..., g.ow :], 0)  # junk columns contribute nothing
        xp.copyto(buf[..., : g.ow], dout[start:stop].transpose(1, 0, 2, 3))
        return buf.reshape(fn, -1)

    def _correlate(self, tag: str, xp: Any, x: Array, g, W2: Array, out: Array,
                   bias: Array | None = None, relu: bool = False) -> Array:
        """out = W2 (FN, C*KH*KW) applied to every patch of x, plus bias (then ReLU)."""
        fn = W2.shape[0]
        zero = x.dtype.type(0)
        fold = bias is not None and _fold_bias(xp)
        if fold:
            W2 = xp.concatenate([W2, bias.reshape(fn, 1)], axis=1)
            bias = None

        def correlate_part(part: slice) -> None:
            for start, stop, col in self._chunks(tag, xp, x, g, part, ones=fold):
                m = stop - start
                y = self._workspace(tag + "y", xp, (fn, m * g.length), x.dtype)
                matmul(xp, W2, col, out=y)
                # Back to (m, FN, OH, OW), the junk columns cropped, in one pass that
                # also adds the bias (unless the GEMM did) and applies the ReLU.
                y = y.reshape(fn, m, g.oh, g.pitch)[..., : g.ow].transpose(1, 0, 2, 3)
                o = out[start:stop]
                if bias is not None:
                    xp.add(y, bias.reshape(1, fn, 1, 1), out=o)
                    if relu:  # while the chunk is still in cache
                        xp.maximum(o, zero, out=o)
                elif relu:
                    xp.maximum(y, zero, out=o)
                else:
                    xp.copyto(o, y)

        parallel_map(xp, correlate_part, batch_slices(xp, x.shape[0]))
        return out

    fuses_relu = True

    def forward(self, x: Array, train: bool = True, relu: bool = False) -> Array:
        """The convolution of x; with ``relu``, max(that, 0) in the same output pass."""
        W, b = self.params["W"], self.params["b"]
        xp = self._xp(x=x)
        expect_float_input(self.name, x, W.dtype)
        g = self._geometry(xp, x)
        fn = W.shape[0]
        out = xp.empty((x.shape[0], fn, g.oh, g.ow), dtype=x.dtype)
        self._correlate("f", xp, x, g, W.reshape(fn, -1), out, b, relu)
        self.x, self._g = x, g
        return out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("x")
        x, g = self.x, self._g
        W = self.params["W"]
        xp = self._xp(x=x, dout=dout)
        fn = W.shape[0]
        expect(dout.shape == (x.shape[0], fn, g.oh, g.ow), self.name, "dout.shape",
               (x.shape[0], fn, g.oh, g.ow), tuple(dout.shape))

        fold = _fold_bias(xp)

        def weight_gradient_part(part: slice) -> tuple[Array, ...]:
            dW = None
            for start, stop, col in self._chunks("f", xp, x, g, part, ones=fold):
                product = matmul(xp, self._dout_cols(xp, dout, start, stop, g), col.T)
                if dW is None:
                    dW = product
                else:
                    dW += product
            if fold:  # col's row of ones made the last column sum dout: db
                return (dW,)
            return dW, _bias_gradient(xp, dout[part])

        sums = sum_in_order(parallel_map(xp, weight_gradient_part,
                                         batch_slices(xp, x.shape[0])))
        if fold:
            dW = xp.ascontiguousarray(sums[0][:, :-1])
            db = xp.ascontiguousarray(sums[0][:, -1])
        else:
            dW, db = sums
        self.grads = {"W": dW.reshape(W.shape), "b": db}
        if not need_input_grad:
            return None
        return self._input_gradient(xp, dout, g)

    def _input_gradient(self, xp: Any, dout: Array, g) -> Array:
        W = self.params["W"]
        fn, c, kh, kw = W.shape
        dx = xp.empty(self.x.shape, dtype=dout.dtype)
        if g.stride == 1 and kh == kw and g.pad <= kh - 1:
            # At stride 1 the input gradient is itself a correlation: dout padded
            # by K-1-pad, kernels flipped, in/out channels swapped.  One more
            # im2col + GEMM beats GEMM + col2im's KH*KW read-modify-writes.
            Wt = xp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            gt = geometry(dout.shape, kh, kw, 1, kh - 1 - g.pad, _contiguous_rows(xp))
            return self._correlate("b", xp, dout, gt, Wt.reshape(c, -1), dx)
        # General case: dcol = W^T dout, then col2im.
        W2T = W.reshape(fn, -1).T

        def col2im_part(part: slice) -> None:
            for start, stop in _chunk_ranges(xp, part, g, dout.dtype):
                m = stop - start
                dcol = self._workspace("dcol", xp, g.col_shape(m), dout.dtype)
                matmul(xp, W2T, self._dout_cols(xp, dout, start, stop, g), out=dcol)
                dpadded = self._workspace("dpadded", xp, g.padded_shape(m), dout.dtype)
                scatter_cols(dcol, g, dpadded)
                xp.copyto(dx[start:stop], crop_padding(dpadded, g))

        parallel_map(xp, col2im_part, batch_slices(xp, dout.shape[0]))
        return dx
