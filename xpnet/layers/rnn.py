"""Recurrent layers over a time axis: Embedding, LSTM, TimeAffine, TimeSoftmaxWithLoss.

Sequences are batch first, ``(N, T, ...)``, as in the sequel to the book ("Deep Learning
from Scratch 2"), and like there the loop over time runs inside one layer (``LSTM``), so a
network sees a sequence layer as any other layer.  Inside, the LSTM keeps its per-step
arrays time-major, (T, N, ...), so that each step reads and writes contiguous blocks.
"""

from __future__ import annotations

from typing import Any

from xpnet.backend.graphs import capturing, matmul
from xpnet.layers.base import Array, Layer, expect, expect_float_input


def _sigmoid_(xp: Any, a: Array) -> None:
    """In place: a <- 1 / (1 + exp(-a)), as (1 + tanh(a/2)) / 2 (no overflow)."""
    half = a.dtype.type(0.5)
    a *= half
    xp.tanh(a, out=a)
    a += 1
    a *= half


class Embedding(Layer):
    """Rows of W looked up by integer ids: ids (N, ...) -> (N, ..., D).

    W: (V, D).  ``backward`` accumulates dout into the rows that were read
    (``xp.add.at``: repeated ids add up) and returns None: ids have no gradient.
    Ids are checked to lie in 0..V-1 (CuPy would wrap a bad one silently); the check
    reads two numbers back from the GPU, so ``validate_ids = False`` turns it off, and it
    is skipped while a CUDA graph is recorded.
    """

    validate_ids = True

    def __init__(self, W: Array) -> None:
        super().__init__()
        expect(W.ndim == 2, self.name, "W.ndim", 2, W.ndim)
        self.params = {"W": W}
        self.ids: Array | None = None

    def forward(self, ids: Array, train: bool = True) -> Array:
        W = self.params["W"]
        self._xp(ids=ids)
        expect(hasattr(ids, "dtype") and ids.dtype.kind in "iu", self.name, "ids dtype",
               "an integer dtype", getattr(ids, "dtype", type(ids).__name__), TypeError)
        expect(ids.ndim >= 1 and ids.size > 0, self.name, "ids shape", "non-empty (N, ...)",
               tuple(ids.shape))
        if self.validate_ids and not capturing():
            lo, hi = int(ids.min()), int(ids.max())
            expect(lo >= 0 and hi < W.shape[0], self.name, "id range", f"0..{W.shape[0] - 1}",
                   f"{lo}..{hi}")
        self.ids = ids
        return W[ids]

    def backward(self, dout: Array, need_input_grad: bool = True) -> None:
        self._need_forward("ids")
        W = self.params["W"]
        xp = self._xp(dout=dout)
        expect(dout.shape == (*self.ids.shape, W.shape[1]), self.name, "dout.shape",
               (*self.ids.shape, W.shape[1]), tuple(dout.shape))
        dW = xp.zeros_like(W)
        xp.add.at(dW, self.ids.reshape(-1), dout.reshape(-1, W.shape[1]))
        self.grads = {"W": dW}
        return None


class LSTM(Layer):
    """A long short-term memory layer run over a whole sequence: xs (N, T, D) -> hs (N, T, H).

    Parameters Wx (D, 4H), Wh (H, 4H), b (4H,), with the four gate blocks in the order
    forget, candidate, input, output (f, g, i, o, as in the book's sequel).  Per step::

        a = x_t Wx + h Wh + b;  f, i, o = sigmoid(a_f, a_i, a_o);  g = tanh(a_g)
        c = f * c + i * g;      h = o * tanh(c)

    State.  Each forward starts from the initial state (h0, c0): zeros unless
    ``set_state(h, c)`` gave one (kept, by reference and never written, until
    ``set_state`` or ``reset_state`` is called again), so that a captioning model can
    feed an image feature as h0.  With ``stateful=True`` a forward instead leaves its
    last (h, c) as the next forward's initial state (truncated backpropagation through
    time over a long sequence).  After ``backward``, ``dh0`` and ``dc0`` hold the gradients
    with respect to the initial state.

    ``step(x_t)`` runs one time step, (N, D) -> (N, H), from the current state and moves the
    state on (as a stateful forward of length 1 would), for generating a sequence one token
    at a time; it keeps nothing for backward.
    """

    def __init__(self, Wx: Array, Wh: Array, b: Array, stateful: bool = False) -> None:
        super().__init__()
        expect(Wh.ndim == 2 and Wh.shape[1] == 4 * Wh.shape[0], self.name, "Wh.shape",
               "(H, 4H)", tuple(Wh.shape))
        hidden = Wh.shape[0]
        expect(Wx.ndim == 2 and Wx.shape[1] == 4 * hidden, self.name, "Wx.shape",
               f"(D, {4 * hidden})", tuple(Wx.shape))
        expect(b.shape == (4 * hidden,), self.name, "b.shape", (4 * hidden,), tuple(b.shape))
        self.params = {"Wx": Wx, "Wh": Wh, "b": b}
        self.stateful = stateful
        self.h0: Array | None = None
        self.c0: Array | None = None
        self.dh0: Array | None = None
        self.dc0: Array | None = None
        self.cache: tuple | None = None

    @property
    def hidden_size(self) -> int:
        return self.params["Wh"].shape[0]

    # ------------------------------------------------------------------ state
    def set_state(self, h: Array, c: Array | None = None) -> None:
        """Use (h, c), each (N, H), as the initial state; c defaults to zeros."""
        xp = self._xp(h=h) if c is None else self._xp(h=h, c=c)
        dtype, hidden = self.params["Wh"].dtype, self.hidden_size
        for name, v in (("h", h), ("c", c)):
            if v is None:
                continue
            expect(v.ndim == 2 and v.shape[1] == hidden, self.name, f"{name}.shape",
                   f"(N, {hidden})", tuple(v.shape))
            expect(v.dtype == dtype, self.name, f"{name}.dtype",
                   f"{dtype} (the parameters' dtype)", v.dtype, TypeError)
        if c is not None:
            expect(c.shape == h.shape, self.name, "c.shape", tuple(h.shape), tuple(c.shape))
        self.h0 = h
        self.c0 = xp.zeros_like(h) if c is None else c

    def reset_state(self) -> None:
        """Back to a zero initial state."""
        self.h0 = self.c0 = None

    def _initial(self, xp: object, n: int, dtype: object) -> tuple[Array, Array]:
        if self.h0 is None:
            zeros = xp.zeros((n, self.hidden_size), dtype=dtype)
            return zeros, zeros
        expect(self.h0.shape[0] == n, self.name, "batch size of the state set by set_state",
               self.h0.shape[0], n)
        return self.h0, self.c0

    # ------------------------------------------------------------------ time steps
    def _cell(self, xp: Any, a: Array, c_prev: Array) -> tuple[Array, Array, Array]:
        """Gates from pre-activations a (N, 4H), in place; returns (c, tanh(c), h)."""
        H = self.hidden_size
        _sigmoid_(xp, a[:, :H])
        xp.tanh(a[:, H:2 * H], out=a[:, H:2 * H])
        _sigmoid_(xp, a[:, 2 * H:])
        f, g, i, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        c = f * c_prev
        c += i * g
        tc = xp.tanh(c)
        return c, tc, o * tc

    def forward(self, xs: Array, train: bool = True) -> Array:
        Wx, Wh, b = self.params["Wx"], self.params["Wh"], self.params["b"]
        xp = self._xp(x=xs)
        expect_float_input(self.name, xs, Wx.dtype)
        expect(xs.ndim == 3, self.name, "input ndim (N, T, D)", 3, xs.ndim)
        n, steps, d = xs.shape
        expect(d == Wx.shape[0], self.name, "input features D", Wx.shape[0], d)
        expect(steps > 0, self.name, "sequence length T", "at least 1", steps)
        H = self.hidden_size
        h_init, c_init = self._initial(xp, n, xs.dtype)

        # Every step's input projection in one product, time-major.
        xs_tm = xp.ascontiguousarray(xs.transpose(1, 0, 2)).reshape(steps * n, d)
        gates = matmul(xp, xs_tm, Wx).reshape(steps, n, 4 * H)
        gates += b
        hs = xp.empty((steps, n, H), dtype=xs.dtype)
        cs = xp.empty_like(hs)
        tcs = xp.empty_like(hs)
        h, c = h_init, c_init
        for t in range(steps):
            a = gates[t]
            a += matmul(xp, h, Wh)
            c, tcs[t], hs[t] = self._cell(xp, a, c)
            cs[t] = c
            h = hs[t]
        self.cache = (xs_tm, h_init, c_init, hs, cs, tcs, gates)
        if self.stateful:
            self.h0, self.c0 = hs[-1].copy(), cs[-1].copy()
        return xp.ascontiguousarray(hs.transpose(1, 0, 2))

    def step(self, x_t: Array) -> Array:
        """One time step from the current state, x_t (N, D) -> h (N, H); the state moves on."""
        Wx, Wh, b = self.params["Wx"], self.params["Wh"], self.params["b"]
        xp = self._xp(x=x_t)
        expect_float_input(self.name, x_t, Wx.dtype)
        expect(x_t.ndim == 2 and x_t.shape[1] == Wx.shape[0], self.name, "x_t.shape",
               f"(N, {Wx.shape[0]})", tuple(x_t.shape))
        h, c = self._initial(xp, x_t.shape[0], x_t.dtype)
        a = matmul(xp, x_t, Wx)
        a += matmul(xp, h, Wh)
        a += b
        c, _, h = self._cell(xp, a, c)
        self.h0, self.c0 = h, c
        return h

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("cache")
        Wx, Wh = self.params["Wx"], self.params["Wh"]
        xs_tm, h_init, c_init, hs, cs, tcs, gates = self.cache
        steps, n, H = hs.shape
        xp = self._xp(dout=dout)
        expect(dout.shape == (n, steps, H), self.name, "dout.shape", (n, steps, H),
               tuple(dout.shape))
        dhs = dout.transpose(1, 0, 2)
        da = xp.empty_like(gates)
        dh = xp.zeros((n, H), dtype=dout.dtype)
        dc = xp.zeros_like(dh)
        for t in range(steps - 1, -1, -1):
            g_t = gates[t]
            f, g, i, o = g_t[:, :H], g_t[:, H:2 * H], g_t[:, 2 * H:3 * H], g_t[:, 3 * H:]
            tc = tcs[t]
            c_prev = cs[t - 1] if t else c_init
            dh = dh + dhs[t]
            ds = dc + dh * o * (1 - tc * tc)
            da_t = da[t]
            da_t[:, :H] = ds * c_prev * f * (1 - f)
            da_t[:, H:2 * H] = ds * i * (1 - g * g)
            da_t[:, 2 * H:3 * H] = ds * g * i * (1 - i)
            da_t[:, 3 * H:] = dh * tc * o * (1 - o)
            dc = ds * f
            dh = matmul(xp, da_t, Wh.T)
        self.dh0, self.dc0 = dh, dc

        da2 = da.reshape(steps * n, 4 * H)
        h_prev = xp.concatenate([h_init[None], hs[:-1]]).reshape(steps * n, H)
        self.grads = {"Wx": matmul(xp, xs_tm.T, da2), "Wh": matmul(xp, h_prev.T, da2),
                      "b": da2.sum(axis=0)}
        if not need_input_grad:
            return None
        dxs = matmul(xp, da2, Wx.T).reshape(steps, n, Wx.shape[0])
        return xp.ascontiguousarray(dxs.transpose(1, 0, 2))


class TimeAffine(Layer):
    """y = x W + b on the last axis at every position: x (N, T, D) -> y (N, T, M).

    W: (D, M), b: (M,).  Any number of leading axes works, (N, ..., D) -> (N, ..., M).
    """

    def __init__(self, W: Array, b: Array) -> None:
        super().__init__()
        expect(W.ndim == 2, self.name, "W.ndim", 2, W.ndim)
        expect(b.shape == (W.shape[1],), self.name, "b.shape", (W.shape[1],), tuple(b.shape))
        self.params = {"W": W, "b": b}
        self.x: Array | None = None

    def forward(self, x: Array, train: bool = True) -> Array:
        W, b = self.params["W"], self.params["b"]
        xp = self._xp(x=x)
        expect_float_input(self.name, x, W.dtype)
        expect(x.ndim >= 2 and x.shape[-1] == W.shape[0], self.name,
               "input shape (N, ..., D)", f"(N, ..., {W.shape[0]})", tuple(x.shape))
        self.x = x
        y = matmul(xp, x.reshape(-1, W.shape[0]), W)
        y += b
        return y.reshape(*x.shape[:-1], W.shape[1])

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("x")
        W = self.params["W"]
        xp = self._xp(dout=dout)
        expect(dout.shape == (*self.x.shape[:-1], W.shape[1]), self.name, "dout.shape",
               (*self.x.shape[:-1], W.shape[1]), tuple(dout.shape))
        d2 = dout.reshape(-1, W.shape[1])
        self.grads = {"W": matmul(xp, self.x.reshape(-1, W.shape[0]).T, d2),
                      "b": d2.sum(axis=0)}
        if not need_input_grad:
            return None
        return matmul(xp, d2, W.T).reshape(self.x.shape)


class TimeSoftmaxWithLoss(Layer):
    """Mean cross-entropy of softmax over the last axis, at every position not ignored.

    x: (N, T, V) logits; t: (N, T) integer labels in 0..V-1, or ``ignore_label`` at the
    positions that do not count (padding).  forward returns the mean over the counted
    positions (0 when none counts) on x's device, without a host sync; backward(dout=1)
    returns dx (N, T, V), zero at ignored positions.  Labels are checked like
    :class:`~xpnet.layers.loss.SoftmaxWithLoss` (``validate_labels``).
    """

    validate_labels = True

    def __init__(self, ignore_label: int = -1) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.y: Array | None = None

    def forward(self, x: Array, t: Array, train: bool = True) -> Array:
        xp = self._xp(x=x, t=t)
        expect_float_input(self.name, x)
        expect(x.ndim == 3, self.name, "logits ndim (N, T, V)", 3, x.ndim)
        expect(hasattr(t, "dtype") and t.dtype.kind in "iu", self.name, "label dtype",
               "an integer dtype", getattr(t, "dtype", type(t).__name__), TypeError)
        expect(t.shape == x.shape[:2], self.name, "labels shape (N, T)", tuple(x.shape[:2]),
               tuple(t.shape))
        v = x.shape[2]
        valid = t != self.ignore_label
        labels = xp.where(valid, t, 0).reshape(-1)
        if self.validate_labels and not capturing():
            bad = int(((labels < 0) | (labels >= v)).sum())
            expect(bad == 0, self.name, "labels", f"0..{v - 1} or {self.ignore_label}",
                   f"{bad} label(s) outside that range")
        x2 = x.reshape(-1, v)
        shifted = x2 - x2.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - lse
        rows = xp.arange(x2.shape[0])
        weight = valid.reshape(-1).astype(x.dtype)
        # Mean over counted positions: divide by their number (at least 1), kept on device.
        weight /= xp.maximum(weight.sum(), x.dtype.type(1))
        self.y, self.labels, self.weight, self.x_shape = xp.exp(log_p), labels, weight, x.shape
        return -(log_p[rows, labels] * weight).sum()

    def backward(self, dout: Array | float = 1, need_input_grad: bool = True) -> Array:
        self._need_forward("y")
        xp = self._xp(y=self.y)
        dx = self.y.copy()
        dx[xp.arange(dx.shape[0]), self.labels] -= 1
        dx *= self.weight[:, None]
        if not (isinstance(dout, (int, float)) and dout == 1):
            dx *= dout
        return dx.reshape(self.x_shape)
