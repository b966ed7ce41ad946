"""zdni: layer-wise asynchronous training with synthetic gradients (Decoupled Neural Interfaces)."""

__version__ = "0.1.0"
