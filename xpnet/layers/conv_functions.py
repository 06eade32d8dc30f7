"""2-D convolution as pure functions over ``xp``: forward, input gradient, weight gradient.

The layers of :mod:`xpnet.layers.conv` are thin on top of these: Convolution runs
them as named, Deconvolution (the transposed convolution) with the roles swapped.

All three are im2col + one wide GEMM per chunk of images (:mod:`xpnet.layers.im2col`).
The patch matrix is never kept between calls: each call rebuilds it chunk by chunk,
which is cheaper than reading tens of MB back from memory, and bounds the memory
for large batches (the chunks' scratch buffers are the shared
:func:`~xpnet.layers.base.workspace`; ``free_workspace`` releases them).  On the CPU
the batch is split over xpnet's threads (:mod:`xpnet.backend.threads`) and the bias
is added inside the GEMM (:func:`_fold_bias`); on CuPy one kernel builds each patch
matrix straight from the unpadded input (:mod:`xpnet.layers.cuda_kernels`).

Shapes: x (N, C, H, W), W (FN, C, KH, KW), b (FN,), y = dout (N, FN, OH, OW) with
OH = (H + 2*pad - KH) / stride + 1, which must be a whole number.  ``name`` is the
layer named in error messages.
"""

from __future__ import annotations

from typing import Any

from xpnet.backend import check_same_backend
from xpnet.backend.graphs import matmul
from xpnet.backend.kernels import cuda_kernels_enabled
from xpnet.backend.threads import batch_slices, parallel_map, sum_in_order
from xpnet.layers import cuda_kernels
from xpnet.layers.base import Array, expect, expect_float_input, workspace
from xpnet.layers.im2col import (
    PatchGeometry,
    checked_geometry,
    crop_padding,
    fill_cols,
    geometry,
    pad_into,
    scatter_cols,
)

__all__ = ["conv2d", "conv2d_grad_input", "conv2d_grad_weight", "bias_gradient",
           "conv_geometry"]

# On the CPU the patch matrix of a whole batch (tens of MB) falls out of cache
# between im2col and the GEMM; chunks of about this many bytes stay in cache.
# On the GPU one chunk is the whole batch.
CPU_CHUNK_BYTES = 4 << 20
GPU_CHUNK_BYTES = 1 << 30


def chunk_size(xp: Any, n: int, bytes_per_image: int) -> int:
    """How many images to process at once."""
    budget = CPU_CHUNK_BYTES if xp.__name__ == "numpy" else GPU_CHUNK_BYTES
    return max(1, min(n, budget // max(1, bytes_per_image)))


def _chunk_ranges(xp: Any, part: slice, g: PatchGeometry, dtype: Any):
    """(start, stop) of the chunks of ``part`` whose patch matrices fit the chunk budget."""
    step = chunk_size(xp, part.stop - part.start, g.ckk * g.length * dtype.itemsize)
    for start in range(part.start, part.stop, step):
        yield start, min(part.stop, start + step)


def bias_gradient(dout: Array) -> Array:
    """dout (N, FN, OH, OW) summed over all but the channel axis.

    CuPy reduces over axes (0, 2, 3) with one thread block per channel, a handful
    of blocks for millions of numbers; on the GPU the pixels of each (image,
    channel) are summed first (N*FN blocks), then the images.
    """
    xp = check_same_backend("bias_gradient", dout=dout)
    if cuda_kernels_enabled(xp):
        n, fn = dout.shape[:2]
        return dout.reshape(n, fn, -1).sum(axis=2).sum(axis=0)
    return dout.sum(axis=(0, 2, 3))


def _fold_bias(xp: Any) -> bool:
    """Whether the bias is added inside the GEMM, as a row of ones under the patches.

    On the CPU, NumPy's broadcast add over the strided, transposed GEMM output is a
    slow inner loop: with the bias in the GEMM, the output pass is a plain copy (or
    the ReLU), and in the weight gradient the same row makes dW's GEMM give db as
    well.  On the GPU the output pass is one kernel either way.
    """
    return xp.__name__ == "numpy"


def _contiguous_rows(xp: Any) -> bool | None:
    """Whole-row patch copies (the CPU's layout), unless the CuPy im2col kernel runs."""
    return False if cuda_kernels_enabled(xp) else None


def conv_geometry(name: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...],
                  stride: int, pad: int, xp: Any) -> PatchGeometry:
    """The patch geometry of input ``x_shape`` under kernels ``w_shape``, checked.

    Raises ValueError naming ``name`` when x is not (N, C, H, W) with W's C channels,
    or when the kernels do not fit the padded input a whole number of times.
    """
    expect(len(x_shape) == 4, name, "input ndim (N, C, H, W)", 4, len(x_shape))
    expect(x_shape[1] == w_shape[1], name, "input channels", w_shape[1], x_shape[1])
    return checked_geometry(name, x_shape, w_shape[2], w_shape[3], stride, pad, "kernel",
                            _contiguous_rows(xp))


def _expect_dout(name: str, dout: Array, x_shape: tuple[int, ...], fn: int,
                 g: PatchGeometry) -> None:
    expected = (x_shape[0], fn, g.oh, g.ow)
    expect(tuple(dout.shape) == expected, name, "dout.shape", expected, tuple(dout.shape))


# ---------------------------------------------------------------- building blocks
def _chunks(tag: str, xp: Any, x: Array, g: PatchGeometry, part: slice, ones: bool = False):
    """Yield (start, stop, col) over x[part], col = im2col of x[start:stop].

    With ``ones``, col has one more row, all ones, below the patches (see
    :func:`_fold_bias`).
    """
    for start, stop in _chunk_ranges(xp, part, g, x.dtype):
        m = stop - start
        rows, length = g.col_shape(m)
        full = workspace(tag + ("col1" if ones else "col"), xp, (rows + ones, length), x.dtype)
        col = full[:rows]
        if ones:
            xp.copyto(full[rows], 1)
        if not g.contiguous_rows and cuda_kernels_enabled(xp):
            cuda_kernels.im2col_into(xp.ascontiguousarray(x[start:stop]), g, col)
        else:
            padded = workspace(tag + "padded", xp, g.padded_shape(m), x.dtype)
            pad_into(x[start:stop], g, padded)
            fill_cols(padded, g, col)
        yield start, stop, full


def _dout_cols(xp: Any, dout: Array, start: int, stop: int, g: PatchGeometry) -> Array:
    """dout[start:stop] laid out like the columns of ``col``: (FN, m*OH*pitch)."""
    fn, m = dout.shape[1], stop - start
    buf = workspace("dcols", xp, (fn, m, g.oh, g.pitch), dout.dtype)
    if g.pitch > g.ow:
        xp.copyto(buf[..., g.ow :], 0)  # junk columns contribute nothing
    xp.copyto(buf[..., : g.ow], dout[start:stop].transpose(1, 0, 2, 3))
    return buf.reshape(fn, -1)


def _correlate(tag: str, xp: Any, x: Array, g: PatchGeometry, W2: Array, out: Array,
               bias: Array | None = None, relu: bool = False) -> Array:
    """out = W2 (FN, C*KH*KW) applied to every patch of x, plus bias (then ReLU)."""
    fn = W2.shape[0]
    zero = x.dtype.type(0)
    fold = bias is not None and _fold_bias(xp)
    if fold:
        W2 = xp.concatenate([W2, bias.reshape(fn, 1)], axis=1)
        bias = None

    def correlate_part(part: slice) -> None:
        for start, stop, col in _chunks(tag, xp, x, g, part, ones=fold):
            m = stop - start
            y = workspace(tag + "y", xp, (fn, m * g.length), x.dtype)
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


# ---------------------------------------------------------------- the three functions
def conv2d(x: Array, W: Array, b: Array | None = None, stride: int = 1, pad: int = 0,
           relu: bool = False, *, name: str = "conv2d") -> Array:
    """y = W * x (cross-correlation, as in the book) + b; with ``relu``, max(y, 0).

    x (N, C, H, W), W (FN, C, KH, KW), b (FN,) or None -> y (N, FN, OH, OW), a new
    array of x's dtype (which must be W's).  The ReLU is applied in the same output
    pass, while each chunk is in cache.
    """
    xp = check_same_backend(name, x=x, W=W, b=b)
    expect_float_input(name, x, W.dtype)
    g = conv_geometry(name, x.shape, W.shape, stride, pad, xp)
    fn = W.shape[0]
    out = xp.empty((x.shape[0], fn, g.oh, g.ow), dtype=x.dtype)
    return _correlate("f", xp, x, g, W.reshape(fn, -1), out, b, relu)


def conv2d_grad_input(dout: Array, W: Array, x_shape: tuple[int, ...], stride: int = 1,
                      pad: int = 0, b: Array | None = None, *, name: str = "conv2d") -> Array:
    """dL/dx of :func:`conv2d` for the upstream gradient ``dout`` (N, FN, OH, OW).

    ``x_shape`` is the convolution's input shape (N, C, H, W).  With ``b`` (C,), b is
    added to every pixel of the result: this is then the forward pass of a transposed
    convolution (:class:`~xpnet.layers.conv.Deconvolution`) with bias.
    """
    xp = check_same_backend(name, dout=dout, W=W, b=b)
    g = conv_geometry(name, tuple(x_shape), W.shape, stride, pad, xp)
    fn, c, kh, kw = W.shape
    _expect_dout(name, dout, x_shape, fn, g)
    dx = xp.empty(tuple(x_shape), dtype=dout.dtype)
    if g.stride == 1 and kh == kw and g.pad <= kh - 1:
        # At stride 1 the input gradient is itself a correlation: dout padded by
        # K-1-pad, kernels flipped, in/out channels swapped.  One more im2col + GEMM
        # beats GEMM + col2im's KH*KW read-modify-writes.
        Wt = xp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        gt = geometry(dout.shape, kh, kw, 1, kh - 1 - g.pad, _contiguous_rows(xp))
        return _correlate("b", xp, dout, gt, Wt.reshape(c, -1), dx, b)
    # General case: dcol = W^T dout, then col2im.
    W2T = W.reshape(fn, -1).T
    bias = None if b is None else b.reshape(1, c, 1, 1)

    def col2im_part(part: slice) -> None:
        for start, stop in _chunk_ranges(xp, part, g, dout.dtype):
            m = stop - start
            dcol = workspace("dcol", xp, g.col_shape(m), dout.dtype)
            matmul(xp, W2T, _dout_cols(xp, dout, start, stop, g), out=dcol)
            dpadded = workspace("dpadded", xp, g.padded_shape(m), dout.dtype)
            scatter_cols(dcol, g, dpadded)
            if bias is None:
                xp.copyto(dx[start:stop], crop_padding(dpadded, g))
            else:
                xp.add(crop_padding(dpadded, g), bias, out=dx[start:stop])

    parallel_map(xp, col2im_part, batch_slices(xp, dout.shape[0]))
    return dx


def conv2d_grad_weight(x: Array, dout: Array, w_shape: tuple[int, ...], stride: int = 1,
                       pad: int = 0, bias: bool = True, *,
                       name: str = "conv2d") -> tuple[Array, Array | None]:
    """(dL/dW (FN, C, KH, KW), dL/db (FN,) or None) of :func:`conv2d` at input x.

    ``w_shape`` is W's shape; db is computed only with ``bias``.  Partial sums over
    the threads' slices of the batch are added in slice order, so the result repeats
    bit for bit for a given thread count.
    """
    xp = check_same_backend(name, x=x, dout=dout)
    g = conv_geometry(name, x.shape, tuple(w_shape), stride, pad, xp)
    fn = w_shape[0]
    _expect_dout(name, dout, x.shape, fn, g)
    fold = bias and _fold_bias(xp)

    def weight_gradient_part(part: slice) -> tuple[Array, ...]:
        dW = None
        for start, stop, col in _chunks("f", xp, x, g, part, ones=fold):
            product = matmul(xp, _dout_cols(xp, dout, start, stop, g), col.T)
            if dW is None:
                dW = product
            else:
                dW += product
        if fold or not bias:  # with fold, col's row of ones made dW's last column db
            return (dW,)
        return dW, bias_gradient(dout[part])

    sums = sum_in_order(parallel_map(xp, weight_gradient_part,
                                     batch_slices(xp, x.shape[0])))
    if fold:
        dW = xp.ascontiguousarray(sums[0][:, :-1])
        db = xp.ascontiguousarray(sums[0][:, -1])
    elif bias:
        dW, db = sums
    else:
        dW, db = sums[0], None
    return dW.reshape(tuple(w_shape)), db
