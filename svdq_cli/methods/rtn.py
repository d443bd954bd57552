"""Round-to-nearest: group-wise scales and nothing else (naive W4A4, W4A16 weight-only, and int2/int3 weights as
the VQ methods' uniform baseline)."""

from .base import UNIFORM_BASELINES, Method

METHOD = Method("rtn", "RTN", "uniform", baselines=UNIFORM_BASELINES)
