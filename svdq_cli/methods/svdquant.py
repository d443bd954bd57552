"""SVDQuant (Li et al., arXiv 2411.05007): smoothing, a 16-bit low-rank branch, a 4-bit residual (W4A4)."""

from .base import UNIFORM_BASELINES, Method

METHOD = Method("svdquant", "SVDQuant", "uniform", smooths=True, low_rank=True,
                baselines=UNIFORM_BASELINES)
