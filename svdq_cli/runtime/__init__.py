"""Run-time modules: SVDQLinear and its reference (and, where available, fused CUDA) forward."""

from .linear import SVDQLinear

__all__ = ["SVDQLinear"]
