"""Inverted dropout, each layer with its own seeded random generator."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy

from xpnet.backend import Random, get_array_module, get_rng
from xpnet.layers.base import Array, Layer, expect, expect_float_input

# Dropout seeds are spawned from xpnet's seed on a stream of their own, so adding a
# Dropout layer does not shift the weights the initialisers draw after it.
_STREAM_KEY = 0x64726F70  # "drop"
_seeds_lock = threading.Lock()
_seeds_source: Random | None = None  # get_rng("numpy") when the stream below was made
_seeds: numpy.random.SeedSequence | None = None


def _next_seed() -> int:
    """The next Dropout seed since the last ``xpnet.backend.seed`` call."""
    global _seeds_source, _seeds
    with _seeds_lock:
        source = get_rng("numpy")  # a new object after every xpnet.backend.seed()
        if source is not _seeds_source or _seeds is None:
            _seeds_source = source
            _seeds = numpy.random.SeedSequence(source.seed, spawn_key=(_STREAM_KEY,))
        child = _seeds.spawn(1)[0]
    return _bits63(child)


def _generator_seed(seed: int) -> int:
    # Dropout(seed=3) and xpnet.backend.seed(3) must not share one stream.
    return _bits63(numpy.random.SeedSequence(seed, spawn_key=(_STREAM_KEY,)))


def _bits63(seq: numpy.random.SeedSequence) -> int:
    return int(seq.generate_state(1, numpy.uint64)[0] >> numpy.uint64(1))


class Dropout(Layer):
    """Zeroes each unit with probability ``dropout_ratio`` while training.

    Unlike the book (which scales by (1 - ratio) at inference), this is *inverted*
    dropout: kept units are scaled by 1/(1 - ratio) during training, so inference
    is the identity.

    Each layer draws its masks from a generator of its own, so networks trained at
    the same time in several threads each repeat what they do alone.  Its seed is
    ``seed`` if given, else the next of a sequence that ``xpnet.backend.seed(s)``
    restarts: seeding and then building the same networks in the same order gives
    the same masks.  Seeding after a layer is built leaves that layer's generator as
    it is.  The generator is made, from the layer's seed, on the device of the first
    input that needs it (NumPy or CuPy): after the network moves, masks come from a
    generator on the new device.

    ``get_rng_state()`` gives the NumPy generator's state (a JSON-able dict of the
    bit generator), or None when the layer last ran on CuPy, whose generator state
    cannot be exported; ``set_rng_state(state)`` restores such a dict (None leaves the
    generator as it is), so a checkpoint can resume the same masks.  To see the same
    masks in several passes (a numerical gradient check), read the state before the
    first pass and set it back before each.
    """

    def __init__(self, dropout_ratio: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        expect(0.0 <= dropout_ratio < 1.0, self.name, "dropout_ratio", "in [0, 1)",
               dropout_ratio)
        expect(seed is None or (isinstance(seed, int | numpy.integer)
                                and not isinstance(seed, bool)),
               self.name, "seed", "None or an integer", repr(seed), TypeError)
        expect(seed is None or seed >= 0, self.name, "seed", ">= 0", seed)
        self.dropout_ratio = float(dropout_ratio)
        self.seed = int(seed) if seed is not None else _next_seed()
        self.mask: Array | None = None
        self._rngs: dict[Any, Random] = {}  # per device: "numpy", or ("cupy", device id)
        self._last_device: Any = None

    # -------------------------------------------------------------- random state
    def _rng(self, x: Array) -> Random:
        """The generator on x's device, made on first use."""
        xp = get_array_module(x)
        on_host = xp.__name__ == "numpy"
        key = "numpy" if on_host else (xp.__name__, x.device.id)
        rng = self._rngs.get(key)
        if rng is None:
            with contextlib.nullcontext() if on_host else x.device:
                rng = self._rngs[key] = Random(xp.__name__, _generator_seed(self.seed))
        self._last_device = key
        return rng

    def get_rng_state(self) -> dict | None:
        """The NumPy generator's state (JSON-able); None if the layer last ran on CuPy."""
        if self._last_device not in (None, "numpy"):
            return None
        rng = self._rngs.get("numpy")
        if rng is None:
            rng = self._rngs["numpy"] = Random("numpy", _generator_seed(self.seed))
        return rng.get_state()["bit_generator"]

    def set_rng_state(self, state: dict | None) -> None:
        """Restore a state from :meth:`get_rng_state` into the NumPy generator.

        None (what a layer on CuPy gives) leaves the generators as they are.
        """
        if state is None:
            return
        rng = Random("numpy", _generator_seed(self.seed))
        try:
            if not isinstance(state, dict):
                raise TypeError(f"expected a dict, received {type(state).__name__}")
            rng.set_state({"bit_generator": state})
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{self.name}: random state: expected a state from "
                             f"get_rng_state(), received one that does not fit ({exc})"
                             ) from None
        self._rngs["numpy"] = rng

    # -------------------------------------------------------------- forward/backward
    def forward(self, x: Array, train: bool = True) -> Array:
        expect_float_input(self.name, x)
        if not train or self.dropout_ratio == 0.0:
            self.mask = None
            self._identity = True
            return x
        self._identity = False
        scale = x.dtype.type(1.0 / (1.0 - self.dropout_ratio))
        keep = self._rng(x).random(x.shape, dtype=x.dtype) >= self.dropout_ratio
        self.mask = keep * scale  # scaled mask, in x's dtype
        return x * self.mask

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        if getattr(self, "_identity", None) is None:
            raise RuntimeError(f"{self.name}.backward called before forward")
        if self._identity:
            return dout
        self._xp(dout=dout, mask=self.mask)
        return dout * self.mask
