"""svdq: SVDQuant W4A4 (and VQ4DiT 2-/3-bit) post-training quantization for diffusion transformers.

Public API::

    from svdq_cli import QuantConfig, quantize_model
    report = quantize_model(model, calibrate=lambda m: m(example), config=QuantConfig(rank=32))
"""

__version__ = "0.1.0"

from .api import LayerReport, QuantReport, quantize_model  # noqa: E402
from .errors import BadInputError, SvdqError  # noqa: E402
from .quant.config import QuantConfig  # noqa: E402
from .runtime.linear import SVDQLinear  # noqa: E402
from .runtime.vq_linear import VQLinear  # noqa: E402

__all__ = [
    "BadInputError",
    "LayerReport",
    "QuantConfig",
    "QuantReport",
    "SVDQLinear",
    "SvdqError",
    "VQLinear",
    "__version__",
    "quantize_model",
]
