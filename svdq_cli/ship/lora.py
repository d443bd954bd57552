"""Off-the-shelf LoRAs joined to the low-rank branch, with no re-quantization (DESIGN.md §1 step 5).

A LoRA adds ``ΔW = s·B·A`` (A ``[r, K]``, B ``[N, r]``) to a layer. A quantized layer's branch acts on the
smoothed input ``x̂ = (x + shift)/λ``, so ``x·Aᵀ = x̂·(A·diag(λ))ᵀ − shift·A·1`` and the LoRA joins as

    lora_down' = [lora_down; A·diag(λ)],   lora_up' = [lora_up, s·B],   bias' = bias − shift·s·B·(A·1)

The added rank is zero-padded to a multiple of 16 so the fused kernels still apply. A LoRA on a layer kept
in 16 bits is merged into its weight. Several LoRAs stack. Only safetensors LoRA files are read (never
pickles). Key layouts understood: PEFT/diffusers (``<layer>.lora_A.weight`` / ``lora_B``), older diffusers
(``<layer>.lora.down.weight`` / ``lora.up``), kohya (``lora_unet_<layer with _>.lora_down.weight`` /
``lora_up``, with ``.alpha``); optional ``transformer.``/``base_model.model.`` prefixes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import BadInputError
from ..formats.svdq_file import PLAIN_KEYS, read_metadata
from ..system.files import atomic_write_bytes, safetensors_bytes, sha256_file

_PATTERNS = (
    (re.compile(r"^(?P<layer>.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(?P<layer>.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(?P<layer>.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<layer>.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<layer>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<layer>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<layer>.+)\.alpha$"), "alpha"),
)
_PREFIXES = ("base_model.model.", "transformer.", "lora_unet_", "lora_transformer_")


@dataclass
class LoraPair:
    down: torch.Tensor  # A [r, K]
    up: torch.Tensor  # B [N, r]
    alpha: float | None = None

    @property
    def scale(self) -> float:
        """The LoRA's own α/r factor (1 without alpha)."""
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def read_lora(path: Path) -> dict[str, LoraPair]:
    """The LoRA pairs of a safetensors file, keyed by the layer name as written in the file.

    Raises:
        BadInputError: not a safetensors file (pickles are refused), an incomplete pair, or a LoRA tensor holding
            NaN or Inf.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BadInputError(f"{path}: only .safetensors LoRA files are read (pickled .bin/.pt/.ckpt are refused)")
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise BadInputError(f"LoRA file {path} does not exist") from None
    except Exception as error:  # safetensors' own error types for malformed files
        raise BadInputError(f"{path} is not a readable safetensors file ({type(error).__name__})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for pattern, role in _PATTERNS:
            match = pattern.match(key)
            if match:
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():  # would poison the export
                    raise BadInputError(f"{path}: tensor {key} holds NaN or Inf")
                parts.setdefault(match["layer"], {})[role] = tensor
                break
    pairs = {}
    for layer, found in parts.items():
        if "down" not in found or "up" not in found:
            raise BadInputError(f"{path}: layer {layer} has an incomplete LoRA pair ({', '.join(sorted(found))})")
        alpha = float(found["alpha"]) if "alpha" in found else None
        pairs[layer] = LoraPair(found["down"].float(), found["up"].float(), alpha)
    if not pairs:
        raise BadInputError(f"{path} holds no LoRA weights in a known key layout")
    return pairs


def _resolver(layers: list[str]):
    """Maps a LoRA layer name (dotted, or kohya's underscores; optional prefixes) to our module path."""
    flattened = {layer.replace(".", "_"): layer for layer in layers}

    def resolve(name: str) -> str | None:
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        return flattened.get(name.replace(".", "_"))

    return resolve


def apply_lora(export: Path, lora: Path, scale: float, out: Path) -> dict[str, object]:
    """Write ``out``: the export with ``lora`` joined (quantized layers) or merged (16-bit layers).

    Raises:
        BadInputError: unreadable files, a LoRA layer the model does not have, mismatched shapes.
    """
    if not math.isfinite(scale):
        raise BadInputError(f"--scale {scale} is not a finite number")
    metadata = read_metadata(export)
    digest = sha256_file(lora) if Path(lora).is_file() else None
    for earlier in metadata.get("loras", []):
        if digest is not None and earlier.get("sha256") == digest:
            raise BadInputError(f"{Path(lora).name} is already applied to {Path(export).name} (applying it again "
                                "would double its effect)")
    quantized = metadata["layers"]
    if any(facts.get("format") == "vq" for facts in quantized.values()):
        raise BadInputError(f"{Path(export).name} holds VQ layers, which have no low-rank branch to join a LoRA to; "
                            "merge the LoRA into the 16-bit model and quantize that")
    tensors = load_file(str(export))
    sixteen_bit = [key[: -len(".weight")] for key in tensors if key.endswith(".weight")
                   and key[: -len(".weight")] not in quantized]
    joined, merged = [], []
    resolve = _resolver([*quantized, *sixteen_bit])
    for name, pair in read_lora(lora).items():
        target = resolve(name)
        if target is None:
            raise BadInputError(f"LoRA layer {name} matches no layer of {export.name}")
        factor = scale * pair.scale
        if target in quantized:
            _join(tensors, target, pair, factor, quantized[target])
            joined.append(target)
        else:
            weight = tensors[f"{target}.weight"]
            _check(target, pair, weight.shape[1], weight.shape[0])
            tensors[f"{target}.weight"] = (weight.float() + factor * pair.up @ pair.down).to(weight.dtype)
            merged.append(target)
    raw = {key: (value if key in PLAIN_KEYS else json.dumps(value, sort_keys=True))
           for key, value in metadata.items()}
    applied = json.loads(raw.get("loras", "[]"))
    applied.append({"file": Path(lora).name, "sha256": digest, "scale": scale, "layers": len(joined) + len(merged)})
    raw["loras"] = json.dumps(applied, sort_keys=True)
    atomic_write_bytes(Path(out), safetensors_bytes(tensors, raw))
    return {"out": str(out), "joined": len(joined), "merged": len(merged)}


def _check(name: str, pair: LoraPair, in_features: int, out_features: int) -> None:
    rank = pair.down.shape[0]
    if pair.down.shape != (rank, in_features) or pair.up.shape != (out_features, rank):
        raise BadInputError(f"LoRA for {name}: A {tuple(pair.down.shape)} and B {tuple(pair.up.shape)} do not fit "
                            f"a {in_features}→{out_features} layer")


def _join(tensors: dict[str, torch.Tensor], name: str, pair: LoraPair, factor: float, layer: dict[str, str]) -> None:
    _check(name, pair, int(layer["in_features"]), int(layer["out_features"]))
    down, up = tensors[f"{name}.lora_down"], tensors[f"{name}.lora_up"]
    smooth = tensors[f"{name}.smooth"].float()
    extra = -(-pair.down.shape[0] // 16) * 16  # zero-pad the added rank to a multiple of 16 (fused kernels)
    new_down = torch.zeros(extra, down.shape[1])
    new_up = torch.zeros(up.shape[0], extra)
    new_down[: pair.down.shape[0]] = pair.down * smooth
    new_up[:, : pair.up.shape[1]] = factor * pair.up
    tensors[f"{name}.lora_down"] = torch.cat((down.float(), new_down)).to(down.dtype)
    tensors[f"{name}.lora_up"] = torch.cat((up.float(), new_up), dim=1).to(up.dtype)
    shift = tensors.get(f"{name}.shift")
    if shift is not None and float(shift) != 0.0:
        bias = tensors[f"{name}.bias"]
        correction = float(shift) * factor * (pair.up @ pair.down.sum(dim=1))
        tensors[f"{name}.bias"] = (bias.float() - correction).to(bias.dtype)
