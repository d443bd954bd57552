"""A pure-torch stand-in for the four GPU ops diffusers' Nunchaku Lite loader calls, and its installation.

diffusers (``quantizers/nunchaku``) runs each ``SVDQW4A4Linear`` as ``quantize_w4a4_act_fuse_lora`` then
``gemm_w4a4``, and each ``AWQW4A16Linear`` as ``awq_gemm_w4a16_g64_int32`` (16 rows or more) or ``gemv_awq``,
fetched from the Hub by the ``kernels`` package for CUDA only. These functions compute the same results on
any device from the checkpoint's own bytes, read through :mod:`.layout`'s readers, so an exported directory
can be opened and run by diffusers' real loading code where there is no GPU: in the tests, and for users
who want to debug a checkpoint on a CPU (slow: a dense GEMM per 64-wide group).

Numerics follow the Nunchaku kernels' sources rather than svdq's own engine:

- activations are smoothed by division in the 16-bit compute dtype; the down-projection reads the raw input
  (fp32 accumulation); INT4 groups of 64 take ``s = max|x̂|·(1/7)``, codes ``round(x̂ · (1/s))`` from the
  unrounded s while the GEMM reads s rounded to the compute dtype; NVFP4 groups of 16 take
  ``min(max|x̂|/6, 448)`` stored in fp8, codes likewise from the unrounded scale (no per-token tensor scale);
- the INT4 GEMM accumulates its 64-wide groups in the compute dtype (``acc = fma(half(Σ), half(sₐ·s_w),
  acc)``, the kernel's 16-bit accumulator), NVFP4 accumulates in fp32 and multiplies by ``wtscale``;
- epilogue in the kernel's order: ``acc·wcscales + bias``, then the low-rank up-projection
  (``half(lora_act)·lora_upᵀ`` in fp32, per 16-rank chunk times its ``lora_scales`` entry);
- W4A16: ``w = q·scale + zero`` per 64 inputs, in the compute dtype, fp32 accumulation.

What passes between the two W4A4 ops (packed activations and their scales) is this module's own row-major
layout, not the GPU's fragment order: only the two ops read it, and the checkpoint is not affected.
"""

from __future__ import annotations

import sys
import types

import torch

from ...quant.formats import code_values, engine_activation_codes, get_format
from ...quant.packing import pack_nibbles, unpack_nibbles
from . import layout

__all__ = ["OPS", "install", "use_cpu_lite_kernels"]

KERNEL_REPO = "rootonchair/nunchaku-lite-kernels"  # what diffusers asks the kernels package for


def quantize_w4a4_act_fuse_lora(input, output, oscales, lora_down, lora_act_out, smooth, fuse_glu, fp4) -> None:
    """Quantize ``input`` [M, K] (after ``/ smooth``) into ``output``/``oscales`` and write the low-rank
    down-projection of the raw input into ``lora_act_out``; rows past M (padding) are zero."""
    if fuse_glu:
        raise NotImplementedError("the CPU stand-in has no fused GLU (diffusers' Lite linears never ask for it)")
    fmt = get_format("nvfp4" if fp4 else "int4")
    rows, channels = input.shape
    down = layout.unpack_lora_down(lora_down).float()  # [r, K]
    lora_act_out.zero_()
    lora_act_out[:rows] = input.float() @ down.T
    smoothed = (input.float() / layout.unpack_vector(smooth).float()).to(input.dtype)  # h2div in 16 bits
    codes, scales = engine_activation_codes(smoothed, fmt, input.dtype)
    padded = torch.zeros(output.shape[0], channels, dtype=torch.int8, device=input.device)
    padded[:rows] = codes
    output.copy_(pack_nibbles(padded))  # the stand-in's own activation layout
    oscales.zero_()
    oscales[:, :rows] = scales.T.to(oscales.dtype)


def gemm_w4a4(act, wgt, out, qout, ascales, wscales, oscales, poolout, lora_act_in, lora_up, lora_down,
              lora_act_out, norm_q, norm_k, rotary_emb, bias, smooth_factor, out_vk, out_linearattn, act_unsigned,
              lora_scales, fuse_silu, fp4, alpha, wcscales, out_q, out_k, out_v, attn_tokens) -> None:
    """``out [M, N] = Q(x̂)·Q(R)ᵀ (·wcscales) + bias + lora_act·lora_upᵀ`` from the quantize op's outputs."""
    fused = (qout, oscales, poolout, lora_down, lora_act_out, norm_q, norm_k, rotary_emb, smooth_factor, out_vk,
             out_linearattn, out_q, out_k, out_v)
    if any(tensor is not None for tensor in fused) or act_unsigned or fuse_silu:
        raise NotImplementedError("the CPU stand-in runs the plain W4A4 GEMM only (the one diffusers' Lite "
                                  "linears call), not Nunchaku's fused attention, norm or quantize epilogues")
    dtype, rows = out.dtype, out.shape[0]
    fmt = get_format("nvfp4" if fp4 else "int4")
    a = unpack_nibbles(act, signed=not fp4)[:rows]
    w = layout.unpack_w4a4_codes(wgt, signed=not fp4)
    a_scales = ascales[:, :rows].T
    if fp4:
        main = _nvfp4_product(a, a_scales, w, layout.unpack_micro_scales(wscales), fmt)
        if alpha is not None:
            main = main * float(alpha.float().reshape(-1)[0])
        acc = main.to(dtype)
    else:
        acc = _int4_product(a, a_scales, w, layout.unpack_group_scales(wscales), dtype)
    if wcscales is not None or bias is not None:
        scaled = acc.float() * layout.unpack_vector(wcscales).float() if wcscales is not None else acc.float()
        acc = (scaled + (layout.unpack_vector(bias).float() if bias is not None else 0.0)).to(dtype)
    if lora_up is not None:
        up = layout.unpack_lora_up(lora_up).float()  # [N, r]
        branch = lora_act_in[:rows].to(dtype).float()
        chunks = torch.tensor(lora_scales, dtype=torch.float32).repeat_interleave(16)[: up.shape[1]]
        acc = (acc.float() + (branch * chunks) @ up.T).to(dtype)
    out.copy_(acc)


def awq_gemm_w4a16_g64_int32(in_feats, qweight, scaling_factors, zeros) -> torch.Tensor:
    """``x [M, K] · Wᵀ`` with ``W = q·scale + zero`` (groups of 64 along K)."""
    weight = _awq_weight(qweight, scaling_factors, zeros, in_feats.dtype)
    return (in_feats.float() @ weight.float().T).to(in_feats.dtype)


def gemv_awq(in_feats, qweight, scaling_factors, zeros, m: int, n: int, k: int, group_size: int) -> torch.Tensor:
    """The same product for a few rows (diffusers calls it on chunks of up to 8)."""
    if group_size != layout.AWQ_GROUP or in_feats.shape != (m, k) or qweight.shape[0] * 4 != n:
        raise ValueError(f"gemv_awq: shapes {tuple(in_feats.shape)}, {tuple(qweight.shape)} do not fit m={m}, "
                         f"n={n}, k={k}, group {group_size}")
    return awq_gemm_w4a16_g64_int32(in_feats, qweight, scaling_factors, zeros)


OPS = types.SimpleNamespace(quantize_w4a4_act_fuse_lora=quantize_w4a4_act_fuse_lora, gemm_w4a4=gemm_w4a4,
                            awq_gemm_w4a16_g64_int32=awq_gemm_w4a16_g64_int32, gemv_awq=gemv_awq)


def _int4_product(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Σ over 64-wide groups of the integer products, accumulated as the kernel does in 16 bits."""
    a, w = a.float(), w.float()
    acc = torch.zeros(a.shape[0], w.shape[0], dtype=dtype)
    for group in range(w.shape[1] // 64):
        part = slice(64 * group, 64 * group + 64)
        partial = (a[:, part] @ w[:, part].T).to(dtype).float()  # exact integers, then the kernel's i2f
        scale = (a_scales[:, group, None].float() * w_scales[None, :, group].float()).to(dtype).float()
        acc = (partial * scale + acc.float()).to(dtype)
    return acc


def _nvfp4_product(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                   fmt) -> torch.Tensor:
    """Block-scaled E2M1 product in fp32: each 16-wide group's codes times its fp8 scale, on both sides."""
    a_values = code_values(a, fmt).reshape(a.shape[0], -1, 16) * a_scales.float().unsqueeze(-1)
    w_values = code_values(w, fmt).reshape(w.shape[0], -1, 16) * w_scales.float().unsqueeze(-1)
    return a_values.reshape(a.shape[0], -1) @ w_values.reshape(w.shape[0], -1).T


def _awq_weight(qweight, scales, zeros, dtype) -> torch.Tensor:
    codes = layout.unpack_awq_codes(qweight).float()  # [N, K]
    n, k = codes.shape
    grouped = codes.reshape(n, k // layout.AWQ_GROUP, layout.AWQ_GROUP)
    weight = grouped * scales.T.float().unsqueeze(-1) + zeros.T.float().unsqueeze(-1)
    return weight.reshape(n, k).to(dtype)


def install() -> None:
    """Make diffusers' Nunchaku Lite loader run on this stand-in, on any device.

    ``kernels.get_kernel`` hands out :data:`OPS` for the Lite kernels' repo (any other request goes to the real
    function), diffusers is told these kernels are trusted (they are this module, not downloaded code), and the
    quantizer's environment check keeps its non-GPU part. Call it before the first ``from_pretrained`` of a
    Lite checkpoint; it changes this process only.
    """
    from diffusers.quantizers.nunchaku import nunchaku_quantizer
    from diffusers.utils import constants

    import kernels

    if not getattr(kernels.get_kernel, "stand_in", False):
        kernels.get_kernel = _stand_in_get_kernel(kernels.get_kernel)
    constants.DIFFUSERS_TRUST_REMOTE_KERNELS = True  # read once, when diffusers' nunchaku utils is imported
    loaded = sys.modules.get("diffusers.quantizers.nunchaku.utils")
    if loaded is not None:  # imported before (with the real kernels): its ops are looked up at each call
        loaded.ops = OPS
    nunchaku_quantizer.NunchakuLiteQuantizer.validate_environment = _validate_without_gpu


use_cpu_lite_kernels = install  # the public name (svdq_cli.use_cpu_lite_kernels)


def _stand_in_get_kernel(original):
    def get_kernel(repo_id: str, *args, **kwargs):
        if repo_id == KERNEL_REPO:
            return types.SimpleNamespace(ops=OPS)
        return original(repo_id, *args, **kwargs)

    get_kernel.stand_in = True
    return get_kernel


def _validate_without_gpu(self, *args, **kwargs) -> None:
    """The stand-in needs no GPU; what the real check asks besides (the kernels package) it provides."""
