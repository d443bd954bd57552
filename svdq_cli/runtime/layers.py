"""Run-time modules: SVDQLinear and VQLinear, with their reference (and, where available, CUDA kernel) forward."""

from torch import nn

from .linear import SVDQLinear
from .vq_linear import VQLinear

__all__ = ["SVDQLinear", "VQLinear", "load_layer"]


def load_layer(tensors: dict, facts: dict) -> nn.Module:
    """A quantized layer from its tensors and format facts: a VQLinear (``format: vq``) or an SVDQLinear."""
    if facts.get("format") == "vq":
        return VQLinear.from_state_dict(tensors, facts)
    return SVDQLinear.from_state_dict(tensors, facts)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
