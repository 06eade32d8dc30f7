"""Batch Normalization."""

from __future__ import annotations

from xpnet.layers.base import Array, Layer, expect, expect_float_input


class BatchNormalization(Layer):
    """Normalise each feature (2-D input) or each channel (4-D input) over the batch.

    gamma, beta: (D,) for x (N, D), or (C,) for x (N, C, H, W); y has x's shape.

    Training uses the batch statistics and updates the running ones:
    ``running = momentum * running + (1 - momentum) * batch``, both starting at 0
    and using the biased batch variance, as in the book; inference uses the
    running statistics.  (Starting the variance at 1, as PyTorch does, leaves
    inference at chance for several epochs when activations are small.)  Where we
    differ from the book: conv input is normalised per channel (the book flattens
    it to per-pixel features).
    """

    def __init__(self, gamma: Array, beta: Array, momentum: float = 0.9,
                 running_mean: Array | None = None, running_var: Array | None = None,
                 eps: float = 1e-6) -> None:
        super().__init__()
        expect(gamma.ndim == 1, self.name, "gamma.ndim", 1, gamma.ndim)
        expect(beta.shape == gamma.shape, self.name, "beta.shape", tuple(gamma.shape),
               tuple(beta.shape))
        expect(0.0 <= momentum <= 1.0, self.name, "momentum", "in [0, 1]", momentum)
        self.params = {"gamma": gamma, "beta": beta}
        self.buffers = {
            "running_mean": gamma * 0 if running_mean is None else running_mean,
            "running_var": gamma * 0 if running_var is None else running_var,
        }
        self.momentum, self.eps = float(momentum), float(eps)
        self.xn: Array | None = None

    def _axes_and_shape(self, x: Array) -> tuple[tuple[int, ...], tuple[int, ...]]:
        d = self.params["gamma"].shape[0]
        expect(x.ndim in (2, 4), self.name, "input ndim", "2 (N, D) or 4 (N, C, H, W)", x.ndim)
        expect(x.shape[1] == d, self.name, "features/channels (x.shape[1])", d, x.shape[1])
        if x.ndim == 2:
            return (0,), (1, d)
        return (0, 2, 3), (1, d, 1, 1)

    def forward(self, x: Array, train: bool = True) -> Array:
        gamma, beta = self.params["gamma"], self.params["beta"]
        xp = self._xp(x=x, **self.buffers)
        expect_float_input(self.name, x, gamma.dtype)
        axes, shape = self._axes_and_shape(x)
        if train:
            mean = x.mean(axis=axes)
            xc = x - mean.reshape(shape)
            var = (xc * xc).mean(axis=axes)
            m = self.momentum
            for key, batch in (("running_mean", mean), ("running_var", var)):
                running = self.buffers[key]
                running *= m
                running += (1 - m) * batch
        else:
            var = self.buffers["running_var"]
            xc = x - self.buffers["running_mean"].reshape(shape)
        inv_std = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        xn = xc * inv_std.reshape(shape)
        self.xn, self.inv_std, self.train, self.axes, self.shape = xn, inv_std, train, axes, shape
        return xn * gamma.reshape(shape) + beta.reshape(shape)

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("xn")
        gamma = self.params["gamma"]
        self._xp(dout=dout)
        xn, axes, shape = self.xn, self.axes, self.shape
        expect(dout.shape == xn.shape, self.name, "dout.shape", tuple(xn.shape), tuple(dout.shape))
        self.grads = {"gamma": (dout * xn).sum(axis=axes), "beta": dout.sum(axis=axes)}
        scale = (gamma * self.inv_std).reshape(shape)
        if not self.train:  # statistics were constants
            return dout * scale
        # d/dx of (x - mean) / std, with mean and std taken over the batch.
        dx = dout - dout.mean(axis=axes, keepdims=True)
        dx -= xn * (dout * xn).mean(axis=axes, keepdims=True)
        dx *= scale
        return dx
