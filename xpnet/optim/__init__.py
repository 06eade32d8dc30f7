"""Optimizers, learning-rate schedules and gradient clipping (book chapter 6).

The optimizers keep the book's interface and defaults: ``opt.update(params, grads)``
with ``params`` and ``grads`` dicts of arrays under the same keys, e.g.::

    from xpnet.optim import Adam
    opt = Adam(lr=0.001)
    for step in range(n):
        grads = net.gradient(x, t)
        opt.update(net.params, grads)

=========  ===============================================================  ==========
class      update rule (per key; state starts at zero)                      defaults
=========  ===============================================================  ==========
SGD        ``p -= lr*g``                                                    lr=0.01
Momentum   ``v = momentum*v - lr*g; p += v``                                lr=0.01,
                                                                            momentum=0.9
Nesterov   ``v *= mu; v -= lr*g; p += mu*mu*v; p -= (1+mu)*lr*g``           lr=0.01,
                                                                            momentum=0.9
AdaGrad    ``h += g*g; p -= lr*g/(sqrt(h)+1e-7)``                           lr=0.01
RMSprop    ``h *= d; h += (1-d)*g*g; p -= lr*g/(sqrt(h)+1e-7)``             lr=0.01,
                                                                            decay_rate=0.99
Adam       ``t += 1; lr_t = lr*sqrt(1-b2**t)/(1-b1**t);``                   lr=0.001,
           ``m += (1-b1)*(g-m); v += (1-b2)*(g*g-v);``                      beta1=0.9,
           ``p -= lr_t*m/(sqrt(v)+1e-7)``                                   beta2=0.999
AdamW      Adam, and first ``p -= lr*weight_decay*p`` for keys picked by    weight_decay
           ``decay_filter`` (default: names starting with 'W')              =0.01
=========  ===============================================================  ==========

Where we differ from the book:

* **In place, allocation-light.** Parameters are updated in place (the layers share
  the arrays) with ufuncs writing into ``out=`` buffers: per key the state arrays plus
  one scratch buffer, so a step makes no temporaries. Where the book writes
  ``lr*g/(sqrt(h)+eps)`` we compute ``(g/(sqrt(h)+eps))*lr``: the same rule, rounded in
  another order (a last-place difference).
* **State keeps the params' dtype and device.** State is made with ``zeros_like`` of
  the parameter, so float32 parameters get float32 state on their own backend
  (NumPy or CuPy), and all scalars are Python floats, so nothing is promoted to
  float64 (with NumPy 2, the book's ``np.sqrt(...)`` step size of Adam, a NumPy
  float64, would turn float32 parameters' updates into float64 arithmetic).
* **AdamW** (decoupled weight decay, Loshchilov & Hutter 2019) is added.
* **Checks**: a missing gradient or a shape mismatch raises GradientMismatchError
  naming the key and both shapes before anything changes.
* **Checkpoints**: ``state_dict()`` / ``load_state_dict()`` export and restore the
  state; ``clip_norm=`` applies :func:`clip_grad_norm` before each update.
* Learning-rate schedules (:class:`StepLR`, :class:`CosineLR`) set ``optimizer.lr``.

This package imports only :mod:`xpnet.backend`: it knows arrays, not layers.
"""

from xpnet.optim.base import GradientMismatchError, Optimizer
from xpnet.optim.clip import clip_grad_norm, global_grad_norm
from xpnet.optim.optimizers import (
    OPTIMIZERS,
    SGD,
    AdaGrad,
    Adam,
    AdamW,
    Momentum,
    Nesterov,
    RMSprop,
    default_decay_filter,
    get_optimizer,
)
from xpnet.optim.schedules import CosineLR, LRSchedule, StepLR

__all__ = [
    "Optimizer",
    "GradientMismatchError",
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "default_decay_filter",
    "OPTIMIZERS",
    "get_optimizer",
    "LRSchedule",
    "StepLR",
    "CosineLR",
    "clip_grad_norm",
    "global_grad_norm",
]
