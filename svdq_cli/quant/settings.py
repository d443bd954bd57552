"""The settings the SVDQuant math reads, as a protocol: ``methods.config.QuantConfig`` provides them, and quant/
depends on this description rather than on the package above it that names methods."""

from __future__ import annotations

from typing import Protocol

from .formats import Format


class QuantSettings(Protocol):
    """What :mod:`svdq_cli.quant.svdquant` reads of a quantization config (see QuantConfig for each field)."""

    format: Format
    scale_dtype: str
    full_range: bool
    activation_rule: str
    scale_search: bool
    effective_rank: int
    smooths: bool
    alphas: tuple[float, ...]
    smoothing_candidates: tuple[tuple[float, float], ...]
    search: str
    search_rows: int
    search_channels: int
    gptq: bool
    gptq_block: int
    gptq_damp: float
    lowrank_iters: int
    exact_svd_max_elements: int
    seed: int
