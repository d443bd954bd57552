"""The fused CUDA path of SVDQLinear: kernels/*.cu compiled by NVRTC through CuPy (DESIGN.md §1 step 4).

``SVDQLinear.forward`` calls :func:`fused_forward` when :func:`fused_unsupported` finds nothing against it:
an int4 layer with quantized activations, a bf16/fp16 CUDA input of the layer's dtype, a rank that is a
multiple of 16 up to 128, CuPy installed, and compute capability 8.0 or newer. On sm_80/86/89 the GEMM uses
the native 4-bit tensor cores (mma.m16n8k64 s4); Hopper (sm_90) has none, so there the 4-bit codes are
widened to int8 in registers for mma.m16n8k32 (see kernels/w4a4_gemm.cu). Otherwise the reference path
runs, with a one-time warning when the input was on a GPU. Tensors cross to CuPy through DLPack (no
copies), kernels run on torch's current stream, and compiled modules are cached per (arch, dtype, rank,
activation signedness). Weights are re-packed once per device (see fragments.py).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from ..resources import data_dir
from .fragments import pack_weight_fragments, pack_weight_scales, padded_columns

MAX_RANK = 128
_CPP_TYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
_warned: set[str] = set()


def _cupy():
    try:
        import cupy

        return cupy
    except ImportError:
        return None


def fused_unsupported(layer, x: torch.Tensor) -> str | None:
    """Why ``layer`` cannot run ``x`` on the fused kernels, or None when it can."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if layer.precision != "int4" or layer.act == "none":
        return f"no fused kernel for {layer.precision} with activations '{layer.act}'"
    if x.dtype not in _CPP_TYPES or x.dtype != layer.dtype:
        return f"input dtype {x.dtype} (layer {layer.dtype}); fused kernels take bf16/fp16 matching the layer"
    if layer.rank % 16 or layer.rank > MAX_RANK:
        return f"rank {layer.rank} is not a multiple of 16 up to {MAX_RANK}"
    if _cupy() is None:
        return "CuPy is not installed (pip install 'svdq[cuda12]' or 'svdq[cuda13]')"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return f"compute capability {major}.{minor} has no 8-bit mma.m16n8k32 (needs 8.0 or newer)"
    return None


def should_fuse(layer, x: torch.Tensor) -> bool:
    """True when the fused path applies; warns once per reason when a CUDA input falls back."""
    reason = fused_unsupported(layer, x)
    if reason is None:
        return True
    if x.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"svdq: using the reference path on the GPU: {reason}", stacklevel=3)
    return False


def uses_s4(capability: tuple[int, int]) -> bool:
    """Native 4-bit MMA on Ampere/Ada (8.x); Hopper and later take the int8 path."""
    return capability[0] == 8


def describe(device: torch.device | str) -> str:
    """What the runtime uses on ``device``, for reports."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "reference path (torch); fused CUDA kernels need a CUDA device"
    if _cupy() is None:
        return "reference path (torch); CuPy is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"reference path (torch); sm_{major}{minor} is not supported by the fused kernels"
    mma = "4-bit mma.m16n8k64" if uses_s4((major, minor)) else "int8 mma.m16n8k32 on widened 4-bit codes"
    return f"fused CUDA kernels (sm_{major}{minor}, {mma})"


@functools.cache
def _kernels(arch: int, dtype: torch.dtype, rank: int, unsigned: bool):
    cupy = _cupy()
    flag = "true" if unsigned else "false"
    cpp = _CPP_TYPES[dtype]
    names = {
        "quantize_lora_down": f"svdq::quantize_lora_down<{cpp}, {rank}, {flag}>",
        "w4a4_gemm": f"svdq::w4a4_gemm<{cpp}, {rank}, {flag}>",
    }
    functions = {}
    for stem, name in names.items():
        source = (data_dir("kernels") / f"{stem}.cu").read_text()
        # CuPy adds -arch for the current device itself; ``arch`` keys the cache.
        module = cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=[name])
        functions[stem] = module.get_function(name)
    return functions


def _device_weights(layer, device: torch.device, s4: bool) -> dict[str, torch.Tensor]:
    """Fragment-packed weights, float32 scales and a bias on ``device``, re-packed when the buffers change."""
    key = (device, s4, layer.qweight.data_ptr(), layer.qweight._version, layer.wscales._version)
    cache = getattr(layer, "_fused_cache", None)
    if cache is not None and cache["key"] == key:
        return cache
    from ..quant.packing import unpack_nibbles

    codes = unpack_nibbles(layer.qweight.cpu(), signed=True)
    frag = pack_weight_fragments(codes, s4=s4).view(np.int32)
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features, dtype=layer.dtype)
    cache = {
        "key": key,
        "w_frag": torch.from_numpy(frag).to(device),
        "w_scales": torch.from_numpy(pack_weight_scales(layer.wscales)).to(device),
        "bias": bias.to(device),
        # rank 0: the kernels read no branch, but every pointer argument needs a tensor behind it
        "no_down": torch.zeros(1, layer.in_features, dtype=layer.dtype, device=device),
        "no_up": torch.zeros(layer.out_features, 1, dtype=layer.dtype, device=device),
    }
    layer._fused_cache = cache
    return cache


def fused_forward(layer, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused forward: one kernel quantizes x and computes x̂·lora_downᵀ, one GEMM adds the rest.

    ``out`` (``[rows, out_features]``, x's dtype) receives the result when given (tests poison it first).
    """
    cupy = _cupy()
    device = x.device
    capability = torch.cuda.get_device_capability(device)
    s4 = uses_s4(capability)
    kernels = _kernels(capability[0] * 10 + capability[1], x.dtype, layer.rank, layer.act == "unsigned", s4)
    weights = _device_weights(layer, device, s4)
    rows = x.reshape(-1, layer.in_features).contiguous()
    m, k, n = rows.shape[0], layer.in_features, layer.out_features
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(m, k // 64, dtype=torch.float32, device=device)
    down = torch.empty(m, max(layer.rank, 1), dtype=torch.float32, device=device)
    out = torch.empty(m, n, dtype=x.dtype, device=device) if out is None else out
    shift = float(layer.shift) if layer.shift is not None else 0.0
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    as_cupy = cupy.from_dlpack
    lora_down = layer.lora_down if layer.rank else weights["no_down"]
    lora_up = layer.lora_up if layer.rank else weights["no_up"]
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
    with cupy.cuda.Device(device.index or 0), stream:
        kernels["quantize_lora_down"](
            (m,), (256,),
            (as_cupy(rows), as_cupy(layer.smooth), as_cupy(lora_down), as_cupy(packed), as_cupy(scales),
             as_cupy(down), np.int32(k), np.float32(shift)),
        )
        kernels["w4a4_gemm"](
            (padded_columns(n) // 64, math.ceil(m / 32)), (128,),
            (as_cupy(packed), as_cupy(scales), as_cupy(weights["w_frag"]), as_cupy(weights["w_scales"]),
             as_cupy(down), as_cupy(lora_up), as_cupy(weights["bias"]), as_cupy(out), np.int32(m), np.int32(n),
             np.int32(padded_columns(n)), np.int32(k)),
        )
    return out.reshape(*x.shape[:-1], n)
