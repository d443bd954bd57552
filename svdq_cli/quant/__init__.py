"""Pure quantization math on tensors: formats, packing, smoothing, low rank, GPTQ, SVDQuant.

Nothing here touches files, CLIs or diffusers, and nothing imports the rest of svdq_cli.
"""

from .config import QuantConfig
from .formats import FORMATS, Format, QTensor, dequantize, fake_quantize, get_format, quantize
from .packing import pack_nibbles, unpack_nibbles

__all__ = [
    "FORMATS",
    "Format",
    "QTensor",
    "QuantConfig",
    "dequantize",
    "fake_quantize",
    "get_format",
    "pack_nibbles",
    "quantize",
    "unpack_nibbles",
]
