"""Where a run computes: ``auto`` (CUDA when this torch has a device, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. The device changes where a run computes, never what it computes, so it is in no stage's hash."""

from __future__ import annotations

import torch

from ..errors import BadInputError

CHOICES = "auto, cpu, cuda or cuda:N"


def valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = name.partition(":")
    return prefix == "cuda" and index.isdigit()


def resolve_device(requested: str) -> str:
    """The concrete device for ``requested``.

    Raises:
        BadInputError: an unknown name, or a CUDA device this machine does not have (naming the fix).
    """
    if not valid_device(requested):
        raise BadInputError(f"device {requested!r} is invalid (allowed: {CHOICES})")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible CUDA device"
            raise BadInputError(f"device {requested!r} is not available (torch {torch.__version__}: {build}); "
                                "use --device cpu, or --device auto to take a GPU when there is one")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BadInputError(f"device {requested!r} does not exist: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    return requested


def free_memory(device: str) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the memory the OS can give now."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available
