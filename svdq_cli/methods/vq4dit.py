"""VQ4DiT (Deng et al., arXiv 2408.17131): 2-/3-bit vector-quantized weights whose codebooks and assignments
are calibrated block by block without data."""

from .base import VECTOR_BASELINES, Method

METHOD = Method("vq4dit", "VQ4DiT", "vector", calibrates_assignments=True, file_tag="vq", baselines=VECTOR_BASELINES)
