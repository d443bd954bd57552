"""Vector quantization of weights (VQ4DiT, Deng et al., arXiv 2408.17131): codebooks, candidate assignments
with softmax ratios, and the calibration that tunes both.

A weight ``W [N, K]`` is cut along K into sub-vectors of ``d`` consecutive elements (``M = N·K/d`` of them).
One codebook of ``k = 2^(bits·d)`` codewords per layer (float32 while calibrating, the model dtype when
stored) is fitted by seeded k-means; each sub-vector keeps the index of one codeword, so a weight costs
``bits`` bits plus the codebook's share (``k·d·16 / (N·K)``: 0.0017 bits for 3072×3072 at 2 bits).

VQ4DiT's point is that k-means assignments are not the best ones for the layer's *output*: every sub-vector
gets a candidate set of its ``n`` nearest codewords, and the quantized sub-vector is their average weighted
by softmax ratios. Calibration (Adam) lowers the output error of the block (or of the layer, without blocks)
plus ``λ_r`` times a term that is zero exactly when every ratio set is one-hot, with ``λ_r`` rising from 0,
so the ratios settle on one candidate; each sub-vector then keeps its highest-ratio candidate, and a last
phase tunes the codebook alone with those assignments. The codebook-only baseline (``kmeans``) keeps the
k-means assignments and spends the same steps on the codebook.

Everything here is deterministic on the CPU for a given seed (seeded sampling, stable sorts, single-threaded
callers), so a resumed run writes the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

CHUNK = 1 << 15  # sub-vectors per distance computation: bounds the [chunk, k] distance matrix (0.5 GB at k=4096)
KMEANS_SAMPLE = 1 << 17  # sub-vectors the Lloyd iterations fit on; every sub-vector is then assigned


@dataclass(frozen=True)
class VQShape:
    """How a layer is vector-quantized: sub-vector dimension, codewords, and the bits of one index."""

    dim: int
    bits: int  # bits per weight (index bits / dim)

    @property
    def index_bits(self) -> int:
        return self.bits * self.dim

    @property
    def codewords(self) -> int:
        return 1 << self.index_bits

    def bits_per_weight(self, out_features: int, in_features: int, codebook_bits: int = 16) -> float:
        """Stored bits per weight: the indices plus the codebook's share (bias not counted)."""
        return self.bits + self.codewords * self.dim * codebook_bits / (out_features * in_features)


def subvectors(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N, K]`` → ``[N·K/d, d]`` float32, row by row (sub-vector j of row r is ``W[r, j·d:(j+1)·d]``)."""
    n, k = weight.shape
    if k % dim:
        raise ValueError(f"vector dimension {dim} does not divide in_features {k}")
    return weight.detach().float().reshape(n * k // dim, dim)


def nearest(vectors: torch.Tensor, codebook: torch.Tensor, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` nearest codewords of every vector, nearest first: indices ``[M, count]`` (int64) and
    squared Euclidean distances ``[M, count]``, computed in chunks (``‖c‖² − 2x·c`` ranks the codewords; ``‖x‖²``
    is added to the chosen ones only)."""
    codebook_sq = (codebook * codebook).sum(1)
    indices, distances = [], []
    for start in range(0, vectors.shape[0], CHUNK):
        chunk = vectors[start:start + CHUNK]
        score = torch.addmm(codebook_sq, chunk, codebook.T, alpha=-2)
        if count == 1:
            values, index = score.min(dim=1, keepdim=True)
        else:
            values, index = torch.topk(score, count, dim=1, largest=False, sorted=True)
        indices.append(index)
        distances.append((values + (chunk * chunk).sum(1, keepdim=True)).clamp_min_(0))
    return torch.cat(indices), torch.cat(distances)


def kmeans(vectors: torch.Tensor, codewords: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """A seeded k-means (Lloyd) codebook ``[k, d]`` float32 for ``vectors`` ``[M, d]``.

    Fitted on a seeded sample of at most :data:`KMEANS_SAMPLE` vectors, started from distinct sampled
    vectors; a codeword that loses every member keeps its place. Fewer vectors than codewords: each vector
    is a codeword and the rest repeat the first ones (never used by a nearest search that prefers the lower
    index on ties).
    """
    generator = torch.Generator().manual_seed(seed)
    m = vectors.shape[0]
    sample = vectors if m <= KMEANS_SAMPLE else vectors[torch.randperm(m, generator=generator)[:KMEANS_SAMPLE]]
    if sample.shape[0] <= codewords:
        repeats = -(-codewords // sample.shape[0])
        return sample.repeat(repeats, 1)[:codewords].clone()
    codebook = sample[torch.randperm(sample.shape[0], generator=generator)[:codewords]].clone()
    for _ in range(iterations):
        assignment = nearest(sample, codebook)[0][:, 0]
        sums = torch.zeros(codewords, sample.shape[1], dtype=torch.float64).index_add_(0, assignment, sample.double())
        counts = torch.bincount(assignment, minlength=codewords)
        filled = counts > 0
        updated = codebook.clone()
        updated[filled] = (sums[filled] / counts[filled, None]).float()
        if torch.equal(updated, codebook):
            break
        codebook = updated
    return codebook


def ratio_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over sub-vectors of ``1 − Σ r²`` (r = softmax ratios): 0 exactly when each ratio set is one-hot."""
    ratios = torch.softmax(logits, dim=-1)
    return (1 - (ratios * ratios).sum(-1)).mean()


class _RatioAverage(torch.autograd.Function):
    """``Σ_j ratios[:, j] · codebook[candidates[:, j]]`` ``[M, d]`` whose backward recomputes the gathers instead
    of saving them: autograd would keep the ``[M, n, d]`` gathered candidates and their products (about 11 GB
    for a FLUX double block at n = 4); this keeps the ratios and the indices only."""

    @staticmethod
    def forward(ctx, ratios: torch.Tensor, codebook: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ratios.shape[0], codebook.shape[1], dtype=codebook.dtype, device=codebook.device)
        for j in range(candidates.shape[1]):
            out.addcmul_(codebook[candidates[:, j]], ratios[:, j:j + 1])
        ctx.save_for_backward(ratios, codebook, candidates)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ratios, codebook, candidates = ctx.saved_tensors
        grad_ratios = torch.empty_like(ratios)
        grad_codebook = torch.zeros_like(codebook)
        for j in range(candidates.shape[1]):
            index = candidates[:, j]
            grad_ratios[:, j] = (grad * codebook[index]).sum(1)
            grad_codebook.index_add_(0, index, grad * ratios[:, j:j + 1])
        return grad_ratios, grad_codebook, None


def ratio_average(ratios: torch.Tensor, codebook: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The ratio-weighted average of each sub-vector's candidate codewords, ``[M, d]`` (memory-lean backward)."""
    return _RatioAverage.apply(ratios, codebook, candidates)


class SoftVQLinear(nn.Module):
    """A linear layer whose weight is rebuilt from a trainable codebook and candidate ratios (calibration only).

    ``weight = Σ_j softmax(logits)_j · codebook[candidates_j]`` per sub-vector (``hard``: the assigned codeword
    alone). The codebook is stored divided by ``scale`` (its initial RMS), so one Adam learning rate fits any
    layer's weight magnitude.
    """

    def __init__(self, linear: nn.Linear, shape: VQShape, seed: int, candidates: int, kmeans_iters: int,
                 assignments_trainable: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features, self.in_features = weight.shape
        self.shape = shape
        vectors = subvectors(weight, shape.dim)
        codebook = kmeans(vectors, shape.codewords, seed, kmeans_iters)
        self.scale = float(codebook.pow(2).mean().sqrt().clamp_min(1e-12))
        self.codebook = nn.Parameter(codebook / self.scale)
        count = min(candidates, shape.codewords) if assignments_trainable else 1
        index, distance = nearest(vectors, codebook, count)
        self.register_buffer("candidates", index.int())  # int32: half the memory of int64 indices
        # Ratios start as a softmax of −distance², in units of the mean spread between the nearest and the farthest
        # candidate (so initial logits differ by O(1) whatever the scale, even where the nearest codeword is exact).
        temperature = (distance[:, -1] - distance[:, 0]).mean().clamp_min(1e-20)
        self.logits = nn.Parameter(-distance / temperature, requires_grad=assignments_trainable and count > 1)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.hard: torch.Tensor | None = None if self.logits.requires_grad else self.candidates[:, 0]

    def harden(self) -> None:
        """Keep each sub-vector's highest-ratio candidate; the ratios train no more."""
        choice = self.logits.detach().argmax(dim=1, keepdim=True)
        self.hard = self.candidates.gather(1, choice)[:, 0]
        self.logits.requires_grad_(False)

    def weight(self) -> torch.Tensor:
        codebook = self.codebook * self.scale
        if self.hard is not None:
            vectors = codebook[self.hard]
        else:
            vectors = ratio_average(torch.softmax(self.logits, dim=-1), codebook, self.candidates)
        return vectors.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def assignments(self) -> torch.Tensor:
        """The final codeword index of every sub-vector, ``[N, K/d]`` int64 (after :meth:`harden`)."""
        if self.hard is None:
            raise RuntimeError("assignments before harden()")
        return self.hard.long().reshape(self.out_features, self.in_features // self.shape.dim)

    def final_codebook(self) -> torch.Tensor:
        return (self.codebook.detach() * self.scale).float()


@dataclass(frozen=True)
class CalibrationResult:
    """The relative output error before calibration (k-means, nearest codeword) and after it."""

    error_before: float
    error_after: float
    steps: int


def calibrate(
    layers: Sequence[SoftVQLinear],
    distortion: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    ratio_weight: float,
    hard_fraction: float = 0.25,
) -> CalibrationResult:
    """Tune codebooks (and, where trainable, candidate ratios) of ``layers`` with Adam.

    ``distortion(step)`` is the relative output error on the step's calibration input (the block's, or the
    layer's). The first ``1 − hard_fraction`` of the steps minimise ``distortion + λ_r(t)·ratio_loss`` with
    ``λ_r`` rising linearly from 0 to ``ratio_weight``; the layers are then hardened (highest ratio wins) and
    the remaining steps tune the codebooks alone. Layers with frozen assignments (k-means baseline) spend
    every step on the codebook.
    """
    soft = [layer for layer in layers if layer.logits.requires_grad]
    soft_steps = round(steps * (1 - hard_fraction)) if soft else 0
    error_before = _hard_error(layers, distortion)
    codebooks = [layer.codebook for layer in layers]
    logits = [layer.logits for layer in soft]
    groups = [{"params": codebooks, "lr": lr}] + ([{"params": logits, "lr": 10 * lr}] if logits else [])
    optimizer = torch.optim.Adam(groups)
    for step in range(steps):
        if step == soft_steps and soft:
            for layer in soft:
                layer.harden()
            optimizer = torch.optim.Adam([{"params": codebooks, "lr": lr}])
        loss = distortion(step)
        if step < soft_steps:
            weight = ratio_weight * (step + 1) / soft_steps
            loss = loss + weight * sum(ratio_loss(layer.logits) for layer in soft) / len(soft)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for layer in soft:
        if layer.hard is None:  # steps == 0
            layer.harden()
    return CalibrationResult(error_before, _mean_error(distortion), steps)


EVALUATION_STEPS = 4  # calibration inputs (steps 0…3) the before/after errors are averaged over


def _mean_error(distortion: Callable[[int], torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(distortion(step) for step in range(EVALUATION_STEPS)) / EVALUATION_STEPS)


def _hard_error(layers: Sequence[SoftVQLinear], distortion: Callable[[int], torch.Tensor]) -> float:
    """The distortion with every layer on its nearest (k-means) codeword."""
    saved = [(layer.hard, layer.logits.requires_grad) for layer in layers]
    for layer in layers:
        layer.hard = layer.candidates[:, 0]
    error = _mean_error(distortion)
    for layer, (hard, trainable) in zip(layers, saved, strict=True):
        layer.hard = hard
        layer.logits.requires_grad_(trainable)
    return error


def relative_output_error(output: torch.Tensor | Sequence, reference: torch.Tensor | Sequence) -> torch.Tensor:
    """``Σ‖y − y_ref‖² / Σ‖y_ref‖²`` over the tensors of a (possibly nested) output."""
    outputs, references = output_tensors(output), output_tensors(reference)
    error = sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(outputs, references, strict=True))
    power = sum((r.float() ** 2).sum() for r in references)
    return error / power.clamp_min(1e-30)


def output_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in output_tensors(item)]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in output_tensors(value[key])]
    if hasattr(value, "to_tuple"):  # diffusers/transformers ModelOutput
        return output_tensors(value.to_tuple())
    return []


# --- packed indices -----------------------------------------------------------------------------------------


def packed_width(in_features: int, shape: VQShape) -> int:
    """Bytes per row of packed indices: ``K/d`` indices of ``bits·d`` bits, LSB first, rounded up to a byte."""
    return -(-(in_features // shape.dim) * shape.index_bits // 8)


def pack_indices(indices: torch.Tensor, index_bits: int) -> torch.Tensor:
    """``[N, J]`` indices → ``[N, ceil(J·b/8)]`` uint8: index j of a row occupies bits ``j·b … j·b+b−1`` of the
    row's little-endian bit stream."""
    n, j = indices.shape
    bits = (indices.long().unsqueeze(-1) >> torch.arange(index_bits)) & 1  # [N, J, b], LSB first
    stream = bits.reshape(n, j * index_bits)
    pad = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(n, -1, 8)
    return (stream << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, count: int, index_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``[N, count]`` int64."""
    n = packed.shape[0]
    bits = (packed.long().unsqueeze(-1) >> torch.arange(8)) & 1
    stream = bits.reshape(n, -1)[:, : count * index_bits].reshape(n, count, index_bits)
    return (stream << torch.arange(index_bits)).sum(-1)
