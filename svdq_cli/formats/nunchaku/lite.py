"""An svdq export as a diffusers "Nunchaku Lite" model: what ``NunchakuLiteQuantizer`` loads, for any family.

diffusers replaces each module named in ``quantization_config`` by an ``SVDQW4A4Linear`` (``svdq_w4a4``
targets) or an ``AWQW4A16Linear`` (``awq_w4a16``) of the same shape and requires the checkpoint's keys to
match the patched model exactly. Those modules run Nunchaku's kernels on the tensors as stored, so every
tensor is written in the kernels' fragment order (:mod:`.layout`, the same packing as Nunchaku's own files)
without padding — the module shapes are the model's. What each svdq layer becomes:

- a W4A4 layer → ``svdq_w4a4``: ``qweight``, ``wscales``, ``smooth_factor``, ``proj_down`` (ours ÷ λ: the
  kernel's down-projection reads the raw input), ``proj_up``, ``bias`` when the model's linear has one,
  and for NVFP4 ``wcscales`` (ones) and ``wtscale``. Our unsigned-activation shift is undone (the bias
  returns to the model's): the Lite linears quantize every input signed. All ranks are zero-padded to one.
- a weight-only layer (AdaLN linears) → ``awq_w4a16``: unsigned codes with ``w = q·scale + zero``. An INT4
  group-64 layer without a low-rank branch converts exactly (``q = c + 8``, ``zero = −8·scale``); any
  other is re-quantized from its effective weight (round to nearest, asymmetric) and its error reported.
- a layer whose shape the kernels cannot take (W4A4: N and K multiples of 128; W4A16: N of 4, K of 64) →
  its effective 16-bit weight, named in the summary and the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ...methods.registry import METHODS
from ...quant.packing import unpack_nibbles
from ...runtime.linear import SVDQLinear
from . import layout
from .flux import Linear4, asymmetric_w4a16

QUANT_METHOD = "nunchaku_lite"
W4A4_MULTIPLE = 128  # N and K of a W4A4 target: the kernel's warp tile and its two 64-wide k steps
WEIGHTS_NAME = "diffusion_pytorch_model"
# What the card and errors say about where the kernels run (diffusers' NunchakuLiteQuantizer checks these).
GPUS = {"int4": "NVIDIA Turing, Ampere, Ada and Blackwell GPUs (sm_75–sm_89, sm_120); not Hopper (sm_90)",
        "nvfp4": "NVIDIA Blackwell GPUs (sm_100 and newer); not Hopper (sm_90)"}
FORMATS_FOR = "--format diffusers holds SVDQuant-style W4A4 runs (svdquant, smoothquant, rtn) in int4 or nvfp4"


def unsupported(recipe: dict) -> str | None:
    """Why a resolved recipe's export cannot be a Lite model (one line naming what can), or None."""
    quant = recipe["quant"]
    method = METHODS.get(quant["method"])
    if method is None or method.vector:
        return f"{FORMATS_FOR}; this run is {quant['method']} (its export loads with --format svdq)"
    if quant["precision"] not in ("int4", "nvfp4") or quant["weight_only"]:
        kind = quant["precision"] + (" weight-only" if quant["weight_only"] else "")
        return f"{FORMATS_FOR}; this run is {kind} (its export loads with --format svdq)"
    if recipe["dtype"] not in ("bfloat16", "float16"):
        return (f"{FORMATS_FOR} computed in bfloat16 or float16; this run is {recipe['dtype']} (quantize again with "
                "--dtype bfloat16, or export with --format svdq)")
    if quant["precision"] == "int4" and quant["scale_dtype"] != "model":
        return (f"{FORMATS_FOR} with scales in the model dtype; this run keeps float32 scales (export with "
                "--format svdq)")
    return None


@dataclass
class LiteLayer:
    """One svdq layer's place in the Lite model: its kind (``w4a4``, ``w4a16`` or ``dense``) and tensors."""

    kind: str
    tensors: dict[str, torch.Tensor]
    error: float = 0.0  # W4A16 re-quantization's relative weight error (0 for an exact conversion)
    reason: str = ""  # dense: why the kernels cannot take it


def unfit(act: str, n: int, k: int) -> str:
    """Why a layer of ``n``×``k`` cannot be a Lite module of its kind ('' when it can)."""
    if act == "none":
        if n % 4 or k % layout.AWQ_GROUP:
            return f"{n}×{k}: the W4A16 kernel needs N a multiple of 4 and K of {layout.AWQ_GROUP}"
    elif n % W4A4_MULTIPLE or k % W4A4_MULTIPLE:
        return f"{n}×{k}: the W4A4 kernel needs both a multiple of {W4A4_MULTIPLE}"
    return ""


def convert_layer(layer: SVDQLinear, rank: int, has_bias: bool, dtype: torch.dtype) -> LiteLayer:
    """The Lite tensors of one quantized layer (keys relative to the module), ``rank`` being the model's."""
    reason = unfit(layer.act, layer.out_features, layer.in_features)
    if reason:
        return _dense(layer, has_bias, dtype, reason)
    if layer.act == "none":
        return _w4a16(layer, has_bias, dtype)
    part = Linear4.from_layer(layer)
    packed = part.pack(rank, dtype)
    n, k = layer.out_features, layer.in_features
    tensors = {"qweight": packed["qweight"], "wscales": packed["wscales"], "smooth_factor": packed["smooth"],
               "proj_down": packed.get("lora_down", torch.zeros(k, 0, dtype=dtype)),
               "proj_up": packed.get("lora_up", torch.zeros(n, 0, dtype=dtype))}
    if has_bias:
        tensors["bias"] = packed["bias"]
    if part.tensor_scale is not None:
        tensors["wcscales"] = torch.ones(n, dtype=dtype)
        tensors["wtscale"] = part.tensor_scale.to(dtype).reshape(1)  # the module holds it in the compute dtype
    return LiteLayer("w4a4", tensors)


def _w4a16(layer: SVDQLinear, has_bias: bool, dtype: torch.dtype) -> LiteLayer:
    exact = (layer.precision == "int4" and layer.rank == 0 and layer.wscales.dtype == dtype
             and layer.wscales.shape[1] * layout.AWQ_GROUP == layer.in_features and bool((layer.smooth == 1).all()))
    if exact:
        scales = layer.wscales
        codes = unpack_nibbles(layer.qweight, signed=True).to(torch.int32) + 8
        tensors = {"qweight": layout.pack_awq_codes(codes), "wscales": scales.T.contiguous(),
                   "wzeros": (-8 * scales).T.contiguous()}  # ×8 is exact in any float
        error = 0.0
    else:
        tensors, error = asymmetric_w4a16(layer.effective_weight(), dtype)
    if has_bias:
        tensors["bias"] = layer.unshifted_bias().to(dtype)
    return LiteLayer("w4a16", tensors, error)


def _dense(layer: SVDQLinear, has_bias: bool, dtype: torch.dtype, reason: str) -> LiteLayer:
    tensors = {"weight": layer.effective_weight().to(dtype)}
    if has_bias:
        tensors["bias"] = layer.unshifted_bias().to(dtype)
    return LiteLayer("dense", tensors, reason=reason)


@dataclass
class Targets:
    """The Lite model's quantized modules by kind, and the facts its ``quantization_config`` states."""

    w4a4: list[str] = field(default_factory=list)
    w4a16: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # name → why it stays 16-bit

    def quantization_config(self, precision: str, rank: int, dtype: torch.dtype) -> dict:
        config: dict = {"quant_method": QUANT_METHOD, "compute_dtype": str(dtype).removeprefix("torch.")}
        if self.w4a4:
            config["svdq_w4a4"] = {"precision": precision, "group_size": 16 if precision == "nvfp4" else 64,
                                   "rank": rank, "targets": sorted(self.w4a4)}
        if self.w4a16:
            config["awq_w4a16"] = {"precision": "int4", "group_size": layout.AWQ_GROUP, "targets": sorted(self.w4a16)}
        return config


def plan(layers: dict[str, dict[str, str]], ranks: dict[str, int]) -> tuple[Targets, int]:
    """Where each quantized layer goes, from its metadata and rank alone (no tensor read), and the one rank
    every W4A4 target is padded to."""
    targets = Targets()
    for name, facts in sorted(layers.items()):
        reason = unfit(facts["act"], int(facts["out_features"]), int(facts["in_features"]))
        if reason:
            targets.dense[name] = reason
        else:
            (targets.w4a16 if facts["act"] == "none" else targets.w4a4).append(name)
    rank = max((layout.round_up(ranks[name], layout.LORA_TILE) for name in targets.w4a4), default=0)
    return targets, rank


def tensor_layout(name: str, facts: dict[str, str], kind: str, rank: int, has_bias: bool, precision: str,
                  dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each tensor :func:`convert_layer` writes for a layer, known before it is read."""
    n, k = int(facts["out_features"]), int(facts["in_features"])
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    if kind == "w4a4":
        fp4 = precision == "nvfp4"
        group = 16 if fp4 else 64
        shapes = {"qweight": (torch.int8, (n, k // 2)),
                  "wscales": (torch.float8_e4m3fn if fp4 else dtype, (k // group, n)),
                  "smooth_factor": (dtype, (k,)), "proj_down": (dtype, (k, rank)), "proj_up": (dtype, (n, rank))}
        if fp4:
            shapes.update(wcscales=(dtype, (n,)), wtscale=(dtype, (1,)))
    elif kind == "w4a16":
        shapes = {"qweight": (torch.int32, (n // 4, k // 2)), "wscales": (dtype, (k // layout.AWQ_GROUP, n)),
                  "wzeros": (dtype, (k // layout.AWQ_GROUP, n))}
    else:
        shapes = {"weight": (dtype, (n, k))}
    if has_bias:
        shapes["bias"] = (dtype, (n,))
    return {f"{name}.{key}": value for key, value in shapes.items()}


def model_config(metadata: dict, quantization: dict) -> dict:
    """The Lite model's ``config.json``: the exported model's config with its quantization."""
    import diffusers

    config = metadata["model_config"]
    return {"_class_name": config["class"], "_diffusers_version": diffusers.__version__, **config["config"],
            "quantization_config": quantization}


def config_bytes(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode()
