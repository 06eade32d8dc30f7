"""im2col / col2im, written once over the array module of their input.

Layout.  The book builds ``col`` as (N*OH*OW, C*KH*KW).  xpnet builds its
transpose, batch folded into the columns::

    col[(c, i, j), (n, oh, q)] = x_padded[n, c, oh*stride + i, q*stride + j]

shape (C*KH*KW, N*OH*pitch), so that a convolution is ONE wide GEMM
``W (FN, C*KH*KW) @ col`` per chunk of images, whatever the image size (a
per-image GEMM is narrow and slow for 8x8 feature maps).

``pitch`` is the number of columns per output row.  For stride 1 it is the
padded input width ``Wp`` rather than ``OW``: row ``oh`` of the window at offset
(i, j) is then one *contiguous* run of the flattened padded image, so each of
the KH*KW copies moves whole rows.  The last ``Wp - OW`` columns of each output
row are junk that the caller crops.  For stride > 1, ``pitch`` is OW and the
copies are strided.

Both directions loop over the KH*KW kernel offsets only, never over images or
pixels; col2im accumulates with strided ``+=`` (for a fixed offset the targets
are distinct, so no ``add.at`` is needed).

The batch-parallel CPU loops (:mod:`xpnet.backend.threads`) run these copies on
several threads at once; NumPy releases the GIL inside each large copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xpnet.backend import get_array_module
from xpnet.layers.base import expect

Array = Any


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length along one axis: (size + 2*pad - kernel) // stride + 1."""
    return (size + 2 * pad - kernel) // stride + 1


@dataclass(frozen=True)
class PatchGeometry:
    """Where every patch of a (C, H, W) input lies, for one kernel/stride/pad."""

    c: int
    h: int
    w: int
    kh: int
    kw: int
    stride: int
    pad: int
    contiguous_rows: bool  # stride 1 with pitch = Wp (see module docstring)

    @property
    def oh(self) -> int:
        return conv_output_size(self.h, self.kh, self.stride, self.pad)

    @property
    def ow(self) -> int:
        return conv_output_size(self.w, self.kw, self.stride, self.pad)

    @property
    def wp(self) -> int:
        return self.w + 2 * self.pad

    @property
    def pitch(self) -> int:
        """Columns per output row in ``col``."""
        return self.wp if self.contiguous_rows else self.ow

    @property
    def rows(self) -> int:
        """Rows of the padded buffer; one spare row keeps the last flat slice in bounds."""
        return self.h + 2 * self.pad + (1 if self.contiguous_rows else 0)

    @property
    def ckk(self) -> int:
        return self.c * self.kh * self.kw

    @property
    def length(self) -> int:
        """Columns of ``col`` per image: OH * pitch."""
        return self.oh * self.pitch

    def padded_shape(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.c, self.rows, self.wp)

    def col_shape(self, n: int) -> tuple[int, int]:
        return (self.ckk, n * self.length)


def geometry(x_shape: tuple[int, ...], kh: int, kw: int, stride: int = 1, pad: int = 0,
             contiguous_rows: bool | None = None) -> PatchGeometry:
    """The patch geometry of an (N, C, H, W) input; contiguous rows by default at stride 1."""
    _, c, h, w = x_shape
    if contiguous_rows is None:
        contiguous_rows = stride == 1
    return PatchGeometry(c, h, w, kh, kw, stride, pad, contiguous_rows and stride == 1)


def checked_geometry(layer: str, x_shape: tuple[int, ...], kh: int, kw: int, stride: int,
                     pad: int, kind: str = "kernel",
                     contiguous_rows: bool | None = None) -> PatchGeometry:
    """:func:`geometry`, after checking that the windows fit a whole number of times.

    Raises ValueError naming ``layer``, what the ``kind`` ('kernel' or 'window') needs
    and what it got.
    """
    h, w = x_shape[2] + 2 * pad, x_shape[3] + 2 * pad
    expect(h >= kh and w >= kw, layer, "padded input size", f">= {kind} {(kh, kw)}", (h, w))
    for axis, size, k in (("height", h, kh), ("width", w, kw)):
        expect((size - k) % stride == 0, layer,
               f"(padded {axis} - {kind}) divisible by stride {stride}",
               "a whole output size", f"{size} - {k} = {size - k}")
    return geometry(x_shape, kh, kw, stride, pad, contiguous_rows)


def pad_into(x: Array, g: PatchGeometry, out: Array, value: float = 0.0) -> Array:
    """Copy ``x`` (n, C, H, W) into ``out`` (n, C, rows, Wp), bordered with ``value``."""
    copyto = get_array_module(out).copyto
    p = g.pad
    copyto(out[:, :, :p], value)
    copyto(out[:, :, p + g.h :], value)
    copyto(out[:, :, p : p + g.h, :p], value)
    copyto(out[:, :, p : p + g.h, p + g.w :], value)
    copyto(out[:, :, p : p + g.h, p : p + g.w], x)
    return out


def window_view(xpad: Array, i: int, j: int, oh: int, ow: int, stride: int) -> Array:
    """The (N, C, OH, OW) view of ``xpad`` seen by kernel offset (i, j)."""
    return xpad[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]


def _offset_views(g: PatchGeometry, padded: Array, col: Array):
    """Pairs (padded-image view, col view) of equal shape (C, n, ...), one per kernel offset."""
    n = padded.shape[0]
    if g.contiguous_rows:
        flat = padded.reshape(n, g.c, -1).transpose(1, 0, 2)
        col5 = col.reshape(g.c, g.kh, g.kw, n, g.length)
        for i in range(g.kh):
            for j in range(g.kw):
                start = i * g.wp + j
                yield flat[:, :, start : start + g.length], col5[:, i, j]
    else:
        col6 = col.reshape(g.c, g.kh, g.kw, n, g.oh, g.ow)
        by_channel = padded.transpose(1, 0, 2, 3)
        for i in range(g.kh):
            for j in range(g.kw):
                yield window_view(by_channel, i, j, g.oh, g.ow, g.stride), col6[:, i, j]


def fill_cols(padded: Array, g: PatchGeometry, col: Array) -> Array:
    """im2col proper: ``col`` (C*KH*KW, n*OH*pitch) from a padded (n, C, rows, Wp) buffer."""
    copyto = get_array_module(col).copyto
    for src, dst in _offset_views(g, padded, col):
        copyto(dst, src)
    return col


def scatter_cols(col: Array, g: PatchGeometry, padded: Array) -> Array:
    """col2im proper: the adjoint of :func:`fill_cols`, summed into ``padded`` (zeroed here)."""
    copyto = get_array_module(padded).copyto
    copyto(padded, 0)
    # Without overlap (stride >= kernel) each padded pixel is hit at most once,
    # so a plain store replaces the read-modify-write.
    overlap = g.stride < g.kh or g.stride < g.kw
    for dst, src in _offset_views(g, padded, col):
        if overlap:
            dst += src
        else:
            copyto(dst, src)
    return padded


def crop_padding(padded: Array, g: PatchGeometry) -> Array:
    """The (n, C, H, W) interior view of a padded buffer."""
    return padded[:, :, g.pad : g.pad + g.h, g.pad : g.pad + g.w]


def im2col(x: Array, kh: int, kw: int, stride: int = 1, pad: int = 0) -> Array:
    """Patches of ``x`` (N, C, H, W) as ``col`` (C*KH*KW, N*OH*OW): the book's col, transposed."""
    xp = get_array_module(x)
    g = geometry(x.shape, kh, kw, stride, pad, contiguous_rows=False)
    padded = pad_into(x, g, xp.empty(g.padded_shape(x.shape[0]), dtype=x.dtype))
    return fill_cols(padded, g, xp.empty(g.col_shape(x.shape[0]), dtype=x.dtype))


def col2im(col: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int,
           stride: int = 1, pad: int = 0) -> Array:
    """Adjoint of :func:`im2col`: sums ``col`` (C*KH*KW, N*OH*OW) back into (N, C, H, W)."""
    xp = get_array_module(col)
    g = geometry(x_shape, kh, kw, stride, pad, contiguous_rows=False)
    padded = scatter_cols(col, g, xp.empty(g.padded_shape(x_shape[0]), dtype=col.dtype))
    return xp.ascontiguousarray(crop_padding(padded, g))
