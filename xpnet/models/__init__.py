"""Networks: one container (:class:`Sequential`) and the book's four networks.

``build_model(name, **kwargs)`` builds one by name ('mlp', 'mlp-extend',
'simple-convnet', 'deep-convnet'); ``build_model(net.model_name, **net.config)``
rebuilds a network with fresh weights, ready for ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

from xpnet.book_weights import import_book_params
from xpnet.models.convnet import DeepConvNet, SimpleConvNet
from xpnet.models.mlp import ACTIVATIONS, MultiLayerNet, MultiLayerNetExtend
from xpnet.models.network import LoadReport, Network, ParamMap, Sequential
from xpnet.models.zoo import VGG, GoogLeNet, ResNet

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "DeepConvNet",
    "GoogLeNet",
    "ResNet",
    "VGG",
    "MultiLayerNet",
    "MultiLayerNetExtend",
    "LoadReport",
    "Network",
    "ParamMap",
    "Sequential",
    "SimpleConvNet",
    "build_model",
    "import_book_params",
]

#: the networks by the names the command line uses
MODELS: dict[str, type[Sequential]] = {
    cls.model_name: cls
    for cls in (MultiLayerNet, MultiLayerNetExtend, SimpleConvNet, DeepConvNet, VGG, GoogLeNet,
                ResNet)
}


def build_model(name: str, **kwargs: Any) -> Sequential:
    """Build the network called ``name`` ('mlp', 'mlp-extend', 'simple-convnet',
    'deep-convnet'; case-insensitive, '_' for '-' accepted) with ``kwargs``."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    cls = MODELS.get(key)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return cls(**kwargs)
