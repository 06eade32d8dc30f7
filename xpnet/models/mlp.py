"""Fully connected networks: the book's MultiLayerNet and MultiLayerNetExtend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xpnet.init import init_weight
from xpnet.layers import Affine, BatchNormalization, Dropout, Layer, ReLU, Sigmoid, Tanh
from xpnet.models._util import float_dtype, init_spec, ones, positive_int, zeros
from xpnet.models.network import Sequential, check_lambda

__all__ = ["ACTIVATIONS", "MultiLayerNet", "MultiLayerNetExtend"]

#: activation names accepted by the networks (case-insensitive)
ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def _activation(model: str, name: Any) -> str:
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in ACTIVATIONS:
        raise ValueError(f"{model}: activation: expected one of "
                         f"{', '.join(map(repr, ACTIVATIONS))}, got {name!r}")
    return key


def _sizes(model: str, input_size: Any, hidden_size_list: Any, output_size: Any) -> list[int]:
    if isinstance(hidden_size_list, (str, bytes)) or not isinstance(hidden_size_list, Sequence):
        raise TypeError(f"{model}: hidden_size_list: expected a list of integers, "
                        f"got {hidden_size_list!r}")
    return ([positive_int(model, "input_size", input_size)]
            + [positive_int(model, f"hidden_size_list[{i}]", n)
               for i, n in enumerate(hidden_size_list)]
            + [positive_int(model, "output_size", output_size)])


def _build(model: str, sizes: list[int], activation: str, spec: Any, dtype: Any,
           use_batchnorm: bool = False, dropout_ratio: float | None = None) -> list[Layer]:
    """Affine -> [BatchNorm] -> activation -> [Dropout] per hidden layer, then Affine.

    Each W is drawn with the std that ``spec`` gives for its fan-in, the previous
    layer's size (the book's ``all_size_list[idx - 1]``).
    """
    layers: list[Layer] = []
    for i in range(1, len(sizes)):
        W = init_weight((sizes[i - 1], sizes[i]), spec, dtype)
        layers.append(Affine(W, zeros(sizes[i], dtype)))
        if i == len(sizes) - 1:
            break
        if use_batchnorm:
            layers.append(BatchNormalization(ones(sizes[i], dtype), zeros(sizes[i], dtype)))
        layers.append(ACTIVATIONS[activation]())
        if dropout_ratio is not None:
            layers.append(Dropout(dropout_ratio))
    return layers


class MultiLayerNet(Sequential):
    """A fully connected network: (Affine -> activation) per hidden layer, Affine, softmax.

    Args:
        input_size: features per sample (784 for MNIST).
        hidden_size_list: units of each hidden layer, e.g. [100, 100, 100].
        output_size: number of classes.
        activation: 'relu', 'sigmoid' or 'tanh'.
        weight_init_std: a number, or 'relu'/'he' (sqrt(2/n)) or 'sigmoid'/'xavier'
            (sqrt(1/n)), n being the previous layer's size.
        weight_decay_lambda: L2 weight decay on every W.
        dtype: the parameters' dtype (default: xpnet's default dtype, float32).

    params: W1, b1, ..., W{L}, b{L} with L = len(hidden_size_list) + 1.
    """

    model_name = "mlp"

    def __init__(self, input_size: int, hidden_size_list: Sequence[int], output_size: int,
                 activation: str = "relu", weight_init_std: float | str = "relu",
                 weight_decay_lambda: float = 0, dtype: Any = None) -> None:
        self._build_mlp(input_size, hidden_size_list, output_size, activation,
                        weight_init_std, weight_decay_lambda, dtype)

    def _build_mlp(self, input_size: Any, hidden_size_list: Any, output_size: Any,
                   activation: Any, weight_init_std: Any, weight_decay_lambda: Any,
                   dtype: Any, use_batchnorm: bool = False, dropout_ratio: float | None = None,
                   extra_config: dict | None = None) -> None:
        """Validate the arguments, build the layers and set up the container."""
        name = type(self).__name__
        sizes = _sizes(name, input_size, hidden_size_list, output_size)
        activation = _activation(name, activation)
        spec = init_spec(weight_init_std)
        dt = float_dtype(name, dtype)
        lam = check_lambda(weight_decay_lambda)
        self.input_size, self.output_size = sizes[0], sizes[-1]
        self.hidden_size_list = sizes[1:-1]
        self.hidden_layer_num = len(self.hidden_size_list)
        self.activation = activation
        config = {"input_size": sizes[0], "hidden_size_list": sizes[1:-1],
                  "output_size": sizes[-1], "activation": activation,
                  "weight_init_std": spec, "weight_decay_lambda": lam,
                  **(extra_config or {}), "dtype": dt.name}
        layers = _build(name, sizes, activation, spec, dt, use_batchnorm=use_batchnorm,
                        dropout_ratio=dropout_ratio)
        Sequential.__init__(self, layers, weight_decay_lambda=lam, config=config,
                            input_shape=(sizes[0],))


class MultiLayerNetExtend(MultiLayerNet):
    """MultiLayerNet with optional Batch Normalization and Dropout.

    Per hidden layer: Affine -> [BatchNorm] -> activation -> [Dropout]; then Affine
    and softmax.  ``dropout_ration`` (the book's spelling) is accepted as an alias
    of ``dropout_ratio``.  BatchNorm's gamma starts at ones and beta at zeros.

    params: W1, b1, ..., W{L}, b{L}, and gamma1, beta1, ... per hidden layer with
    batch norm; buffers: running_mean1, running_var1, ...
    """

    model_name = "mlp-extend"

    def __init__(self, input_size: int, hidden_size_list: Sequence[int], output_size: int,
                 activation: str = "relu", weight_init_std: float | str = "relu",
                 weight_decay_lambda: float = 0, use_dropout: bool = False,
                 dropout_ratio: float = 0.5, use_batchnorm: bool = False, *,
                 dropout_ration: float | None = None, dtype: Any = None) -> None:
        name = type(self).__name__
        if dropout_ration is not None:
            if dropout_ratio != 0.5 and dropout_ratio != dropout_ration:
                raise ValueError(f"{name}: dropout_ratio={dropout_ratio!r} and "
                                 f"dropout_ration={dropout_ration!r} disagree; give one")
            dropout_ratio = dropout_ration
        self.use_dropout, self.use_batchnorm = bool(use_dropout), bool(use_batchnorm)
        self.dropout_ratio = float(dropout_ratio)
        self._build_mlp(input_size, hidden_size_list, output_size, activation,
                        weight_init_std, weight_decay_lambda, dtype,
                        use_batchnorm=self.use_batchnorm,
                        dropout_ratio=self.dropout_ratio if self.use_dropout else None,
                        extra_config={"use_dropout": self.use_dropout,
                                      "dropout_ratio": self.dropout_ratio,
                                      "use_batchnorm": self.use_batchnorm})
