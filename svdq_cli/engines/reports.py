"""What quantizing a model reports: one record per layer, and the whole model's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..methods.config import QuantConfig

Progress = Callable[[str, int, int], None]


@dataclass
class LayerReport:
    """What happened to one layer. Errors are measured on calibration rows against the 16-bit layer."""

    name: str
    group: str
    act: str
    alpha: float
    beta: float
    shift: float
    rank: int
    mse_before: float  # naive quantization: RTN weights (and activations), no smoothing, no branch
    mse_after: float
    relative_error_before: float
    relative_error_after: float
    bytes_before: int
    bytes_after: int
    seconds: float


@dataclass
class QuantReport:
    """Per-layer results of :func:`quantize_model`, plus the layers left in 16 bits and why."""

    config: QuantConfig
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": dict(self.skipped),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }
