"""Round-to-nearest: group-wise scales and nothing else (naive W4A4, W4A16 weight-only, and int2/int3 weights as
the VQ methods' uniform baseline)."""

from .base import Method

METHOD = Method("rtn", "RTN", "uniform", baselines=("rtn", "w4a16", "smoothquant"))
