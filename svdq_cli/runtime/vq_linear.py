"""VQLinear: a linear layer stored as one codebook and packed codeword indices (VQ4DiT, README "VQ layers").

Its :meth:`VQLinear.reference_forward` is the specification ``kernels/vq_gemm.cu`` is tested against::

    W[r, j·d:(j+1)·d] = codebook[index(r, j)]        (gathered in float32)
    y = x · Wᵀ + bias

On a CUDA input (or under :func:`~svdq_cli.runtime.kernels.emulated` on the CPU) the kernel runs instead when
the layer qualifies (bf16/fp16 input of the layer's dtype, compute capability 8.0 or newer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.vq import VQShape, pack_indices, packed_width, unpack_indices
from . import kernels

CODEBOOK, CODES, BIAS = "codebook", "codes", "bias"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class VQLinear(nn.Module):
    """A vector-quantized replacement for ``nn.Linear``.

    Buffers: ``codebook`` ``[k, d]`` (model dtype), ``codes`` ``[N, ceil(K/d · bits·d / 8)]`` uint8 (indices
    packed LSB first per row, see :func:`~svdq_cli.quant.vq.pack_indices`), ``bias`` ``[N]`` if any. The
    non-tensor facts (``format: vq``, bits, dim, shapes, dtype, method) are :meth:`layer_metadata`.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, dim: int, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, method: str = "vq4dit",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % dim:
            raise ValueError(f"vector dimension {dim} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.shape, self.dtype, self.method = VQShape(dim, bits), dtype, method
        self.register_buffer(CODEBOOK, torch.zeros(self.shape.codewords, dim, dtype=dtype, device=device))
        self.register_buffer(CODES, torch.zeros(out_features, packed_width(in_features, self.shape),
                                                dtype=torch.uint8, device=device))
        self.register_buffer(BIAS, torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_parts(cls, codebook: torch.Tensor, assignments: torch.Tensor, bias: torch.Tensor | None, *, bits: int,
                   dtype: torch.dtype, method: str = "vq4dit") -> VQLinear:
        """A layer from a float codebook ``[k, d]`` and assignments ``[N, K/d]``."""
        n, groups = assignments.shape
        dim = codebook.shape[1]
        layer = cls(groups * dim, n, bits=bits, dim=dim, bias=bias is not None, dtype=dtype, method=method)
        with torch.no_grad():
            layer.codebook.copy_(codebook)
            layer.codes.copy_(pack_indices(assignments, layer.shape.index_bits))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def assignments(self) -> torch.Tensor:
        """Codeword index of every sub-vector, ``[N, K/d]`` int64, unpacked once per state of ``codes``: the
        reference forward needs them on every call, and unpacking goes through every bit (64× the codes'
        bytes)."""
        key = (self.codes.data_ptr(), self.codes._version)
        cached = getattr(self, "_assignments", None)
        if cached is None or cached[0] != key:
            unpacked = unpack_indices(self.codes.cpu(), self.in_features // self.shape.dim, self.shape.index_bits)
            cached = self._assignments = (key, unpacked)
        return cached[1]

    def weight_float(self) -> torch.Tensor:
        """The decoded weight ``[N, K]``, float32 (on the codebook's device)."""
        indices = self.assignments().to(self.codebook.device)
        return self.codebook.float()[indices].reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")

        fused = kernels.try_vq(self, x)
        return self.reference_forward(x) if fused is None else fused

    def reference_forward(self, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """Gather, then matmul in float32 (the kernel's specification); ``channels`` limits the output."""
        weight, bias = self.weight_float(), self.bias
        if channels is not None:
            weight, bias = weight[channels], None if bias is None else bias[channels]
        y = x.reshape(-1, self.in_features).float() @ weight.T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    def layer_metadata(self) -> dict[str, str]:
        return {"format": "vq", "method": self.method, "bits": str(self.shape.bits), "dim": str(self.shape.dim),
                "in_features": str(self.in_features), "out_features": str(self.out_features),
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> VQLinear:
        """Rebuild a layer from its ``state_dict()`` and :meth:`layer_metadata`.

        Raises:
            ValueError: missing facts, or tensors whose names, shapes or dtypes disagree with them.
        """
        try:
            layer = cls(int(metadata["in_features"]), int(metadata["out_features"]), bits=int(metadata["bits"]),
                        dim=int(metadata["dim"]), bias=BIAS in tensors, dtype=_DTYPES[metadata["dtype"]],
                        method=metadata.get("method", "vq4dit"), device=tensors[CODES].device)
        except KeyError as missing:
            raise ValueError(f"VQ layer is missing {missing}") from None
        expected = layer.state_dict()
        if set(tensors) != set(expected):
            raise ValueError(f"VQ layer tensors {sorted(tensors)} do not match the expected {sorted(expected)}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
                raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} where "
                                 f"{tuple(expected[name].shape)} {expected[name].dtype} is expected")
        layer.load_state_dict(tensors)
        return layer

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def bits_per_weight(self) -> float:
        """Stored bits per weight including the codebook (not the bias), from the buffers themselves."""
        stored = self.codes.numel() * 8 + self.codebook.numel() * self.codebook.element_size() * 8
        return stored / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.shape.bits}, "
                f"dim={self.shape.dim}, codewords={self.shape.codewords}, method={self.method}")
