"""Recipes: YAML files in ``recipes/`` that resolve, with CLI overrides, into a typed, validated RunConfig.

Loading is strict: an unknown or misspelled key is an error naming the key, the allowed ones and the
closest match, and a value of the wrong type is an error naming the field — before any model is touched::

    model: black-forest-labs/FLUX.1-dev
    family: flux-dev
    quant: {method: svdquant, precision: int4, rank: 32}
    calibration: {num_prompts: 128, steps: 50, resolution: 1024}
    validation: {num_prompts: 16, min_psnr: 20.0}
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import BadInputError, gist
from ..methods.config import QuantConfig
from ..methods.registry import METHODS
from ..models import resolution
from ..models.targets import Overrides
from ..system.device import CHOICES as DEVICE_CHOICES
from ..system.device import valid_device
from ..system.resources import data_dir

DTYPES = ("float32", "bfloat16", "float16")
RUNTIMES = ("auto", "emulated")
RECIPE_VERSION = 1
# Beyond what any model generates at (Sana's 4K is 4096 px; schedulers are trained on 1000 timesteps): a typo
# or an attack, refused before a model is loaded. What a given model and this machine's memory can take is
# checked once the model is loaded (Workspace.preflight).
MAX_RESOLUTION = 16384
MAX_STEPS = 10_000
FLAGS = {("calibration", "steps"): "--steps", ("calibration", "resolution"): "--resolution",
         ("validation", "steps"): "--val-steps", ("validation", "resolution"): "--val-resolution"}
SET_BY_SVDQ = {"prompt": "the prompt sets", "num_inference_steps": "steps", "guidance_scale": "guidance",
               "height": "resolution", "width": "resolution", "generator": "seed", "output_type": "svdq's own",
               "class_labels": "the prompt sets"}  # arguments of the pipeline call a recipe's pipeline_args may not set
MAX_RECIPE_BYTES = 1 << 20  # recipes are a screenful of YAML; anything near this is not one
MAX_RECIPE_NODES = 10_000  # values after YAML aliases are expanded: an alias bomb expands to billions


@dataclass(frozen=True)
class CalibrationConfig:
    """What the collect stage runs: prompts, how many, denoising steps, resolution, seed.

    ``guidance`` None takes the family's protocol value; ``steps``/``resolution`` None likewise.
    """

    prompts: str = "builtin:calibration"
    num_prompts: int = 128
    steps: int | None = None
    resolution: int | str | None = None  # pixels (1024) or width x height ("832x480")
    guidance: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class ValidationConfig:
    """What the validate stage runs, and its quality gates (None: no gate).

    ``runtime`` is how the quantized layers execute: ``auto`` (the fused CUDA kernels on a GPU that takes
    them, else the reference path) or ``emulated`` (the same kernels on the CPU emulator, compared with the
    reference path in the report).
    """

    prompts: str = "builtin:validation"
    num_prompts: int = 4
    steps: int | None = None
    resolution: int | str | None = None  # pixels (1024) or width x height ("832x480")
    guidance: float | None = None
    seed: int = 1
    baselines: tuple[str, ...] = ()
    min_psnr: float | None = None
    min_ssim: float | None = None
    max_latent_error: float | None = None
    runtime: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run reads. Device, offload and stream change where and how it runs, not what it computes:
    ``stream`` reads the transformer block by block from its checkpoint (None: when the checkpoint is more
    than half the memory available)."""

    recipe: str
    model: str
    family: str
    dtype: str = "bfloat16"
    device: str = "auto"
    offload: bool = False
    stream: bool | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    targets: Overrides = field(default_factory=Overrides)  # linears to skip or keep weight-only (globs)
    pipeline_args: dict[str, object] = field(default_factory=dict)  # more keyword arguments of every pipeline call
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version > RECIPE_VERSION:
            raise BadInputError(f"recipe version {self.version} is newer than this svdq's ({RECIPE_VERSION}); "
                                "upgrade svdq")
        for name in self.pipeline_args:
            if name in SET_BY_SVDQ:
                raise BadInputError(f"pipeline_args.{name}: svdq sets it from the recipe ({SET_BY_SVDQ[name]})")
        if self.dtype not in DTYPES:
            raise BadInputError(f"dtype={self.dtype!r} is invalid (allowed: {', '.join(DTYPES)})")
        if not valid_device(self.device):
            raise BadInputError(f"device={self.device!r} is invalid (allowed: {DEVICE_CHOICES})")
        for gate in ("min_psnr", "min_ssim", "max_latent_error"):
            value = getattr(self.validation, gate)
            if value is not None and not math.isfinite(value):
                raise BadInputError(f"validation.{gate}={value} must be a finite number")
        if self.offload and self.stream:
            raise BadInputError("--offload and --stream are alternatives: streaming already keeps one block in "
                                "memory (on the GPU too); drop one")
        if self.validation.runtime not in RUNTIMES:
            raise BadInputError(f"validation.runtime={self.validation.runtime!r} is invalid (allowed: "
                                f"{', '.join(RUNTIMES)})")
        allowed = self.quant.spec.baselines
        unknown = [b for b in self.validation.baselines if b not in allowed]
        if unknown:
            raise BadInputError(f"validation.baselines: {', '.join(unknown)} not available for method "
                                f"{self.quant.method} (allowed: {', '.join(allowed)})")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Counts at least 1, steps and sides below what any model takes; each resolution in its kept form
        (``"1024"`` from the command line is 1024, ``"832X480"`` is ``"832x480"``)."""
        limits = {"num_prompts": None, "steps": MAX_STEPS, "resolution": MAX_RESOLUTION}
        for label, section in (("calibration", self.calibration), ("validation", self.validation)):
            if section.resolution is not None:
                kept = resolution.parse(section.resolution, f"{label}.resolution ({FLAGS[label, 'resolution']})")
                section = dataclasses.replace(section, resolution=kept)
                object.__setattr__(self, label, section)
            for name, limit in limits.items():
                value = getattr(section, name)
                values = resolution.dimensions(value) if name == "resolution" and value is not None else (value,)
                if value is not None and min(values) < 1:
                    raise BadInputError(f"{name}={value} must be at least 1")
                if value is not None and limit is not None and max(values) > limit:
                    what = "generates at" if name == "resolution" else "is sampled with"
                    raise BadInputError(f"{label}.{name}={value} ({FLAGS[label, name]}) exceeds {limit:,}, beyond "
                                        f"what any diffusion model {what}")

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        result["quant"] = self.quant.to_dict()
        return _plain(result)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_names() -> list[str]:
    return sorted(path.stem for path in data_dir("recipes").glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path | None:
    """The recipe file for a name (``flux-dev``) or a path to a YAML file; None when neither exists."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = data_dir("recipes") / f"{name_or_path}.yaml"
    return candidate if candidate.is_file() else None


def load_recipe(name_or_path: str, overrides: dict[str, object] | None = None) -> RunConfig:
    """Resolve a recipe and dotted-key overrides (``{"quant.rank": 64}``) into a RunConfig.

    Raises:
        BadInputError: unknown recipe, unreadable YAML, unknown key, wrong type, invalid value.
    """
    path = recipe_path(name_or_path)
    if path is None:
        raise BadInputError(f"unknown recipe {name_or_path!r} (available: {', '.join(recipe_names())})")
    data = read_recipe_file(path)
    if not isinstance(data, dict):
        raise BadInputError(f"recipe {path} must be a mapping of fields")
    data.setdefault("recipe", path.stem)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, leaf = key.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        target[leaf] = value
    _switch_method(data, {key for key, value in (overrides or {}).items() if value is not None})
    return build_config(RunConfig, data, "")


def read_recipe_file(path: Path) -> object:
    """The YAML of a recipe file, bounded before anything is built from it: its size, and what its aliases
    expand to (a few lines of anchors can stand for billions of values).

    Raises:
        BadInputError: unreadable, not YAML, too large, or expanding past MAX_RECIPE_NODES values.
    """
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise BadInputError(f"recipe {path} is {size / 2**20:.1f} MiB; a recipe is a small YAML file "
                                f"(at most {MAX_RECIPE_BYTES >> 20} MiB)")
        loader = yaml.SafeLoader(path.read_text())
        try:
            node = loader.get_single_node()
            if node is None:
                return {}
            _check_expansion(node, path)
            return loader.construct_document(node) or {}
        finally:
            loader.dispose()
    except RecursionError:  # the YAML composer recurses once per level of nesting
        raise BadInputError(f"recipe {path} nests its values thousands of levels deep; a recipe is a few "
                            "levels of fields") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise BadInputError(f"cannot read recipe {path}: {gist(error)}") from None


def _check_expansion(root: yaml.Node, path: Path) -> None:
    """Count the values ``root`` stands for with its aliases expanded (shared nodes counted once per use,
    each node's count computed once), refusing recursive aliases and counts past MAX_RECIPE_NODES."""
    counts: dict[int, int] = {}
    open_nodes: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in counts:
            return counts[key]
        if key in open_nodes:
            raise BadInputError(f"recipe {path}: a YAML alias refers to a value that contains it")
        open_nodes.add(key)
        total = 1
        for child in _children(node):
            total += count(child)
            if total > MAX_RECIPE_NODES:
                raise BadInputError(f"recipe {path}: its YAML aliases expand to more than {MAX_RECIPE_NODES:,} "
                                    "values; write the recipe out without anchors (&) and aliases (*)")
        open_nodes.discard(key)
        counts[key] = total
        return total

    count(root)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]  # keys and values
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _switch_method(data: dict, overridden: set[str]) -> None:
    """``--method`` on a recipe written for another kind of method: a recipe's rank does not carry over to a VQ
    method, nor its bits to the others, nor its baselines of the other kind (an explicit ``--rank``, ``--bits``
    or ``--baselines`` still does, and is checked)."""
    quant = data.get("quant")
    if "quant.method" not in overridden or not isinstance(quant, dict):
        return
    method = METHODS.get(quant.get("method"))
    if method is None:  # an unknown method: QuantConfig names it
        return
    dropped = "quant.rank" if method.vector else "quant.bits"
    if dropped not in overridden:
        quant.pop(dropped.partition(".")[2], None)
    allowed = method.baselines
    validation = data.get("validation")
    if "validation.baselines" not in overridden and isinstance(validation, dict) and validation.get("baselines"):
        validation["baselines"] = [b for b in validation["baselines"] if b in allowed]


def build_config(cls, data: dict, prefix: str):
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise BadInputError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise BadInputError(f"{prefix}{key!r}: a key must be a field name (allowed: {', '.join(known)})")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"allowed: {', '.join(known)}"
            raise BadInputError(f"{prefix}{key}: unknown key ({hint})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            values[key] = build_config(expected, value, f"{prefix}{key}.")
        else:
            values[key] = _check_type(value, expected, f"{prefix}{key}")
    try:
        return cls(**values)
    except BadInputError:
        raise
    except (ValueError, TypeError) as error:
        raise BadInputError(f"{prefix.rstrip('.') or 'recipe'}: {error}") from None


def _check_type(value, expected, name: str):
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, name)
            except BadInputError:
                continue
        raise BadInputError(f"{name}: expected {_type_name(expected)}, got {_brief(value)}")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise BadInputError(f"{name}: expected a mapping of names to values, got {_brief(value)}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BadInputError(f"{name}: expected a list, got {_brief(value)}")
        item = typing.get_args(expected)[0]
        return tuple(_check_type(v, item, name) for v in value)
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise BadInputError(f"{name}: expected an integer, got {value!r}")
    if not isinstance(value, expected):
        raise BadInputError(f"{name}: expected {_type_name(expected)}, got {_brief(value)}")
    return value


def _brief(value) -> str:
    """``repr`` cut to a line: a wrong value may be a long list or a long string."""
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict, brief.maxstring, brief.maxother = 2, 4, 4, 60, 60
    return brief.repr(value)


def _type_name(expected) -> str:
    return str(expected).replace("typing.", "").replace("<class '", "").replace("'>", "")
