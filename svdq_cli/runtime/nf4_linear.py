"""NF4Linear: a weight-only NF4 layer (``quant/nf4.py``), the W4A16 baseline the SVDQuant paper reports for
FLUX. Its forward dequantizes the weight to the input's dtype and multiplies in 16 bits, as bitsandbytes does."""

from __future__ import annotations

import torch
from torch import nn

from ..quant import nf4


class NF4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.shape[1] * 2, packed.shape[0]
        self.register_buffer("qweight", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        packed, absmax = nf4.quantize(linear.weight)
        return cls(packed, absmax, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = nf4.dequantize(self.qweight, self.absmax).to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
