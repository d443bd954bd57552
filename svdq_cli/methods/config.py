"""QuantConfig: what to quantize to and how, checked when it is built.

Recipe snippet (the recipe's ``quant:`` section maps onto these fields one to one)::

    quant:
      method: svdquant      # svdquant | smoothquant | rtn | vq4dit | kmeans
      precision: int4       # int4 | nvfp4 | int8 (int2 | int3: weight-only rtn baselines)
      rank: 32
      gptq: false

    quant: {method: vq4dit, bits: 2}   # 2-bit vector quantization, 4-wide sub-vectors, 256 codewords
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..quant.formats import FORMATS, Format, get_format
from . import registry
from .base import Method

VQ_BITS = (2, 3)
LOW_BIT_PRECISIONS = ("int2", "int3")  # uniform baselines of the VQ methods: weight-only RTN
SCALE_DTYPES = ("model", "float32")
SEARCHES = ("local", "exhaustive")
ACT_RANGES = ("svdq", "nunchaku")
CONFIG_VERSION = 2


def alpha_grid(points: int) -> tuple[float, ...]:
    """Migration strengths α = 1/points, …, (points−1)/points (DESIGN.md §1: 20 points → 0.05 … 0.95)."""
    return tuple(round(i / points, 6) for i in range(1, points))


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize every target linear layer.

    Attributes:
        method: ``svdquant`` (smoothing + low-rank branch + 4-bit residual), ``smoothquant`` (smoothing
            only), ``rtn`` (plain round-to-nearest, no smoothing, no branch), ``vq4dit`` (vector quantization
            with calibrated codebook *and* assignments, ``quant/vq.py``) or ``kmeans`` (the same vectors with
            k-means assignments kept and the codebook alone calibrated: VQ4DiT's baseline).
        precision: ``int4`` (group 64), ``nvfp4`` (group 16, fp8 scales) or ``int8`` (group 64); ``int2`` /
            ``int3`` (group 64) only for weight-only ``rtn``, the uniform baseline of the VQ methods. The VQ
            methods ignore it.
        weight_only: keep activations in 16 bits (W4A16) instead of quantizing them per token.
        rank: low-rank branch rank, a multiple of 16; 0 disables it. Only ``svdquant`` uses it. Unset: 32,
            and 0 for the VQ methods, which refuse any other.
        bits: bits per weight of the VQ methods, 2 or 3 (default 2); unset for the others.
        vq_dim: sub-vector dimension d of the VQ methods (along K); ``2^(bits·d)`` codewords, at most 2^16.
        vq_candidates: candidate codewords per sub-vector whose ratios vq4dit calibrates.
        vq_steps: Adam steps of the calibration per block (or per layer through the API without blocks).
        vq_lr: Adam learning rate of the codebooks, relative to their RMS (the ratio logits take 10×).
        vq_ratio_weight: final weight λ_r of the one-hot term; it rises linearly from 0 over the soft phase.
        vq_calls: block inputs sampled (seeded, over every prompt and step) per block for its calibration.
        kmeans_iters: Lloyd iterations of the codebook initialisation.
        group_size: elements per scale along K; None takes the precision's (64, or 16 for nvfp4).
        alphas: smoothing migration strengths searched, each with β = 0 and β = 1−α, plus "no smoothing"
            (α = β = 0). Default 0.05 … 0.95 (39 candidates); :meth:`fast` uses 0.25, 0.5, 0.75 (7).
        search: how the α/β candidates are visited: ``local`` (coarse to fine along α, about a third of
            them; default from config version 2) or ``exhaustive`` (every one).
        gptq: quantize the residual with GPTQ instead of round-to-nearest.
        gptq_damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        gptq_block: GPTQ lazy-update block width (a multiple of the group size).
        lowrank_iters: 1 = one SVD; more alternates ``L ← SVD_r(Ŵ − Q(Ŵ − L))``, stopping early.
        exact_svd_max_elements: layers up to this many weights get an exact float64 SVD, larger ones a
            seeded randomized SVD.
        calib_rows: bound on the input rows sampled per input group during calibration (the search and the
            per-layer report use them; statistics that cover every token are kept besides). Collect holds
            ``calib_rows · K`` values per input group for the whole model: 0.2 GB at FLUX.1 size in bf16.
        search_rows: calibration rows the α/β search evaluates each candidate on.
        search_channels: output channels sampled per layer for the search (0 = all); the chosen candidate is
            then decomposed on the full weight.
        scale_dtype: ``model`` stores INT scales in the layer's dtype, ``float32`` in float32.
        full_range: signed INT scales of weights and activations use the whole code range (−8…7): a group
            whose extreme is negative reaches −8 and gets a finer step. Default: on from config version 2.
        scale_search: each weight group's scale is chosen among the symmetric, the full-range and shrunk
            (clipping) scales by the calibration-weighted output error (weight error without calibration
            rows). Default: on from config version 2.
        act_range: how activations are quantized at run time: ``svdq`` (signed groups over the full range, or
            the symmetric ``max|x|/7`` of config version 1; unsigned codes for non-negative inputs) or
            ``nunchaku``, the rule of Nunchaku's kernels (signed everywhere, ``max|x|/7`` with the scale stored
            in the model dtype; NVFP4 without a per-token scale), so that what is validated is what a
            Nunchaku Lite export runs.
        seed: seeds every random choice (row sampling, randomized SVD), so runs are reproducible.
        version: config schema version, so old serialized configs still load and mean what they meant: a
            version-1 config quantizes as svdq did then (symmetric scales, no search).
    """

    method: str = "svdquant"
    precision: str = "int4"
    weight_only: bool = False
    rank: int | None = None
    group_size: int | None = None
    alphas: tuple[float, ...] = field(default_factory=lambda: alpha_grid(20))
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block: int = 128
    lowrank_iters: int = 1
    exact_svd_max_elements: int = 1 << 18
    calib_rows: int = 256
    search_rows: int = 256
    search_channels: int = 256
    scale_dtype: str = "model"
    full_range: bool | None = None
    scale_search: bool | None = None
    search: str | None = None
    act_range: str = "svdq"
    seed: int = 0
    bits: int | None = None
    vq_dim: int = 4
    vq_candidates: int = 2
    vq_steps: int = 200
    vq_lr: float = 0.01
    vq_ratio_weight: float = 1.0
    vq_calls: int = 32
    kmeans_iters: int = 25
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"QuantConfig.{name}={value!r} is invalid (allowed: {allowed})")

        if self.version > CONFIG_VERSION:
            raise bad("version", self.version, f"{CONFIG_VERSION} or older: upgrade svdq to read newer configs")
        if self.version < 1:
            raise bad("version", self.version, f"1 to {CONFIG_VERSION}")
        for name in ("full_range", "scale_search"):  # unset: what this config's version meant
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.version >= 2)
        if self.search is None:
            object.__setattr__(self, "search", "local" if self.version >= 2 else "exhaustive")
        if self.search not in SEARCHES:
            raise bad("search", self.search, ", ".join(SEARCHES))
        if self.act_range not in ACT_RANGES:
            raise bad("act_range", self.act_range, ", ".join(ACT_RANGES))
        if self.method not in registry.METHODS:
            raise bad("method", self.method, ", ".join(registry.METHODS))
        if self.precision not in FORMATS:
            raise bad("precision", self.precision, ", ".join(FORMATS))
        if self.scale_dtype not in SCALE_DTYPES:
            raise bad("scale_dtype", self.scale_dtype, ", ".join(SCALE_DTYPES))
        self._check_vq(bad)
        if self.rank < 0 or self.rank % 16:
            raise bad("rank", self.rank, "0 or a positive multiple of 16")
        natural = FORMATS[self.precision].group_size
        if self.group_size is None:
            object.__setattr__(self, "group_size", natural)
        elif self.group_size != natural:
            raise bad("group_size", self.group_size, f"{natural} for {self.precision}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if not self.alphas or any(not 0.0 < a < 1.0 for a in self.alphas):
            raise bad("alphas", self.alphas, "a non-empty list of values in (0, 1)")
        if not 0.0 < self.gptq_damp < 1.0:
            raise bad("gptq_damp", self.gptq_damp, "a value in (0, 1)")
        if self.gptq_block <= 0 or self.gptq_block % self.group_size:
            raise bad("gptq_block", self.gptq_block, f"a positive multiple of {self.group_size}")
        for name in ("lowrank_iters", "calib_rows", "search_rows"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "an integer >= 1")
        if self.search_channels < 0:
            raise bad("search_channels", self.search_channels, "0 (all) or a positive integer")

    def _check_vq(self, bad) -> None:
        """Resolve and check what differs between the VQ methods and the others: rank, bits, precision."""
        if self.is_vector:
            if self.rank not in (None, 0):
                raise bad("rank", self.rank, f"unset or 0 for {self.method}: it has no low-rank branch")
            object.__setattr__(self, "rank", 0)
            if self.bits is None:
                object.__setattr__(self, "bits", 2)
            if self.bits not in VQ_BITS:
                raise bad("bits", self.bits, f"{' or '.join(map(str, VQ_BITS))} for {self.method}")
            if not 1 <= self.vq_dim <= 8 or self.bits * self.vq_dim > 16:
                raise bad("vq_dim", self.vq_dim, f"1 to {16 // self.bits} at {self.bits} bits (2^16 codewords at most)")
            for name in ("vq_candidates", "vq_calls", "kmeans_iters"):
                if getattr(self, name) < 1:
                    raise bad(name, getattr(self, name), "an integer >= 1")
            if self.vq_steps < 0:
                raise bad("vq_steps", self.vq_steps, "an integer >= 0")
            if not self.vq_lr > 0:
                raise bad("vq_lr", self.vq_lr, "a positive number")
            if self.vq_ratio_weight < 0:
                raise bad("vq_ratio_weight", self.vq_ratio_weight, "a number >= 0")
            return
        if self.rank is None:
            object.__setattr__(self, "rank", 32)
        if self.bits is not None:
            vector = ", ".join(registry.names("vector"))
            raise bad("bits", self.bits, f"unset for {self.method} (bits belong to {vector}; precision sets the "
                                         "others' format)")
        if self.precision in LOW_BIT_PRECISIONS and not (self.method == "rtn" and self.weight_only):
            raise bad("precision", self.precision, "int2/int3 only with method rtn and weight_only (a baseline)")

    @property
    def spec(self) -> Method:
        """The method this config runs (``methods/<name>.py``)."""
        return registry.METHODS[self.method]

    @property
    def is_vector(self) -> bool:
        """Whether the method is vector quantization (codebook and indices) rather than SVDQuant's formats."""
        return self.spec.vector

    @classmethod
    def fast(cls, **overrides: object) -> QuantConfig:
        """The fast preset: a 4-point α grid (7 candidates) and a smaller search sample."""
        values: dict[str, object] = {"alphas": alpha_grid(4), "search_rows": 128, "search_channels": 128}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> QuantConfig:
        """Build from plain data (a recipe section, serialized metadata); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, object]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @property
    def format(self) -> Format:
        return get_format(self.precision)

    @property
    def activation_rule(self) -> str:
        """Each W4A4 layer's activation quantization (its ``act_range``): ``full``, ``symmetric`` or ``nunchaku``."""
        if self.act_range == "nunchaku":
            return "nunchaku"
        return "full" if self.full_range else "symmetric"

    def plain_weight_only(self, act: str) -> bool:
        """Whether a layer of activation mode ``act`` is quantized without smoothing or branch: weight-only
        layers under Nunchaku's rule, which its W4A16 kernel (no λ, no branch) then runs exactly as validated."""
        return act == "none" and self.act_range == "nunchaku"

    def rank_for(self, act: str) -> int:
        """The low-rank branch's rank of a layer of activation mode ``act``."""
        return 0 if self.plain_weight_only(act) else self.effective_rank

    @property
    def effective_rank(self) -> int:
        """Rank actually used: only a method with a low-rank branch (SVDQuant) has one."""
        return self.rank if self.spec.low_rank else 0

    @property
    def smooths(self) -> bool:
        return self.spec.smooths

    @property
    def smoothing_candidates(self) -> tuple[tuple[float, float], ...]:
        """(α, β) pairs searched; (0, 0) is no smoothing and is always included."""
        if not self.smooths:
            return ((0.0, 0.0),)
        pairs = {(0.0, 0.0)}
        for a in self.alphas:
            pairs.add((a, 0.0))
            pairs.add((a, round(1.0 - a, 6)))
        return tuple(sorted(pairs))
