"""CuPy kernels for the hot paths of Convolution and Pooling (see xpnet.backend.kernels).

Each replaces a Python loop of array operations (one launch each) by one launch,
and each must agree with the generic ``xp`` path it replaces (tests/test_cuda_kernels.py).
"""

from __future__ import annotations

from typing import Any

from xpnet.backend.kernels import elementwise_kernel
from xpnet.layers.im2col import PatchGeometry

Array = Any

# col[(c, ki, kj), (n, oh, ow)] = x[n, c, oh*S + ki - P, ow*S + kj - P], 0 outside x.
# Reads the unpadded input directly: no padded copy, no per-offset loop.
_IM2COL = (
    "raw T x, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 S, int32 P, "
    "int32 OH, int32 OW, int64 L",
    "T col",
    """
    const long long row = i / L, q = i - row * L;
    const int c = row / (KH * KW), k = row - (long long)c * KH * KW;
    const int ki = k / KW, kj = k - ki * KW;
    const long long n = q / (OH * OW);
    const int r = q - n * OH * OW, oh = r / OW, ow = r - oh * OW;
    const int y = oh * S + ki - P, xx = ow * S + kj - P;
    col = (y >= 0 && y < H && xx >= 0 && xx < W)
        ? x[((n * C + c) * H + y) * W + xx] : (T)0;
    """,
    "xpnet_im2col",
)

# Max over each window, and the offset (ki*KW + kj) of its first maximum, with the
# generic path's semantics: cells outside the input are -inf, a later cell wins only
# if strictly greater, and a NaN propagates to the maximum (numpy.maximum).
_MAX_POOL = (
    "raw T x, int32 H, int32 W, int32 KH, int32 KW, int32 S, int32 P, int32 OH, int32 OW",
    "T out, A argmax",
    """
    const long long nc = i / (OH * OW);
    const int r = i - nc * OH * OW, oh = r / OW, ow = r - oh * OW;
    const T* plane = &x[nc * H * W];
    // -inf without <math.h> (NVRTC has no INFINITY): the double of bits 0x7ff0...0.
    const T minus_inf = (T)(-__longlong_as_double(0x7ff0000000000000LL));
    T m = (T)0;
    int best = 0;
    for (int ki = 0; ki < KH; ++ki) {
        for (int kj = 0; kj < KW; ++kj) {
            const int y = oh * S + ki - P, xx = ow * S + kj - P;
            const T v = (y >= 0 && y < H && xx >= 0 && xx < W) ? plane[y * W + xx] : minus_inf;
            if (ki == 0 && kj == 0) { m = v; continue; }
            if (v > m) best = ki * KW + kj;
            if (!(m != m) && (v != v || v > m)) m = v;
        }
    }
    out = m;
    argmax = (A)best;
    """,
    "xpnet_max_pool",
)

# dx by gathering: each input cell sums dout over the windows that contain it and
# chose it as their maximum.  Deterministic, no atomics.
_MAX_POOL_BACKWARD = (
    "raw T dout, raw A argmax, int32 H, int32 W, int32 KH, int32 KW, int32 S, int32 P, "
    "int32 OH, int32 OW",
    "T dx",
    """
    const long long nc = i / (H * W);
    const int r = i - nc * H * W, hp = r / W + P, wp = r - (r / W) * W + P;
    const int oh_lo = hp >= KH ? (hp - KH + S) / S : 0, oh_hi = min(OH - 1, hp / S);
    const int ow_lo = wp >= KW ? (wp - KW + S) / S : 0, ow_hi = min(OW - 1, wp / S);
    T acc = (T)0;
    for (int oh = oh_hi; oh >= oh_lo; --oh) {
        for (int ow = ow_hi; ow >= ow_lo; --ow) {
            const long long o = nc * OH * OW + oh * OW + ow;
            if ((int)argmax[o] == (hp - oh * S) * KW + (wp - ow * S)) acc += dout[o];
        }
    }
    dx = acc;
    """,
    "xpnet_max_pool_backward",
)


def im2col_into(x: Array, g: PatchGeometry, col: Array) -> Array:
    """``col`` (C*KH*KW, n*OH*OW) from an unpadded, C-contiguous ``x`` (n, C, H, W)."""
    assert not g.contiguous_rows, "the kernel writes the (C*KH*KW, n*OH*OW) layout"
    n = x.shape[0]
    elementwise_kernel(*_IM2COL)(x, g.c, g.h, g.w, g.kh, g.kw, g.stride, g.pad,
                                 g.oh, g.ow, n * g.oh * g.ow, col)
    return col


def max_pool_into(x: Array, g: PatchGeometry, out: Array, argmax: Array) -> None:
    """Window maxima of a C-contiguous ``x`` into ``out`` and their offsets into ``argmax``."""
    elementwise_kernel(*_MAX_POOL)(x, g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.oh, g.ow,
                                   out, argmax)


def max_pool_backward_into(dout: Array, argmax: Array, g: PatchGeometry, dx: Array) -> None:
    """dx (n, C, H, W) of max pooling from C-contiguous ``dout`` and ``argmax``."""
    elementwise_kernel(*_MAX_POOL_BACKWARD)(dout, argmax, g.h, g.w, g.kh, g.kw, g.stride,
                                            g.pad, g.oh, g.ow, dx)
