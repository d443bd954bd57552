"""k-means VQ: VQ4DiT's baseline; the k-means assignments are kept and only the codebook is calibrated."""

from .base import VECTOR_BASELINES, Method

METHOD = Method("kmeans", "k-means (codebook-only)", "vector", file_tag="kmvq", baselines=VECTOR_BASELINES)
