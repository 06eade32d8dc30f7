"""xpnet: deep learning from scratch on NumPy (CPU) or CuPy (NVIDIA GPU)."""

__version__ = "0.1.0"
