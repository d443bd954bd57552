"""An svdq Flux export rewritten as the single-file checkpoint Nunchaku's Flux loaders read.

Nunchaku computes each W4A4 linear as ``y = Q((x + s)/λ)·Rᵀ + (x·lora_down)·lora_upᵀ + bias``: the low-rank
branch reads the *raw* input (so ``lora_down`` is ours divided by λ), and ``s`` is a constant its fused
MLP adds to GELU outputs before unsigned INT4 quantization (0 elsewhere and for NVFP4), which the bias
must cancel. Its Flux blocks differ from diffusers' in three ways this module bridges exactly, without
re-quantizing any W4A4 weight:

- q, k and v run as one ``qkv_proj``: codes, scales and biases concatenate; λ is shared (our q/k/v group
  shares it); the branches stack, so the fused layer's rank is the sum of theirs (3r).
- a single block's ``proj_out`` (input: attention output ‖ MLP hidden) is two layers, ``out_proj`` and
  ``mlp_fc2``, split along K at the group boundary; each keeps the full ``lora_up``.
- the AdaLN linears run in W4A16 (AWQ GEMV) with rows interleaved per chunk and the ``1 + scale`` folded
  into the bias. That format has no λ and no branch, so these few layers are re-quantized (round to
  nearest, asymmetric, group 64) from the weight our file holds; their error is reported.

Nunchaku's V2 model builds every layer at one rank, so by default every branch is zero-padded to the
largest rank; ``uniform_rank=False`` keeps per-layer ranks (smaller, for the C++-backed loader only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from ...methods.registry import METHODS
from ...quant.formats import dequantize, get_format
from ...quant.packing import unpack_nibbles
from ...runtime.linear import SVDQLinear
from ..svdq_file import layer_state
from . import layout

GELU_SHIFT = 0.171875  # what Nunchaku's INT4 fused MLP adds to GELU outputs before unsigned quantization
MODEL_CLASS = "NunchakuFluxTransformer2dModel"
ENGINE_HEAD_DIM = 128  # Nunchaku's fused QKV epilogue (RMSNorm + RoPE) is compiled for this head size only
FAMILIES = ("flux-dev", "flux-schnell", "tiny-flux", "tiny-flux-deep")

# Nunchaku name → our layer(s), per block kind. A list fuses along N; ("proj_out", part) splits along K.
DOUBLE_W4A4 = {
    "qkv_proj": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "qkv_proj_context": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "out_proj": ["attn.to_out.0"],
    "out_proj_context": ["attn.to_add_out"],
    "mlp_fc1": ["ff.net.0.proj"],
    "mlp_fc2": ["ff.net.2"],
    "mlp_context_fc1": ["ff_context.net.0.proj"],
    "mlp_context_fc2": ["ff_context.net.2"],
}
SINGLE_W4A4 = {
    "qkv_proj": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "mlp_fc1": ["proj_mlp"],
    "out_proj": ("proj_out", 0),
    "mlp_fc2": ("proj_out", 1),
}
GELU_FED = ("mlp_fc2", "mlp_context_fc2")  # inputs come from Nunchaku's fused GELU epilogue
DOUBLE_ADANORM = {"norm1.linear": 6, "norm1_context.linear": 6}  # name → chunks (shift, scale, gate…)
SINGLE_ADANORM = {"norm.linear": 3}
SCALE_CHUNKS = {6: (1, 4), 3: (1,)}  # which chunks are multiplied in as (1 + scale)
DOUBLE_PLAIN = {"attn.norm_q.weight": "norm_q.weight", "attn.norm_k.weight": "norm_k.weight",
                "attn.norm_added_q.weight": "norm_added_q.weight", "attn.norm_added_k.weight": "norm_added_k.weight"}
SINGLE_PLAIN = {"attn.norm_q.weight": "norm_q.weight", "attn.norm_k.weight": "norm_k.weight"}


@dataclass(frozen=True)
class Linear4:
    """One W4A4 linear in Nunchaku's semantics, unpacked: ``y = Q((x+s)/λ)·Rᵀ + (x·downᵀ)·upᵀ + bias``."""

    codes: torch.Tensor  # [N, K] int8: signed INT4 values or E2M1 nibbles
    scales: torch.Tensor  # [N, K/group]: model dtype (INT4) or fp8 (NVFP4)
    tensor_scale: torch.Tensor | None  # NVFP4 per-tensor scale
    smooth: torch.Tensor  # λ [K], model dtype
    down: torch.Tensor  # [r, K] float32, acts on the raw input
    up: torch.Tensor  # [N, r] float32
    bias: torch.Tensor  # [N] float32, for an input shift s = 0
    precision: str
    channel_scale: torch.Tensor | None = None  # NVFP4 fused layers: each row's tensor scale ÷ tensor_scale

    @classmethod
    def from_layer(cls, layer: SVDQLinear) -> Linear4:
        if layer.act == "none":
            raise ValueError("it is weight-only; Nunchaku runs its block linears in W4A4")
        return cls(
            codes=unpack_nibbles(layer.qweight, signed=not layer.fmt.is_float),
            scales=layer.wscales,
            tensor_scale=layer.wtscale,
            smooth=layer.smooth,
            down=layer.lora_down.float() / layer.smooth.float(),
            up=layer.lora_up.float(),
            bias=layer.unshifted_bias(),  # Nunchaku's kernels apply their own shift, if any
            precision=layer.precision,
        )

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def residual(self) -> torch.Tensor:
        """The dequantized 4-bit weight ``R`` [N, K] (smoothed space), float32."""
        residual = dequantize(self.codes, self.scales, get_format(self.precision), self.tensor_scale)
        return residual if self.channel_scale is None else residual * self.channel_scale.float()[:, None]

    def with_input_shift(self, shift: float) -> Linear4:
        """Cancel a constant ``shift`` the engine adds to the input of the 4-bit path: ``b − s·(R/λ)·1``."""
        if not shift:
            return self
        correction = shift * (self.residual() / self.smooth.float()).sum(dim=1)
        return replace(self, bias=self.bias - correction)

    def split_k(self, at: int) -> tuple[Linear4, Linear4]:
        """Two layers on the input's halves ``[:at]`` and ``[at:]`` whose outputs sum to this one's."""
        group = get_format(self.precision).group_size
        if at % group:
            raise ValueError(f"cannot split K at {at}: not a multiple of the group size {group}")
        first = replace(self, codes=self.codes[:, :at], scales=self.scales[:, : at // group],
                        smooth=self.smooth[:at], down=self.down[:, :at])
        second = replace(self, codes=self.codes[:, at:], scales=self.scales[:, at // group:],
                         smooth=self.smooth[at:], down=self.down[:, at:], bias=torch.zeros_like(self.bias))
        return first, second

    @staticmethod
    def fuse_n(parts: list[Linear4], dtype: torch.dtype) -> Linear4:
        """Layers on one input stacked along N; their branches stack block-diagonally (ranks add).

        NVFP4 layers keep one tensor scale per layer; fused, the largest becomes the tensor scale and each
        row carries its layer's ratio to it as a per-channel scale in ``dtype`` (Nunchaku's ``wcscales``).
        """
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any(not torch.equal(part.smooth, first.smooth) for part in parts):
            raise ValueError("the layers to fuse have different smoothing factors")
        tensor_scale, channel_scale = first.tensor_scale, None
        if tensor_scale is not None and any(not torch.equal(p.tensor_scale, tensor_scale) for p in parts):
            tensor_scale = torch.stack([p.tensor_scale for p in parts]).max()
            channel_scale = torch.cat([(p.tensor_scale / tensor_scale).to(dtype).expand(p.codes.shape[0])
                                       for p in parts])
        return replace(first, codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       down=torch.cat([p.down for p in parts]), up=torch.block_diag(*[p.up for p in parts]),
                       bias=torch.cat([p.bias for p in parts]), tensor_scale=tensor_scale,
                       channel_scale=channel_scale)

    def pack(self, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Nunchaku's tensors for this layer, padded to 128 (N, K) and ``rank`` (a multiple of 16)."""
        n, k = self.codes.shape
        n_pad, k_pad = layout.round_up(n, layout.WARP_N), layout.round_up(k, layout.K_UNROLL)
        group = get_format(self.precision).group_size
        scales = layout.pad_to(self.scales, (n_pad, k_pad // group))
        smooth = layout.pack_vector(layout.pad_to(self.smooth.to(dtype), (k_pad,), 1.0))  # padding: 0/1, not 0/0
        tensors = {
            "qweight": layout.pack_w4a4_codes(layout.pad_to(self.codes, (n_pad, k_pad))),
            "wscales": layout.pack_micro_scales(scales) if self.tensor_scale is not None
            else layout.pack_group_scales(scales),
            "bias": layout.pack_vector(layout.pad_to(self.bias, (n_pad,))).to(dtype),
            "smooth": smooth,
            "smooth_orig": smooth.clone(),
        }
        if self.tensor_scale is not None:
            tensors["wtscale"] = self.tensor_scale.float().reshape(1)
        if self.channel_scale is not None:
            tensors["wcscales"] = layout.pack_vector(layout.pad_to(self.channel_scale.to(dtype), (n_pad,), 1.0))
        if rank:
            tensors["lora_down"] = layout.pack_lora_down(self.down.to(dtype), k_pad, rank)
            tensors["lora_up"] = layout.pack_lora_up(self.up.to(dtype), n_pad, rank)
        return tensors


def adanorm_w4a16(weight: torch.Tensor, bias: torch.Tensor, chunks: int, dtype: torch.dtype
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """An AdaLN linear in Nunchaku's W4A16 layout, and the relative error of its re-quantization.

    Rows interleave chunk-wise (output ``i·chunks + c`` is chunk c's channel i) and the scale chunks carry
    the ``1 +`` in their bias, as Nunchaku's AdaLN reads them.
    """
    n, k = weight.shape
    rows = weight.float().reshape(chunks, n // chunks, k).transpose(0, 1).reshape(n, k)
    shifted = bias.float().reshape(chunks, n // chunks).clone()
    for chunk in SCALE_CHUNKS[chunks]:
        shifted[chunk] += 1.0
    tensors, error = asymmetric_w4a16(rows, dtype)
    tensors["bias"] = shifted.T.reshape(n).to(dtype)
    return tensors, error


def asymmetric_w4a16(weight: torch.Tensor, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], float]:
    """``weight`` [N, K] re-quantized for the W4A16 GEMV (round to nearest, asymmetric, group 64:
    ``w = q·scale + zero``), and its relative error."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // layout.AWQ_GROUP, layout.AWQ_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).to(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: codes 0, value = zero
    zero = low.to(dtype)
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    rebuilt = codes * scale.float()[..., None] + zero.float()[..., None]
    error = (torch.linalg.vector_norm(rebuilt - groups) / torch.linalg.vector_norm(groups).clamp_min(1e-30)).item()
    tensors = {
        "qweight": layout.pack_awq_codes(codes.reshape(n, k).to(torch.int32)),
        "wscales": scale.T.contiguous(),
        "wzeros": zero.T.contiguous(),
    }
    return tensors, error


@dataclass
class Conversion:
    """The Nunchaku checkpoint: tensors, string metadata, and what the conversion did."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    summary: dict[str, object]


def convert(tensors: dict[str, torch.Tensor], metadata: dict[str, object], uniform_rank: bool = True) -> Conversion:
    """Rewrite a decoded svdq Flux export (see :mod:`svdq_cli.formats.svdq_file`) for Nunchaku.

    Raises:
        ValueError: not a Flux export, a precision or dtype Nunchaku cannot run, a block linear left in 16
            bits, or block tensors this mapping does not know (a changed diffusers layout).
    """
    recipe, quant = metadata["recipe"], metadata["quantization_config"]
    method = METHODS.get(quant.get("method"))
    if method is not None and method.vector:
        raise ValueError(f"Nunchaku runs SVDQuant's W4A4 layers; this export is {quant['method']} vector quantization")
    check_supported(recipe)
    if metadata["model_config"]["class"] != "FluxTransformer2DModel":
        raise ValueError(f"Nunchaku export covers FluxTransformer2DModel; this is {metadata['model_config']['class']}")
    dtype = getattr(torch, recipe["dtype"])
    config = metadata["model_config"]["config"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    layers = _Layers(tensors, metadata["layers"])
    out = {key: value for key, value in tensors.items() if not key.startswith(_BLOCK_PREFIXES)}
    linear4: dict[str, Linear4] = {}
    errors: dict[str, float] = {}
    for kind, count, w4a4, adanorm, plain in (
        ("transformer_blocks", config["num_layers"], DOUBLE_W4A4, DOUBLE_ADANORM, DOUBLE_PLAIN),
        ("single_transformer_blocks", config["num_single_layers"], SINGLE_W4A4, SINGLE_ADANORM, SINGLE_PLAIN),
    ):
        for index in range(count):
            block = f"{kind}.{index}"
            for target, source in w4a4.items():
                linear4[f"{block}.{target}"] = _block_linear(layers, block, target, source, inner, dtype)
            for target, chunks in adanorm.items():
                weight, bias = layers.dense(f"{block}.{target}")
                packed, errors[f"{block}.{target}"] = adanorm_w4a16(weight, bias, chunks, dtype)
                out.update({f"{block}.{target}.{key}": value for key, value in packed.items()})
            for source, target in plain.items():
                out[f"{block}.{target}"] = layers.take(f"{block}.{source}")
    layers.check_all_used()
    ranks = {name: layout.round_up(part.rank, layout.LORA_TILE) for name, part in linear4.items()}
    if uniform_rank:
        ranks = dict.fromkeys(ranks, max(ranks.values()))
    for name, part in linear4.items():
        out.update({f"{name}.{key}": value for key, value in part.pack(ranks[name], dtype).items()})
    rank = max(ranks.values())
    summary = {"w4a4_layers": len(linear4), "w4a16_layers": len(errors), "rank": rank,
               "uniform_rank": uniform_rank, "adanorm_relative_error_max": max(errors.values(), default=0.0),
               "adanorm_relative_error_mean": sum(errors.values()) / max(len(errors), 1),
               "engine_warnings": engine_limits(config)}
    return Conversion(out, _metadata(metadata, quant, rank), summary)


_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


class _Layers:
    """The export's tensors by layer, tracking which block tensors the mapping consumed."""

    def __init__(self, tensors: dict[str, torch.Tensor], layer_metadata: dict[str, dict[str, str]]):
        self.tensors, self.metadata = tensors, layer_metadata
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"the export has no {key}")
        self.used.add(key)
        return self.tensors[key]

    def quantized(self, name: str) -> SVDQLinear:
        if name not in self.metadata:
            raise ValueError(f"layer {name} is 16-bit in this export; Nunchaku needs every block linear in W4A4")
        own = layer_state(self.tensors, name)
        self.used.update(f"{name}.{key}" for key in own)
        return SVDQLinear.from_state_dict(own, self.metadata[name])

    def dense(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias as the model applies them, whether the layer was quantized or left in 16 bits."""
        if name in self.metadata:
            layer = self.quantized(name)
            return layer.effective_weight(), layer.bias.float()
        return self.take(f"{name}.weight").float(), self.take(f"{name}.bias").float()

    def check_all_used(self) -> None:
        left = sorted(key for key in self.tensors if key.startswith(_BLOCK_PREFIXES) and key not in self.used)
        if left:
            raise ValueError(f"{len(left)} block tensor(s) have no place in Nunchaku's layout, e.g. {left[0]}")


def _block_linear(layers: _Layers, block: str, target: str, source, inner: int, dtype: torch.dtype) -> Linear4:
    try:
        if isinstance(source, tuple):  # one half of the single block's proj_out
            whole = Linear4.from_layer(layers.quantized(f"{block}.{source[0]}"))
            part = whole.split_k(inner)[source[1]]
        else:
            part = Linear4.fuse_n([Linear4.from_layer(layers.quantized(f"{block}.{name}")) for name in source], dtype)
    except ValueError as error:
        raise ValueError(f"{block}.{target}: {error}") from None
    if target in GELU_FED and part.precision == "int4":
        part = part.with_input_shift(GELU_SHIFT)
    return part


def check_supported(recipe: dict) -> None:
    """Refuse, before any work, a resolved recipe (RunConfig dict) whose export Nunchaku could not run."""
    quant = recipe["quant"]
    if recipe["family"] not in FAMILIES:
        raise ValueError(f"Nunchaku export covers Flux ({', '.join(FAMILIES)}); this run is {recipe['family']}")
    if quant["precision"] not in ("int4", "nvfp4") or quant["weight_only"]:
        raise ValueError(f"Nunchaku runs W4A4 int4 or nvfp4; this run is {quant['precision']}"
                         + (" weight-only" if quant["weight_only"] else ""))
    if recipe["dtype"] not in ("bfloat16", "float16"):
        raise ValueError(f"Nunchaku runs in bfloat16 or float16; this run is {recipe['dtype']} "
                         "(quantize again with --dtype bfloat16)")
    if quant["precision"] == "int4" and quant["scale_dtype"] != "model":
        raise ValueError(f"Nunchaku keeps INT4 scales in the model dtype; this run has {quant['scale_dtype']}")


def _metadata(source: dict[str, object], quant: dict, rank: int) -> dict[str, str]:
    fp4 = quant["precision"] == "nvfp4"
    side = {"dtype": "fp4_e2m1_all" if fp4 else "int4", "group_size": 16 if fp4 else 64}
    quantization = {
        "method": "svdquant", "rank": rank,
        "weight": {**side, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None},
        "activation": {**side, "scale_dtype": "fp8_e4m3_nan" if fp4 else None},
    }
    config = {"_class_name": "FluxTransformer2DModel", **source["model_config"]["config"]}
    return {
        "config": json.dumps(config, sort_keys=True),
        "comfy_config": json.dumps(comfy_config(config), sort_keys=True),
        "model_class": MODEL_CLASS,
        "quantization_config": json.dumps(quantization, sort_keys=True),
        "svdq_version": str(source["svdq_version"]),
        "svdq_recipe": json.dumps(source["recipe"], sort_keys=True),
    }


def engine_limits(config: dict) -> list[str]:
    """What in this model Nunchaku's GPU engine cannot run, though the file loads (one line each)."""
    head_dim = config["attention_head_dim"]
    if head_dim == ENGINE_HEAD_DIM:
        return []
    return [f"attention_head_dim {head_dim}: Nunchaku's fused QKV epilogue runs head_dim {ENGINE_HEAD_DIM} only "
            "(FLUX.1's); this file loads in Nunchaku but its GPU path cannot run it"]


def comfy_config(config: dict) -> dict:
    """ComfyUI's description of the same Flux model (ComfyUI-nunchaku builds its wrapper from it)."""
    guidance = bool(config.get("guidance_embeds", False))
    return {
        "model_class": "Flux" if guidance else "FluxSchnell",
        "model_config": {
            "axes_dim": list(config["axes_dims_rope"]),
            "context_in_dim": config["joint_attention_dim"],
            "depth": config["num_layers"],
            "depth_single_blocks": config["num_single_layers"],
            "disable_unet_model_creation": True,
            "guidance_embed": guidance,
            "hidden_size": config["num_attention_heads"] * config["attention_head_dim"],
            "image_model": "flux",
            "in_channels": config["in_channels"] // 4,  # ComfyUI counts latent channels before 2×2 packing
            "mlp_ratio": 4.0,
            "num_heads": config["num_attention_heads"],
            "out_channels": (config.get("out_channels") or config["in_channels"]) // 4,
            "patch_size": 2,
            "qkv_bias": True,
            "theta": 10000,
            "vec_in_dim": config["pooled_projection_dim"],
        },
    }
