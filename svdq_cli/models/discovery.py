"""What to quantize in any diffusers denoiser, found from the model itself (DESIGN.md §6).

Two sources, never class or attribute names (diffusers renames them between releases):

- **structure**: the denoiser's repeated blocks are its top-level ``nn.ModuleList``s of modules that hold
  linears (``transformer_blocks``, ``single_transformer_blocks``, Wan's ``blocks``, Lumina's ``layers``…);
  they are the unit of streaming and distribution. A UNet's levels are such a list too, but each level is
  itself lists of resnets and attention transformers: its blocks are their items, and so are those of a
  module made of such lists outside a list (the UNet's mid block). Linears outside the blocks (embedders,
  the final projection) stay 16-bit.
- **one traced call**: the denoiser's first call of a real generation is captured and replayed on a meta
  copy (no weights, no arithmetic), with hooks that see which tensor each linear reads. Linears that read
  the same tensor (q, k and v; or two AdaLN linears that each take ``silu(temb)``) form a group that shares
  the smoothing factor λ; a linear that reads one vector per sample instead of one per token (AdaLN
  modulation, timestep embedders) is weight-only; one that reads a GELU's output has non-negative inputs
  up to a small shift; a linear the call never reaches stays 16-bit. Blocks of a module outside the lists
  that run before every listed block condition them (Chroma's guidance approximator computes every
  block's modulation) and stay 16-bit; the UNet's mid block runs between its levels and is quantized.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BadInputError, gist
from .streaming import empty_model

PARAMETER_FREE = (nn.SiLU, nn.GELU, nn.Dropout, nn.Identity, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish)


class DiscoveryError(BadInputError):
    """The model's structure or its traced call did not show what to quantize (exit 2: not this model)."""


@dataclass(frozen=True)
class Layout:
    """The quantization targets of one denoiser.

    Attributes:
        blocks: ``[(block path, [[linear path, …] per group])]`` for every repeated block in module order,
            groups in call order; a group's linears read the same input.
        weight_only: linears whose input is one vector per sample (4-bit weights, 16-bit activations).
        nonnegative: linears whose input is a GELU's output.
        kept: linears that stay 16-bit, with the reason.
    """

    blocks: list[tuple[str, list[list[str]]]]
    weight_only: frozenset[str] = frozenset()
    nonnegative: frozenset[str] = frozenset()
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return [name for _, groups in self.blocks for group in groups for name in group]

    def to_json(self) -> str:
        return json.dumps({"blocks": self.blocks, "weight_only": sorted(self.weight_only),
                           "nonnegative": sorted(self.nonnegative), "kept": self.kept})

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        return cls([(block, groups) for block, groups in data["blocks"]], frozenset(data["weight_only"]),
                   frozenset(data["nonnegative"]), data["kept"])


def discover(denoiser: nn.Module, generate: Callable[[], object], dtype: torch.dtype) -> Layout:
    """The layout of ``denoiser`` (whole, or a streamed skeleton) from its first call within ``generate()``."""
    args, kwargs = capture_call(denoiser, generate)
    skeleton = empty_model(type(denoiser), dict(denoiser.config), dtype).to("meta")
    return trace_layout(skeleton, args, kwargs)


def block_paths(model: nn.Module) -> list[str]:
    """Every block of ``model`` (``transformer_blocks.0``, …; a UNet's ``down_blocks.1.attentions.0``), list by
    list in module order: the items of its own lists of linear-holding modules, and the list items of a module
    made of such lists (see the module docstring; the trace decides whether those are quantized)."""
    paths = []
    for name, module in model.named_children():
        if _is_block_list(module):
            for index, item in enumerate(module):
                paths += _units(f"{name}.{index}", item)
        elif _block_lists(module):
            paths += _units(name, module)
    return paths


def _units(path: str, module: nn.Module) -> list[str]:
    """``module`` itself, or, when it is made of block lists (a UNet level), their items."""
    lists = _block_lists(module)
    return [f"{path}.{name}.{index}" for name, items in lists for index in range(len(items))] if lists else [path]


def _block_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, child) for name, child in module.named_children() if _is_block_list(child)]


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, nn.ModuleList) and len(module) > 0 and all(_holds_linears(item) for item in module)


def _holds_linears(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and any(isinstance(m, nn.Linear) for m in module.modules())


class _Captured(Exception):
    """Raised from the denoiser's forward pre-hook: the call's arguments are all the trace needs."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("denoiser call captured")
        self.args, self.kwargs = args, kwargs


def capture_call(denoiser: nn.Module, generate: Callable[[], object]) -> tuple[tuple, dict]:
    """The positional and keyword arguments of ``denoiser``'s first call within ``generate()``, which is cut
    short right there (no denoising step runs).

    Raises:
        DiscoveryError: ``generate`` finished without calling the denoiser.
    """
    def stop(_module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        generate()
    except _Captured as captured:
        return captured.args, captured.kwargs
    finally:
        handle.remove()
    raise DiscoveryError(f"a generation finished without calling the {type(denoiser).__name__}")


def trace_layout(skeleton: nn.Module, args: tuple, kwargs: dict) -> Layout:
    """The layout of ``skeleton`` (a meta-device copy of the denoiser) from one call with ``args``/``kwargs``
    (moved to the meta device here).

    Raises:
        DiscoveryError: no repeated blocks, or the call does not run on the meta device.
    """
    blocks = block_paths(skeleton)
    if not blocks:
        raise DiscoveryError(f"{type(skeleton).__name__} has no list of repeated blocks holding linears")
    modules = dict(skeleton.named_modules())
    inside = {name: block for block in blocks for name in modules if name.startswith(f"{block}.")}
    observed = _Observer(skeleton, modules, inside)
    meta_args = [_to_meta(value) for value in args]
    meta_kwargs = {key: _to_meta(value) for key, value in kwargs.items()}
    samples = _batch(meta_args, meta_kwargs)
    try:
        with observed, torch.no_grad():
            skeleton(*meta_args, **meta_kwargs)
    except Exception as error:  # any op the meta device lacks, or a data-dependent branch
        raise DiscoveryError(f"tracing {type(skeleton).__name__} on the meta device failed "
                             f"({type(error).__name__}: {gist(error)})") from None
    return observed.layout(blocks, samples)


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _batch(args: list, kwargs: dict) -> int:
    """Samples in the call: the leading size of its first tensor (the latents come first in every
    diffusers denoiser: ``hidden_states`` or ``sample``), or the length of a first list of per-sample tensors
    (Z-Image takes its latents so)."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
        if isinstance(value, list) and value and all(isinstance(item, torch.Tensor) for item in value):
            return len(value)
    raise DiscoveryError("the denoiser was called without a batched tensor")


class _Observer:
    """Forward hooks that record, for one call, what each block linear reads and where that came from."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], inside: dict[str, str]) -> None:
        self.model, self.modules, self.inside = model, modules, inside
        self.reads: dict[str, torch.Tensor] = {}  # linear → its input at its first call, in call order
        self.made_by: dict[int, tuple[type, torch.Tensor]] = {}  # parameter-free output → (module type, input)
        self.gelu_outputs: set[int] = set()
        self.alive: list[torch.Tensor] = []  # keeps every recorded tensor alive, so no id() is reused
        self.entered: dict[str, int] = {}  # block → its rank in the order blocks were first entered
        self.handles = []

    def __enter__(self):
        gelus = _gelu_classes()
        for block in dict.fromkeys(self.inside.values()):
            self.handles.append(self.modules[block].register_forward_pre_hook(self._entering(block)))
        for name, module in self.modules.items():
            if name not in self.inside:
                continue
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_pre_hook(self._linear(name)))
            if isinstance(module, PARAMETER_FREE) or isinstance(module, gelus):
                self.handles.append(module.register_forward_hook(self._passing(isinstance(module, gelus))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _entering(self, block: str):
        def hook(_module, _args):
            self.entered.setdefault(block, len(self.entered))
        return hook

    def _linear(self, name: str):
        def hook(_module, args):
            if name not in self.reads and args and isinstance(args[0], torch.Tensor):
                self.reads[name] = args[0]
                self.alive.append(args[0])
        return hook

    def _passing(self, gelu: bool):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return
            self.alive.append(output)
            if gelu:
                self.gelu_outputs.add(id(output))
            if isinstance(module, PARAMETER_FREE) and args and isinstance(args[0], torch.Tensor):
                self.alive.append(args[0])
                if output is not args[0]:
                    self.made_by[id(output)] = (type(module), args[0])
        return hook

    def _origin(self, tensor: torch.Tensor) -> tuple[tuple, bool]:
        """The tensor a linear's input was computed from through parameter-free modules only (with their
        types: ``silu(temb)`` twice is one input, ``temb`` and ``silu(temb)`` are two), and whether a GELU
        produced it on the way."""
        chain, gelu = [], id(tensor) in self.gelu_outputs
        while id(tensor) in self.made_by:
            kind, tensor = self.made_by[id(tensor)]
            chain.append(kind)
            gelu = gelu or id(tensor) in self.gelu_outputs
        return (id(tensor), tuple(chain)), gelu

    def _conditioning(self, blocks: list[str]) -> set[str]:
        """The blocks outside the model's own lists that ran before every listed block."""
        listed = {block for block in blocks if isinstance(self.modules[block.split(".")[0]], nn.ModuleList)}
        first = min((self.entered[b] for b in listed if b in self.entered), default=len(self.entered))
        return {b for b in blocks if b not in listed and self.entered.get(b, first) < first}

    def layout(self, blocks: list[str], samples: int) -> Layout:
        groups: dict[str, dict[tuple, list[str]]] = {block: {} for block in blocks}
        weight_only, nonnegative, kept = set(), set(), {}
        conditioning = self._conditioning(blocks)
        for name, tensor in self.reads.items():
            if self.inside[name] in conditioning:
                kept[name] = "conditions the repeated blocks (runs before them)"
                continue
            key, gelu = self._origin(tensor)
            groups[self.inside[name]].setdefault(key, []).append(name)
            if tensor.numel() // max(tensor.shape[-1], 1) <= samples:
                weight_only.add(name)
            elif gelu:
                nonnegative.add(name)
        for name, module in self.modules.items():
            if isinstance(module, nn.Linear) and name not in self.reads:
                kept[name] = ("not reached by a generation" if name in self.inside
                              else "outside the repeated blocks (embedding or output)")
        # Module order, every block kept (an uncalled one with no groups): the streamer reads blocks by index.
        return Layout([(block, list(by_input.values())) for block, by_input in groups.items()],
                      frozenset(weight_only), frozenset(nonnegative), kept)


def _gelu_classes() -> tuple[type, ...]:
    """The modules whose output is a GELU's: torch's, and diffusers' projection + GELU activations."""
    from diffusers.models import activations

    return (nn.GELU, *(getattr(activations, name) for name in ("GELU", "ApproximateGELU")
                       if hasattr(activations, name)))
