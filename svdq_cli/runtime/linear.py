"""SVDQLinear: a linear layer stored as smoothing factors, a 16-bit low-rank branch and a 4-bit residual.

Its :meth:`SVDQLinear.forward` is the reference path and the *specification* the fused CUDA kernels are
tested against (DESIGN.md §1 step 4), so it stays simple and exact, in float32 on any device::

    x̂ = (x + shift) / λ
    y = dequant(quant(x̂)) · dequant(qweight)ᵀ + (x̂ · lora_downᵀ) · lora_upᵀ + bias

with activations quantized dynamically per token (group-wise, float32 scales; NVFP4 with a per-token
second-level scale) and ``quant`` the identity for weight-only layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods.config import QuantConfig
from ..quant.formats import QTensor, dequantize, get_format
from ..quant.packing import unpack_nibbles
from ..quant.svdquant import (
    branch_factors,
    check_act_mode,
    fake_quantize_activations,
    quantize_residual,
    scale_dtype_for,
)
from . import kernels, keys

ACT_RANGES = ("full", "symmetric", "nunchaku")  # a layer's activation rule (see quant.svdquant)
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class SVDQLinear(nn.Module):
    """A quantized replacement for ``nn.Linear`` holding canonical packed tensors (DESIGN.md §2).

    Buffers: ``qweight``, ``wscales`` (``wtscale`` for NVFP4), ``smooth``, ``lora_down``, ``lora_up``,
    ``bias`` (if any) and ``shift`` (unsigned activations). Non-tensor format facts (precision, activation
    mode, dtype) are in :meth:`layer_metadata`, which :meth:`from_state_dict` takes back.

    Args:
        in_features, out_features: as ``nn.Linear``.
        precision: ``int4``, ``nvfp4`` or ``int8``.
        rank: low-rank branch rank (0: no branch).
        act: activation quantization, ``signed``, ``unsigned`` (non-negative inputs, shifted) or ``none``.
        act_range: signed activation scales over the whole code range (``full``, from config version 2) or
            ``symmetric`` (``max|x|/7``: exports of version-1 configs).
        bias: whether there is a bias.
        dtype: the model dtype (branch, λ, bias and output).
        scale_dtype: storage dtype of INT weight scales (defaults to ``dtype``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        precision: str = "int4",
        rank: int = 0,
        act: str = "signed",
        act_range: str = "full",
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        scale_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        fmt = get_format(precision)
        check_act_mode(act, fmt)
        if fmt.bits < 4 and act != "none":
            raise ValueError(f"{precision} is a weight-only format (the VQ methods' baseline): act must be none")
        if in_features % fmt.group_size:
            raise ValueError(
                f"in_features {in_features} is not divisible by the {precision} group size {fmt.group_size}"
            )
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank {rank} must lie in 0..min(in_features, out_features) = {min(in_features, out_features)}"
            )
        self.in_features, self.out_features = in_features, out_features
        if act_range not in ACT_RANGES:
            raise ValueError(f"unknown activation range {act_range!r} (allowed: {', '.join(ACT_RANGES)})")
        self.precision, self.act, self.act_range, self.dtype = precision, act, act_range, dtype
        self.fmt = fmt
        code_shape = (out_features, in_features // 2) if fmt.packs_nibbles else (out_features, in_features)
        code_dtype = torch.uint8 if fmt.packs_nibbles else torch.int8
        scale_dtype = torch.float8_e4m3fn if fmt.is_float else (scale_dtype or dtype)
        new = dict(device=device)
        self.register_buffer(keys.QWEIGHT, torch.zeros(code_shape, dtype=code_dtype, **new))
        self.register_buffer(
            keys.WSCALES, torch.zeros(out_features, in_features // fmt.group_size, dtype=scale_dtype, **new)
        )
        self.register_buffer(keys.WTSCALE, torch.zeros((), dtype=torch.float32, **new) if fmt.is_float else None)
        self.register_buffer(keys.SMOOTH, torch.ones(in_features, dtype=dtype, **new))
        self.register_buffer(keys.SHIFT, torch.zeros((), dtype=torch.float32, **new) if act == "unsigned" else None)
        self.register_buffer(keys.LORA_DOWN, torch.zeros(rank, in_features, dtype=dtype, **new))
        self.register_buffer(keys.LORA_UP, torch.zeros(out_features, rank, dtype=dtype, **new))
        # Unsigned activations fold their shift into the bias, so such a layer always has one.
        has_bias = bias or act == "unsigned"
        self.register_buffer(keys.BIAS, torch.zeros(out_features, dtype=dtype, **new) if has_bias else None)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: QuantConfig | None = None,
        *,
        smooth: torch.Tensor | None = None,
        act: str | None = None,
        shift: float = 0.0,
        hessian: torch.Tensor | None = None,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
        gram: torch.Tensor | None = None,
    ) -> SVDQLinear:
        """Quantize an ``nn.Linear``.

        Args:
            linear: the layer; its weight dtype becomes the model dtype.
            config: method, precision, rank, GPTQ…; defaults to ``QuantConfig()``.
            smooth: λ [K] from a smoothing search (storage-rounded); None means no smoothing.
            act: activation mode; defaults to ``none`` for weight-only configs, else ``signed``.
            shift: for ``act="unsigned"``: constant added to inputs to make them non-negative; the bias is
                corrected so the layer still computes ``x Wᵀ + b``.
            hessian: ``Σ x̂ᵀx̂`` of smoothed calibration inputs, required for GPTQ.
            factors: an already computed low-rank branch ``(lora_down, lora_up)`` to reuse.
            gram: the smoothed calibration inputs' mean ``x̂ᵀx̂`` within each group ``[K/group, group, group]``,
                so the weight-scale search minimises output error (``config.scale_search``).

        Raises:
            ValueError: bad shapes, non-finite weights, rank too large, GPTQ without a Hessian.
        """
        config = config or QuantConfig()
        weight = linear.weight.detach()
        if not torch.isfinite(weight).all():
            raise ValueError("weight holds NaN or Inf")
        act = act or ("none" if config.weight_only else "signed")
        dtype = weight.dtype if weight.dtype in _DTYPES.values() else torch.float32
        n, k = weight.shape
        rank = config.rank_for(act)
        if rank > min(n, k):
            raise ValueError(f"rank {rank} exceeds min(out_features, in_features) = {min(n, k)}")
        layer = cls(
            k,
            n,
            precision=config.precision,
            rank=rank,
            act=act,
            act_range=config.activation_rule,
            bias=linear.bias is not None,
            dtype=dtype,
            scale_dtype=scale_dtype_for(config, dtype),
            device=weight.device,
        )
        smooth = torch.ones(k, device=weight.device) if smooth is None else smooth.to(weight.device)
        down, up = factors if factors is not None else branch_factors(weight, smooth, config, dtype, rank)
        if down.shape != (rank, k) or up.shape != (n, rank):
            raise ValueError(f"low-rank factors {tuple(down.shape)}, {tuple(up.shape)} do not fit rank {rank}")
        residual = quantize_residual(weight, smooth, down, up, config, dtype, hessian, gram)
        layer.load_parts(residual, smooth, down, up, linear.bias, shift)
        return layer

    @torch.no_grad()
    def load_parts(
        self,
        residual: QTensor,
        smooth: torch.Tensor,
        lora_down: torch.Tensor,
        lora_up: torch.Tensor,
        bias: torch.Tensor | None,
        shift: float = 0.0,
    ) -> None:
        """Fill the buffers from a decomposition; with a shift, fold ``−shift · W_eff · 1`` into the bias."""
        self.qweight.copy_(residual.packed())
        self.wscales.copy_(residual.scales)
        if self.fmt.is_float:
            self.wtscale.copy_(residual.tensor_scale)
        self.smooth.copy_(smooth)
        self.lora_down.copy_(lora_down)
        self.lora_up.copy_(lora_up)
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))
        if self.act == "unsigned":
            self.shift.fill_(shift)
            # y = (x + c) W_effᵀ − c · W_eff·1 + b: the exact correction uses the weight the layer really has.
            self.bias.copy_(self.bias.float() - self.shift_correction())

    # --- the reference forward ---------------------------------------------------------------------------

    def residual_weight(self, channels: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Dequantized residual ``[N, K]`` (smoothed space), float32; only the rows of ``channels`` if given."""
        qweight, wscales = self.qweight, self.wscales
        if channels is not None:
            qweight, wscales = qweight[channels], wscales[channels]
        codes = unpack_nibbles(qweight, signed=not self.fmt.is_float) if self.fmt.packs_nibbles else qweight
        return dequantize(codes, wscales, self.fmt, self.wtscale)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies to its (shifted) input, ``(R + L_up L_down) · diag(1/λ)``, float32."""
        weight = self.residual_weight() + self.lora_up.float() @ self.lora_down.float()
        return weight / self.smooth.float()

    def unshifted_bias(self) -> torch.Tensor:
        """The bias ``[N]`` (float32) the layer has for an unshifted input: the model's own (zeros if none),
        with an unsigned layer's shift fold undone, for engines that quantize every input signed."""
        bias = self.bias.float() if self.bias is not None else torch.zeros(self.out_features)
        return bias + self.shift_correction() if self.shift is not None else bias

    def shift_correction(self) -> torch.Tensor:
        """``shift · W_eff·1`` [N], float32: what the bias holds back for an unsigned layer's input shift
        (``W_eff·1`` without materializing ``W_eff``: one dequantized residual, no more)."""
        inverse = 1.0 / self.smooth.float()
        rows = max(1, (1 << 22) // self.in_features)  # 16 MB of dequantized rows at a time
        residual_sums = torch.cat([self.residual_weight(slice(start, start + rows)) @ inverse
                                   for start in range(0, self.out_features, rows)])
        return self.shift.float() * (residual_sums + self.lora_up.float() @ (self.lora_down.float() @ inverse))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")

        fused = kernels.try_fused(self, x)
        return self.reference_forward(x) if fused is None else fused

    def reference_forward(self, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """The specification the fused kernels are tested against (see the module docstring); with
        ``channels``, only those output channels (each is computed independently of the others)."""
        rows = x.reshape(-1, self.in_features).float()
        if self.shift is not None:
            rows = rows + self.shift
        smoothed = rows / self.smooth.float()
        lora_up, bias = self.lora_up, self.bias
        if channels is not None:
            lora_up, bias = lora_up[channels], None if bias is None else bias[channels]
        residual = self.residual_weight(channels)
        y = fake_quantize_activations(smoothed, self.fmt, self.act, self.act_range, self.dtype) @ residual.T
        if self.rank:
            y = y + (smoothed @ self.lora_down.float().T) @ lora_up.float().T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], residual.shape[0])

    # --- serialization ------------------------------------------------------------------------------

    def layer_metadata(self) -> dict[str, str]:
        """The non-tensor facts :meth:`from_state_dict` needs (strings, for safetensors metadata)."""
        return {
            keys.META_PRECISION: self.precision,
            keys.META_ACT: self.act,
            keys.META_ACT_RANGE: self.act_range,
            keys.META_IN: str(self.in_features),
            keys.META_OUT: str(self.out_features),
            keys.META_DTYPE: str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> SVDQLinear:
        """Rebuild a layer from its ``state_dict()`` tensors and :meth:`layer_metadata`.

        Raises:
            ValueError: missing or unknown keys, or tensors whose shapes disagree with the metadata.
        """
        try:
            dtype = _DTYPES[metadata[keys.META_DTYPE]]
            layer = cls(
                int(metadata[keys.META_IN]),
                int(metadata[keys.META_OUT]),
                precision=metadata[keys.META_PRECISION],
                rank=tensors[keys.LORA_DOWN].shape[0],
                act=metadata[keys.META_ACT],
                act_range=metadata.get(keys.META_ACT_RANGE, "symmetric"),  # exports before full range: /7
                bias=keys.BIAS in tensors,
                dtype=dtype,
                scale_dtype=tensors[keys.WSCALES].dtype,
                device=tensors[keys.QWEIGHT].device,
            )
        except KeyError as missing:
            raise ValueError(f"quantized layer is missing {missing}") from None
        expected = set(layer.state_dict())
        if set(tensors) != expected:
            raise ValueError(f"quantized layer tensors {sorted(tensors)} do not match the expected {sorted(expected)}")
        for name, tensor in tensors.items():
            current = getattr(layer, name)
            if tensor.shape != current.shape or tensor.dtype != current.dtype:
                found, wanted = f"{tuple(tensor.shape)} {tensor.dtype}", f"{tuple(current.shape)} {current.dtype}"
                raise ValueError(f"{name}: {found} where {wanted} is expected")
        layer.load_state_dict(tensors)
        return layer

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, λ, branch, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, precision={self.precision}, "
            f"rank={self.rank}, act={self.act}, act_range={self.act_range}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}"
        )
