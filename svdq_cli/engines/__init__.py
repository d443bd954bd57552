"""The quantization engines the methods run on: ``uniform`` (group-wise INT/NVFP4 scales with smoothing and the
low-rank branch: svdquant, smoothquant, rtn) and ``vector`` (codebooks calibrated block by block: vq4dit,
kmeans), and the per-layer ``reports``. May import models/ and everything below it.
"""
