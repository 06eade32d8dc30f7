"""NIC, the captioning model of ``ch8_captioning.py``: a CNN encoder and an LSTM decoder.

As in "Show and Tell" (Vinyals et al. 2015), the book's section 8.5.3: a convolutional
network turns the image into one feature vector, and a recurrent network, started from
that feature, writes the caption one word at a time::

    image -> encoder (convolutions, pooling, Affine) -> feature (N, F)
          -> Affine -> [h0 | c0] (N, 2H), the LSTM's initial state
    tokens[:, :-1] -> Embedding -> LSTM -> TimeAffine -> scores (N, T, V)
    scores, tokens[:, 1:] -> TimeSoftmaxWithLoss (padding ignored)

Training feeds the true previous word at every step (teacher forcing); the image reaches
the decoder only through its initial state, so its gradient comes back from the LSTM's
``dh0`` and ``dc0`` into the Affine and the encoder.  (NIC feeds the image as the LSTM's
first input, which sets both h and c; here one Affine gives both.  With h0 alone, c0 = 0,
the image reaches the first cell only through the gates, and on the digit canvases the
encoder learned far more slowly: after 1000 steps of 64 canvases the training loss, 1.68
per token, was still about what knowing only the captions' lengths gives, against 1.05
after 600 steps with both.)  :meth:`CaptionModel.generate` decodes greedily: from ``<start>``
it feeds each step's most likely word to the next (``LSTM.step``) until ``<end>``.

This module imports only xpnet (no sibling of ``examples/``), so the tests load it by
file path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xpnet.backend import get_default_dtype, xp
from xpnet.datasets.canvas import END_ID, PAD_ID, START_ID
from xpnet.init import init_weight
from xpnet.layers import (
    LSTM,
    Affine,
    BatchNormalization,
    Chain,
    Convolution,
    ConvReLU,
    Embedding,
    Flatten,
    Layer,
    Pooling,
    ReLU,
    TimeAffine,
    TimeSoftmaxWithLoss,
)
from xpnet.layers.compose import named_slots

Array = Any

__all__ = ["CaptionModel", "conv_encoder"]


def conv_encoder(channels: Sequence[int] = (8, 16, 32, 64), image_size: int = 64,
                 feature_size: int | None = None, in_channels: int = 1,
                 batch_norm: bool = True, dtype: Any = None) -> tuple[Chain, int]:
    """The CNN: per entry of ``channels`` a 3x3 convolution (+ BatchNorm), ReLU and a 2x2
    max pooling, then Flatten (and, with a ``feature_size``, Affine(feature_size), ReLU).
    Returns (chain, size of the feature it outputs).

    The last feature map is flattened, not averaged: the caption lists the digits left to
    right, so the feature must keep where each one is.
    """
    dtype = get_default_dtype() if dtype is None else dtype
    layers: list[Layer] = []
    c_in, side = in_channels, image_size
    for c_out in channels:
        W = init_weight((c_out, c_in, 3, 3), "he", dtype)
        b = xp.zeros(c_out, dtype=W.dtype)
        if batch_norm:
            layers += [Convolution(W, b, stride=1, pad=1),
                       BatchNormalization(xp.ones(c_out, dtype=W.dtype),
                                          xp.zeros(c_out, dtype=W.dtype)), ReLU()]
        else:
            layers.append(ConvReLU(W, b, stride=1, pad=1))
        layers.append(Pooling(2, 2, stride=2))
        c_in, side = c_out, side // 2
    flat = c_in * side * side
    layers.append(Flatten())
    if feature_size is None:
        return Chain(*layers), flat
    W = init_weight((flat, feature_size), "he", dtype)
    layers += [Affine(W, xp.zeros(feature_size, dtype=W.dtype)), ReLU()]
    return Chain(*layers), feature_size


class CaptionModel:
    """Encoder feature -> Affine -> LSTM (h0, c0); Embedding -> LSTM -> TimeAffine -> loss.

    ``encoder`` maps images (N, C, H, W) to features (N, feature_size) (see
    :func:`conv_encoder`).  Token sequences are ``<start> words <end> <pad>...`` over a
    vocabulary of ``vocab_size`` ids (``xpnet.datasets.canvas.VOCAB``).

    ``params`` names every trainable array (``encoder.W1``, ``init.W``, ``embed.W``,
    ``lstm.Wx`` ...); ``gradient`` returns their gradients under the same names, so an
    optimizer updates them with ``opt.update(model.params, grads)``.
    """

    def __init__(self, encoder: Layer, feature_size: int, vocab_size: int, embed_size: int,
                 hidden_size: int, dtype: Any = None) -> None:
        dtype = get_default_dtype() if dtype is None else dtype
        H = hidden_size
        self.encoder = encoder
        self.init = Affine(init_weight((feature_size, 2 * H), "xavier", dtype),
                           xp.zeros(2 * H, dtype=dtype))
        self.embed = Embedding(init_weight((vocab_size, embed_size), "xavier", dtype))
        b = xp.zeros(4 * H, dtype=dtype)
        b[:H] = 1  # forget gate open at the start (gate order f, g, i, o)
        self.lstm = LSTM(init_weight((embed_size, 4 * H), "xavier", dtype),
                         init_weight((H, 4 * H), "xavier", dtype), b)
        self.project = TimeAffine(init_weight((H, vocab_size), "xavier", dtype),
                                  xp.zeros(vocab_size, dtype=dtype))
        self.loss_layer = TimeSoftmaxWithLoss(ignore_label=PAD_ID)
        enc_params, enc_buffers = named_slots(encoder)
        self._slots = {f"encoder.{k}": v for k, v in enc_params.items()}
        self._buffer_slots = {f"encoder.{k}": v for k, v in enc_buffers.items()}
        for prefix, layer in (("init", self.init), ("embed", self.embed), ("lstm", self.lstm),
                              ("project", self.project)):
            self._slots.update({f"{prefix}.{k}": (layer, k) for k in layer.params})

    # ------------------------------------------------------------------ parameters
    @property
    def params(self) -> dict[str, Array]:
        """Every trainable array by name (the layers' own arrays, not copies)."""
        return {name: layer.params[k] for name, (layer, k) in self._slots.items()}

    @property
    def buffers(self) -> dict[str, Array]:
        """Non-trainable state (BatchNorm's running statistics) by name."""
        return {name: layer.buffers[k] for name, (layer, k) in self._buffer_slots.items()}

    @property
    def num_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    # ------------------------------------------------------------------ training
    def loss(self, images: Array, tokens: Array, train: bool = True) -> Array:
        """Mean cross-entropy of each next token given the image and the true previous ones.

        images (N, C, H, W) float; tokens (N, T + 1) int: the inputs are ``tokens[:, :-1]``,
        the targets ``tokens[:, 1:]`` (positions whose target is ``<pad>`` do not count).
        Returns a 0-d array on the backend.
        """
        return self.loss_layer.forward(self.scores(images, tokens[:, :-1], train),
                                       tokens[:, 1:], train)

    def scores(self, images: Array, inputs: Array, train: bool = True) -> Array:
        """Next-token scores (N, T, V) after each of the input tokens (N, T)."""
        self._start(images, train)
        hs = self.lstm.forward(self.embed.forward(inputs, train), train)
        return self.project.forward(hs, train)

    def backward(self) -> dict[str, Array]:
        """Gradients of the last :meth:`loss` by parameter name."""
        dscores = self.loss_layer.backward(1)
        dhs = self.project.backward(dscores)
        self.embed.backward(self.lstm.backward(dhs))
        # The image enters only as the initial state: (dh0, dc0) is its gradient.
        dfeature = self.init.backward(xp.concatenate([self.lstm.dh0, self.lstm.dc0], axis=1))
        self.encoder.backward(dfeature, need_input_grad=False)
        return {name: layer.grads[k] for name, (layer, k) in self._slots.items()}

    def gradient(self, images: Array, tokens: Array) -> dict[str, Array]:
        """Forward in training mode, then backward; the loss is kept as ``last_loss``."""
        self.last_loss = self.loss(images, tokens, train=True)
        return self.backward()

    def _start(self, images: Array, train: bool) -> None:
        """Encode the images and set the LSTM's initial state (h0, c0) from the feature."""
        H = self.lstm.hidden_size
        state = self.init.forward(self.encoder.forward(images, train), train)
        self.lstm.set_state(xp.ascontiguousarray(state[:, :H]),
                            xp.ascontiguousarray(state[:, H:]))

    # ------------------------------------------------------------------ generation
    def generate(self, images: Array, max_words: int) -> Array:
        """Greedy captions: token ids (N, max_words + 1), each row ``words <end> <pad>...``.

        From ``<start>``, each step's most likely token (among ``<end>`` and the words:
        ``<pad>`` and ``<start>`` are never targets) is the next step's input, until
        every row has produced ``<end>`` (or ``max_words + 1`` tokens; a row then lacks
        ``<end>``).  Tokens after a row's ``<end>`` are ``<pad>``.
        """
        n = images.shape[0]
        self._start(images, False)
        out = xp.full((n, max_words + 1), PAD_ID, dtype=xp.int32)
        done = xp.zeros(n, dtype=bool)
        ids = xp.full(n, START_ID, dtype=xp.int32)
        try:
            for t in range(max_words + 1):
                h = self.lstm.step(self.embed.forward(ids, False))
                scores = self.project.forward(h, False)
                # <pad> and <start> are never targets: pick among <end> and the words
                ids = (scores[:, END_ID:].argmax(axis=1) + END_ID).astype(xp.int32)
                out[:, t] = xp.where(done, PAD_ID, ids)
                done |= ids == END_ID
                if bool(done.all()):
                    break
        finally:
            self.lstm.reset_state()
        return out
