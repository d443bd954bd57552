"""SmoothQuant: the same smoothing search as SVDQuant, without the low-rank branch (a W4A4 baseline)."""

from .base import UNIFORM_BASELINES, Method

METHOD = Method("smoothquant", "SmoothQuant", "uniform", smooths=True, baselines=UNIFORM_BASELINES)
