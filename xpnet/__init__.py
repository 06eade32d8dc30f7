"""xpnet: deep learning from scratch on NumPy (CPU) or CuPy (NVIDIA GPU).

The book's names are the public API, one module per idea:

* :mod:`xpnet.backend`: the ``xp`` shim (NumPy or CuPy), transfers, dtype, random source;
* :mod:`xpnet.layers`: one class per layer, forward and backward side by side;
* :mod:`xpnet.models`: ``MultiLayerNet``, ``MultiLayerNetExtend``, ``SimpleConvNet``,
  ``DeepConvNet``;
* :mod:`xpnet.optim`: SGD ... Adam, AdamW, learning-rate schedules, gradient clipping;
* :mod:`xpnet.datasets`: MNIST (bundled) and Fashion-MNIST as host arrays;
* :mod:`xpnet.train`: ``Trainer``, checkpoints, the ``train.py`` command line;
* :mod:`xpnet.gradcheck`: numerical gradients; :mod:`xpnet.util`: the rest of the book's
  ``common.util`` (``smooth_curve``, ``im2col`` in the book's layout ...).

``xpnet.__version__`` is the installed distribution's version.
"""

from __future__ import annotations


def _version() -> str:
    """The installed distribution's version; from a checkout that is not installed, the
    version in its pyproject.toml; else '0+unknown'."""
    from importlib import metadata  # noqa: PLC0415 - keep `import xpnet` light

    try:
        return metadata.version("xpnet")
    except metadata.PackageNotFoundError:
        pass
    from pathlib import Path  # noqa: PLC0415

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib  # noqa: PLC0415

        project = tomllib.loads(pyproject.read_text("utf-8")).get("project", {})
    except (OSError, ValueError):
        return "0+unknown"
    version = project.get("version") if project.get("name") == "xpnet" else None
    return version if isinstance(version, str) else "0+unknown"


__version__: str = _version()
