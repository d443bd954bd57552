"""SmoothQuant: the same smoothing search as SVDQuant, without the low-rank branch (a W4A4 baseline)."""

from .base import Method

METHOD = Method("smoothquant", "SmoothQuant", "uniform", smooths=True, baselines=("rtn", "w4a16", "smoothquant"))
