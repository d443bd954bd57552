"""What a quantization method is: a name, the engine that runs it and the traits the rest of svdq reads."""

from __future__ import annotations

from dataclasses import dataclass

ENGINES = ("uniform", "vector")
# a uniform run's: naive W4A4, W4A16 (INT4, the run's group), SmoothQuant, and NF4 W4A16 (bitsandbytes' format)
UNIFORM_BASELINES = ("rtn", "w4a16", "smoothquant", "nf4")
VECTOR_BASELINES = ("rtn", "kmeans")  # a VQ run's: RTN weight-only at its bits, codebook-only k-means VQ


@dataclass(frozen=True)
class Method:
    """One quantization method, as data. Its module (``methods/<name>.py``) defines it; ``registry.py`` lists it.

    Attributes:
        name: the ``QuantConfig.method`` value and the recipe's ``quant.method``.
        title: how a model card and ``--help`` name it.
        engine: ``uniform`` (group-wise INT/NVFP4 scales per layer: ``engines/uniform.py``) or ``vector``
            (codebook and indices, calibrated block by block: ``engines/vector.py``).
        smooths: searches smoothing factors λ on calibration activations.
        low_rank: keeps a 16-bit low-rank branch (the ``rank`` field).
        calibrates_assignments: (vector) tunes which codeword each sub-vector takes, not only the codebook.
        file_tag: (vector) the export name's tag: ``svdq-<tag><bits>_d<dim>-MODEL``.
        baselines: what ``validate`` may score a run of this method against (``methods/baselines.py``).
    """

    name: str
    title: str
    engine: str
    smooths: bool = False
    low_rank: bool = False
    calibrates_assignments: bool = False
    file_tag: str = ""
    baselines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"method {self.name}: engine {self.engine!r} is not one of {', '.join(ENGINES)}")

    @property
    def vector(self) -> bool:
        """Vector quantization (codebook and indices) rather than SVDQuant's group-wise formats."""
        return self.engine == "vector"
