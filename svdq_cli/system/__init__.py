"""Process plumbing that knows nothing of quantization: the compute device, the thread policy,
torch.distributed, Hub reachability, progress output, shipped data files and atomic, checksummed files.
Imports nothing of svdq but errors.
"""
