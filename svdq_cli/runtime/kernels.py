"""The fused path of SVDQLinear: kernels/*.cu launched through a backend (DESIGN.md §1 step 4).

One kernel quantizes x and computes x̂·lora_downᵀ, one GEMM adds the rest. The glue here — which variant,
its name expression and template arguments, the argument lists, the grid and block geometry, the dtype
handling — is the same whatever runs the kernels:

- :class:`CupyBackend`: NVRTC through CuPy on a CUDA device, DLPack views (no copies), torch's current
  stream; used whenever an SVDQLinear sees a CUDA input and the layer qualifies.
- :class:`~svdq_cli.runtime.emulator.backend.EmulatedBackend`: the same sources executed on the CPU (see
  ``emulator/``); used for CPU inputs inside :func:`emulated` (``svdq validate --runtime emulated``).

A layer qualifies when :func:`fused_unsupported` finds nothing against it: int4 with quantized activations,
a bf16/fp16 input of the layer's dtype, a rank that is a multiple of 16 up to 128, compute capability 8.0 or
newer. On sm_80/86/89 the GEMM uses the native 4-bit tensor cores (mma.m16n8k64 s4); Hopper (sm_90) has
none, so there the 4-bit codes are widened to int8 in registers for mma.m16n8k32 (see kernels/w4a4_gemm.cu).
Otherwise the reference path runs, with a one-time warning naming the reason when the input was on a GPU.
Weights are re-packed once per device into the kernels' fragment order (fragments.py).
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

import numpy as np
import torch

from ..quant.packing import unpack_nibbles
from ..system.resources import data_dir
from .emulator.backend import EmulatedBackend
from .fragments import pack_weight_fragments, pack_weight_scales, padded_columns, padded_rows

MAX_RANK = 128
_CPP_TYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
_warned: set[str] = set()


def _cupy():
    try:
        import cupy

        return cupy
    except ImportError:
        return None


class CupyBackend:
    """Kernels compiled by NVRTC through CuPy and run on a CUDA device."""

    name = "cuda"

    def __init__(self) -> None:
        self.cupy = _cupy()

    def capability(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)

    def module(self, source: str, name_expressions: list[str], filename: str):
        # CuPy adds -arch for the current device itself.
        return self.cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=list(name_expressions))

    def array(self, tensor: torch.Tensor):
        return self.cupy.from_dlpack(tensor)

    @contextmanager
    def launching(self, device: torch.device):
        with ExitStack() as stack:
            stack.enter_context(self.cupy.cuda.Device(device.index or 0))
            stack.enter_context(self.cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream))
            yield

    def describe(self) -> str:
        return "CUDA (CuPy)"


@functools.cache
def cuda_backend() -> CupyBackend:
    return CupyBackend()


# The emulated backend SVDQLinear uses for CPU inputs, and what it did: fused calls and fallback reasons.
_emulated: ContextVar = ContextVar("svdq_emulated_backend", default=None)
_tally: ContextVar = ContextVar("svdq_fused_tally", default=None)


@contextmanager
def emulated(backend=None):
    """Run SVDQLinear layers on CPU inputs through the kernels on the CPU emulator for the duration.

    Yields a Counter of what the layers did: ``fused`` calls, and each fallback reason with its count.
    """
    token = _emulated.set(backend or EmulatedBackend())
    tally = Counter()
    tally_token = _tally.set(tally)
    try:
        yield tally
    finally:
        _emulated.reset(token)
        _tally.reset(tally_token)


def backend_for(x: torch.Tensor):
    """The backend that runs the kernels for ``x``: CuPy for CUDA inputs, the active emulator for CPU ones."""
    if x.is_cuda:
        return cuda_backend() if _cupy() is not None else None
    return _emulated.get()


def fused_unsupported(layer, x: torch.Tensor, backend=None) -> str | None:
    """Why ``layer`` cannot run ``x`` on the fused kernels of ``backend`` (default: :func:`backend_for`), or
    None when it can."""
    backend = backend or backend_for(x)
    if backend is None:
        if x.is_cuda:
            return "CuPy is not installed (pip install 'svdq[cuda12]' or 'svdq[cuda13]')"
        return "input is not on a CUDA device"
    if backend.name == "cuda" and not x.is_cuda:
        return "input is not on a CUDA device"
    if backend.name == "emulated" and x.device.type != "cpu":
        return "the emulator runs on CPU tensors"
    if layer.precision != "int4" or layer.act == "none":
        return f"no fused kernel for {layer.precision} with activations '{layer.act}'"
    if x.dtype not in _CPP_TYPES or x.dtype != layer.dtype:
        return f"input dtype {x.dtype} (layer {layer.dtype}); fused kernels take bf16/fp16 matching the layer"
    if layer.rank % 16 or layer.rank > MAX_RANK:
        return f"rank {layer.rank} is not a multiple of 16 up to {MAX_RANK}"
    major, minor = backend.capability(x.device)
    if major < 8:
        return f"compute capability {major}.{minor} has no 8-bit mma.m16n8k32 (needs 8.0 or newer)"
    return None


def try_fused(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The fused forward of an SVDQLinear when a backend applies to ``x``, else None (the caller takes the
    reference path)."""
    return _dispatch(layer, x, fused_unsupported, fused_forward)


def _dispatch(layer, x: torch.Tensor, unsupported, forward) -> torch.Tensor | None:
    """``forward(layer, x)`` on the kernels when ``unsupported`` finds nothing against it, else None. A CUDA input
    that falls back warns once per reason; under :func:`emulated` every decision is tallied."""
    backend = backend_for(x)
    if backend is None and not x.is_cuda:
        return None
    reason = unsupported(layer, x, backend)
    tally = _tally.get()
    if tally is not None:
        tally["fused" if reason is None else reason] += 1
    if reason is None:
        return forward(layer, x, backend=backend)
    if x.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"svdq: using the reference path on the GPU for {type(layer).__name__}: {reason}",
                      stacklevel=4)
    return None


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


def kernel_names(dtype: torch.dtype, rank: int, unsigned: bool, s4: bool) -> dict[str, str]:
    """The name expression of each kernel variant, i.e. its template arguments (file stem → expression)."""
    cpp, flag = _CPP_TYPES[dtype], "true" if unsigned else "false"
    return {
        "quantize_lora_down": f"svdq::quantize_lora_down<{cpp}, {rank}, {flag}>",
        "w4a4_gemm": f"svdq::w4a4_gemm<{cpp}, {rank}, {flag}, {'true' if s4 else 'false'}>",
    }


@functools.cache
def _kernels(backend, capability: tuple[int, int], dtype: torch.dtype, rank: int, unsigned: bool, s4: bool):
    """Compiled kernels of one variant, cached per backend and device capability."""
    functions = {}
    for stem, name in kernel_names(dtype, rank, unsigned, s4).items():
        functions[stem] = backend.module(kernel_source(stem), [name], f"{stem}.cu").get_function(name)
    return functions


def _device_weights(layer, device: torch.device) -> dict[str, torch.Tensor]:
    """Fragment-packed weights, float32 scales and a bias on ``device``, re-packed when the buffers change."""
    key = (device, layer.qweight.data_ptr(), layer.qweight._version, layer.wscales._version)
    cache = getattr(layer, "_fused_cache", None)
    if cache is not None and cache["key"] == key:
        return cache

    codes = unpack_nibbles(layer.qweight.cpu(), signed=True)
    frag = pack_weight_fragments(codes).view(np.int32)
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


def kernel_source(stem: str) -> str:
    """The CUDA source ``kernels/{stem}.cu`` as shipped."""
    return (data_dir("kernels") / f"{stem}.cu").read_text()


def _variant(layer, x: torch.Tensor, backend):
    capability = tuple(backend.capability(x.device))
    return _kernels(backend, capability, x.dtype, layer.rank, layer.act == "unsigned", uses_s4(capability))


def launch_quantize(layer, rows: torch.Tensor, backend, packed=None, scales=None, down=None):
    """quantize_lora_down.cu on ``rows`` ``[M, K]``. Returns the GEMM's inputs, padded to Mpad rows (a multiple
    of 128) with zeros: packed 4-bit codes ``[Mpad, K/2]``, float32 group scales ``[K/64, Mpad]`` (group-major)
    and the float32 down-projection ``[Mpad, max(r, 1)]`` (written into the given buffers)."""
    kernels = _variant(layer, rows, backend)
    m, k, device = rows.shape[0], layer.in_features, rows.device
    mpad = padded_rows(m)
    packed = torch.empty(mpad, k // 2, dtype=torch.uint8, device=device) if packed is None else packed
    scales = torch.empty(k // 64, mpad, dtype=torch.float32, device=device) if scales is None else scales
    down = torch.empty(mpad, max(layer.rank, 1), dtype=torch.float32, device=device) if down is None else down
    shift = float(layer.shift) if layer.shift is not None else 0.0
    lora_down = layer.lora_down if layer.rank else _device_weights(layer, device)["no_down"]
    array = backend.array
    with backend.launching(device):
        kernels["quantize_lora_down"](
            (mpad // 64,), (256,),
            (array(rows), array(layer.smooth), array(lora_down), array(packed), array(scales), array(down),
             np.int32(m), np.int32(mpad), np.int32(k), np.float32(shift),
             np.float32(8.0 if layer.act_range == "full" else 7.0)),
        )
    return packed, scales, down


def launch_gemm(layer, packed: torch.Tensor, scales: torch.Tensor, down: torch.Tensor, out: torch.Tensor, backend):
    """w4a4_gemm.cu: ``out [M, N] = Q(x̂)·Q(R)ᵀ + down·lora_upᵀ + bias`` from launch_quantize's outputs."""
    kernels = _variant(layer, out, backend)
    weights = _device_weights(layer, out.device)
    m, n, k = out.shape[0], layer.out_features, layer.in_features
    mpad, npad = packed.shape[0], padded_columns(n)
    lora_up = layer.lora_up if layer.rank else weights["no_up"]
    array = backend.array
    with backend.launching(out.device):
        kernels["w4a4_gemm"](
            (npad // 128, mpad // 128), (256,),
            (array(packed), array(scales), array(weights["w_frag"]), array(weights["w_scales"]), array(down),
             array(lora_up), array(weights["bias"]), array(out), np.int32(m), np.int32(n), np.int32(mpad),
             np.int32(npad), np.int32(k)),
        )
    return out


# --- VQ layers (kernels/vq_gemm.cu) ---------------------------------------------------------------------------

VQ_STEP = 32  # K per stage of vq_gemm.cu
VQ_TILE = 64  # its block tile, M and N


def vq_unsupported(layer, x: torch.Tensor, backend=None) -> str | None:
    """Why a VQLinear cannot run ``x`` on vq_gemm.cu through ``backend``, or None when it can."""
    backend = backend or backend_for(x)
    if backend is None:
        return "CuPy is not installed" if x.is_cuda else "input is not on a CUDA device"
    if (backend.name == "cuda") != x.is_cuda:
        return "input is not on the backend's device"
    if x.dtype not in _CPP_TYPES or x.dtype != layer.dtype:
        return f"input dtype {x.dtype} (layer {layer.dtype}); vq_gemm takes bf16/fp16 matching the layer"
    if layer.in_features % VQ_STEP or VQ_STEP % layer.shape.dim:
        return f"in_features {layer.in_features} / dim {layer.shape.dim}: vq_gemm steps K by {VQ_STEP}"
    if layer.shape.codewords * layer.shape.dim * 2 > 32 * 1024:
        return f"{layer.shape.codewords} codewords of {layer.shape.dim} exceed the 32 KB shared codebook"
    if backend.capability(x.device)[0] < 8:
        return "compute capability below 8.0 has no mma.m16n8k16 bf16"
    return None


def vq_kernel_name(dtype: torch.dtype, dim: int, index_bits: int) -> str:
    return f"svdq::vq_gemm<{_CPP_TYPES[dtype]}, {dim}, {index_bits}>"


@functools.cache
def _vq_kernel(backend, capability: tuple[int, int], dtype: torch.dtype, dim: int, index_bits: int):
    name = vq_kernel_name(dtype, dim, index_bits)
    return backend.module(kernel_source("vq_gemm"), [name], "vq_gemm.cu").get_function(name)


def vq_forward(layer, x: torch.Tensor, out: torch.Tensor | None = None, backend=None) -> torch.Tensor:
    """``x · Wᵀ + bias`` of a VQLinear through vq_gemm.cu (``out`` receives it when given)."""
    backend = backend or backend_for(x)
    rows = x.reshape(-1, layer.in_features).contiguous()
    m, n = rows.shape[0], layer.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m:
        kernel = _vq_kernel(backend, tuple(backend.capability(x.device)), x.dtype, layer.shape.dim,
                            layer.shape.index_bits)
        bias = layer.bias if layer.bias is not None else torch.zeros(n, dtype=layer.dtype, device=x.device)
        array = backend.array
        with backend.launching(x.device):
            kernel((-(-n // VQ_TILE), -(-m // VQ_TILE)), (128,),
                   (array(rows), array(layer.codebook), array(layer.codes), array(bias), array(out),
                    np.int32(m), np.int32(n), np.int32(layer.in_features), np.int32(layer.codes.shape[1])))
    return out.reshape(*x.shape[:-1], n)


def try_vq(layer, x: torch.Tensor) -> torch.Tensor | None:
    """vq_gemm.cu's result for a VQLinear when a backend applies to ``x``, else None (reference path)."""
    return _dispatch(layer, x, vq_unsupported, vq_forward)


def fused_forward(layer, x: torch.Tensor, out: torch.Tensor | None = None, backend=None) -> torch.Tensor:
    """The fused forward: one kernel quantizes x and computes x̂·lora_downᵀ, one GEMM adds the rest.

    ``out`` (``[rows, out_features]``, x's dtype) receives the result when given (tests poison it first).
    ``backend`` defaults to :func:`backend_for` ``x``.
    """
    backend = backend or backend_for(x)
    rows = x.reshape(-1, layer.in_features).contiguous()
    n = layer.out_features
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device) if out is None else out
    if rows.shape[0]:
        packed, scales, down = launch_quantize(layer, rows, backend)
        launch_gemm(layer, packed, scales, down, out, backend)
    return out.reshape(*x.shape[:-1], n)
