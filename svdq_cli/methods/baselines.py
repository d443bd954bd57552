"""The configs a run is measured against, in one place: validation's baselines, the per-layer report's naive
RTN, and the uniform baseline of the VQ methods."""

from __future__ import annotations

import dataclasses

from ..quant import nf4
from .config import QuantConfig

UNIFORM_FIELDS = {  # each of base.UNIFORM_BASELINES, at the run's precision and number formats
    "rtn": {"method": "rtn"},
    "w4a16": {"method": "rtn", "weight_only": True},
    "smoothquant": {"method": "smoothquant"},
}


NF4 = "nf4"  # weight-only NF4 (quant/nf4.py): layers of their own kind, not a config of the uniform engine


def baseline_fields(config: QuantConfig, baseline: str) -> dict:
    """What determines a baseline's layers besides the calibration data, for keys that name its results."""
    if baseline == NF4:
        return {"format": NF4, "block": nf4.BLOCK, "absmax": "float32"}
    return dataclasses.asdict(baseline_config(config, baseline))


def baseline_config(config: QuantConfig, baseline: str) -> QuantConfig:
    """``baseline`` (one of the run's method's :attr:`~svdq_cli.methods.base.Method.baselines`) at the run's
    number formats; for a VQ run, RTN weight-only at its bits (``rtn``) or codebook-only k-means (``kmeans``)."""
    if config.is_vector:
        return dataclasses.replace(config, method="kmeans") if baseline == "kmeans" else uniform_at_bits(config)
    return QuantConfig(precision=config.precision, scale_dtype=config.scale_dtype, seed=config.seed,
                       search_rows=config.search_rows, calib_rows=config.calib_rows, version=config.version,
                       full_range=config.full_range, scale_search=config.scale_search, search=config.search,
                       **UNIFORM_FIELDS[baseline])


def naive_config(config: QuantConfig) -> QuantConfig:
    """Naive quantization at ``config``'s number formats (version, range) without smoothing, branch or scale
    search: the ``before`` of a uniform layer's report."""
    return QuantConfig(method="rtn", precision=config.precision, weight_only=config.weight_only,
                       scale_dtype=config.scale_dtype, version=config.version, full_range=config.full_range,
                       scale_search=False)


def uniform_at_bits(config: QuantConfig) -> QuantConfig:
    """RTN weight-only at a VQ config's bits (group 64): the uniform baseline VQ is measured against."""
    return QuantConfig(method="rtn", precision=f"int{config.bits}", weight_only=True, scale_search=False,
                       seed=config.seed)
