"""Block streaming: a denoiser whose repeated blocks stay on disk until they run (DESIGN.md §4).

The model is built with empty (meta) parameters; the small parts outside the block lists (embedders, final
layer) are read from the checkpoint and kept; each block's tensors are read from the checkpoint's
safetensors shards when the block is about to run, and dropped when it has run, so host memory holds one
block and the prefetched next one, whatever the number of blocks. The same materialization serves the
weight-side stages (:meth:`BlockStreamer.resident`) and, with an overlay, puts quantized layers in place of
a block's linears for as long as that block runs.

Why not the ecosystem's offloading: diffusers' group offloading takes a model that is already in memory
(24 GB for FLUX.1-dev) and writes its own copy to disk; accelerate's disk-offload hooks look up every tensor
of a module by name at each call, so a block whose linears were replaced by quantized ones no longer fits
them, and neither reads ahead on a CPU. Both build on the pieces used here: safetensors' lazy ``safe_open``
and accelerate's empty-weight construction and tensor placement.
"""

from __future__ import annotations

import ctypes
import functools
import json
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError
from ..runtime.layers import replace_module

Overlay = Callable[[int], dict[str, nn.Module]]  # block index → modules to put at these paths while it runs


class Checkpoint:
    """The safetensors shards of one diffusers component, indexed by tensor name (headers only)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise BadInputError(f"{self.directory} holds no .safetensors weights (streaming reads safetensors only)")
        self.files: dict[str, Path] = {}
        self.nbytes = 0
        for file in files:
            try:
                with safe_open(str(file), "pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
            except Exception as error:  # safetensors raises its own types for malformed headers
                raise BadInputError(f"{file} is not a readable safetensors file ({type(error).__name__})") from None
            self.nbytes += file.stat().st_size

    def keys(self) -> set[str]:
        return set(self.files)

    def read(self, names: Iterable[str], dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (copied into CPU memory), floating ones cast to ``dtypes[name]``; each shard is
        opened once and closed after, so no mapping of it outlives the call."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, members in by_file.items():
            with safe_open(str(file), "pt") as handle:
                for name in members:
                    tensor = handle.get_tensor(name)
                    dtype = (dtypes or {}).get(name) if tensor.is_floating_point() else None
                    # Always a copy: a tensor left on the file's mapping is only 8-byte aligned, and the CPU
                    # kernels' results would then depend on where it lies in the file.
                    tensors[name] = tensor.to(dtype or tensor.dtype, copy=True)
        return tensors


def check_weights_match(checkpoint: Checkpoint, expected: Iterable[str]) -> None:
    """The checkpoint holds exactly the tensors the model's config describes (``expected``): diffusers only
    warns about missing ones and initializes them randomly, so a directory whose config.json disagrees with
    its weights would be quantized as a random model.

    Raises:
        BadInputError: missing or unused tensors, naming one of each.
    """
    expected = set(expected)
    missing, unused = sorted(expected - checkpoint.keys()), sorted(checkpoint.keys() - expected)
    if missing or unused:
        raise BadInputError(f"{checkpoint.directory}: its config and weights disagree ({len(missing)} tensors the "
                            f"config expects are missing{', e.g. ' + missing[0] if missing else ''}; "
                            f"{len(unused)} in the files are unused{', e.g. ' + unused[0] if unused else ''})")


def empty_model(model_class, config: dict, dtype: torch.dtype) -> nn.Module:
    """``model_class`` with meta parameters in the dtypes ``from_pretrained(torch_dtype=dtype)`` gives (modules
    the class keeps in float32 stay so); buffers are real, as some are computed at construction."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained builds it: buffers made at construction in dtype too
    try:
        with init_empty_weights(include_buffers=False):
            model = model_class.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(model_class, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(part in name.split(".") for part in keep):
            module.float()
    return model.eval()


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc's ``malloc_trim``).

    A block's tensors are tens of MB each; once freed, glibc keeps much of that memory for reuse (its
    threshold for giving large allocations their own mapping grows as they are freed), so without this a
    streamed run's resident memory creeps up towards the size of the model it was meant to avoid holding.
    """
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def _set(model: nn.Module, name: str, tensor: torch.Tensor, device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=tensor, clear_cache=False)


class BlockStreamer:
    """Materializes the blocks of an empty model from its checkpoint one at a time.

    Hooks on every block load its tensors before it runs and drop them after; while a block runs, the one
    that ran after it last time (at first: the next in module order) is read on a background thread — a UNet
    calls its resnets and attention transformers alternately, not list by list. :meth:`resident` does the
    same around arbitrary code (without reading ahead: what runs there takes far longer than the reading), and
    the two nest (a reference count per block).
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, block_paths: list[str], device="cpu") -> None:
        self.model, self.checkpoint, self.device = model, checkpoint, torch.device(device)
        self.blocks = block_paths
        state = model.state_dict(keep_vars=True)
        check_weights_match(checkpoint, state)
        self.dtypes = {name: tensor.dtype for name, tensor in state.items()}
        self.names = {path: [n for n in state if n.startswith(f"{path}.")] for path in block_paths}
        in_blocks = {n for names in self.names.values() for n in names}
        for name, tensor in self.checkpoint.read([n for n in state if n not in in_blocks], self.dtypes).items():
            _set(model, name, tensor, self.device)
        self._count = [0] * len(block_paths)
        self._overlaid: dict[int, dict[str, nn.Module]] = {}
        self._overlay: Overlay | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="svdq-prefetch")
        self._ahead: tuple[int, Future] | None = None
        self._successor: dict[int, int | None] = {}  # block → the block entered after it (None: the last)
        self._last: int | None = None
        modules = dict(model.named_modules())
        # Successors are learnt within one call of the model: none across calls, nor after one that failed midway.
        model.register_forward_pre_hook(lambda _m, _a: setattr(self, "_last", None))
        model.register_forward_hook(lambda _m, _a, _o: self._end_pass())
        for index, path in enumerate(block_paths):
            modules[path].register_forward_pre_hook(lambda _m, _a, i=index: self._enter(i))
            modules[path].register_forward_hook(lambda _m, _a, _o, i=index: self._leave(i))

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s 16-bit tensors read from the checkpoint (in the model's dtypes), not installed."""
        return self.checkpoint.read(self.names[self.blocks[index]], self.dtypes)

    @contextmanager
    def resident(self, index: int):
        """Block ``index``'s own 16-bit tensors materialized for the duration (no overlay)."""
        self._enter(index, overlay=False, prefetch=False)  # the weight side: compute outweighs reading
        try:
            yield
        finally:
            self._leave(index)

    @contextmanager
    def overlaid(self, overlay: Overlay):
        """While this lasts, every block runs with ``overlay(index)``'s modules in place of its own at those
        paths (their 16-bit tensors are then never read)."""
        self._overlay, self._ahead = overlay, None
        try:
            yield
        finally:
            self._overlay = None

    def _enter(self, index: int, overlay: bool = True, prefetch: bool = True) -> None:
        if self._count[index]:
            self._count[index] += 1
            return
        # The overlay is built before the block counts as entered: it may read the block through resident().
        replaced = self._overlay(index) if overlay and self._overlay is not None else {}
        self._count[index] = 1

        originals = {name: self.model.get_submodule(name) for name in replaced}
        for name, module in replaced.items():
            replace_module(self.model, name, module.to(self.device))
        self._overlaid[index] = originals
        needed = [n for n in self.names[self.blocks[index]] if not any(n.startswith(f"{r}.") for r in replaced)]
        for name, tensor in self._read(index, needed).items():
            _set(self.model, name, tensor, self.device)
        if not prefetch:
            return
        if self._last is not None:
            self._successor[self._last] = index
        self._last = index
        following = self._successor.get(index, index + 1)
        if self._overlay is None and following is not None and following < len(self.blocks):
            names = self.names[self.blocks[following]]
            self._ahead = (following, self._reader.submit(self.checkpoint.read, names, self.dtypes))

    def _end_pass(self) -> None:
        """The model's call is over: the last block entered has no successor in it."""
        if self._last is not None:
            self._successor[self._last] = None
        self._last = None

    def _read(self, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index and not self._overlay:
            return ahead[1].result()
        return self.checkpoint.read(names, self.dtypes)

    def _leave(self, index: int) -> None:
        self._count[index] -= 1
        if self._count[index]:
            return

        overlaid = self._overlaid.pop(index)
        for name in self.names[self.blocks[index]]:
            if not any(name.startswith(f"{r}.") for r in overlaid):
                self._drop(name)
        for name, module in overlaid.items():
            replace_module(self.model, name, module)
        release_free_memory()

    def _drop(self, name: str) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(owner) if owner else self.model
        tensor = getattr(module, leaf)
        if tensor is None or tensor.device.type == "meta":
            return
        empty = torch.empty_like(tensor, device="meta")
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
        else:
            module._buffers[leaf] = empty


def component_checkpoint(model_dir: Path, component: str) -> Checkpoint:
    """The checkpoint of one component (``transformer``, ``unet``) of a diffusers pipeline directory."""
    return Checkpoint(Path(model_dir) / component)


def pipeline_index(model_dir: Path) -> dict:
    """A diffusers pipeline directory's ``model_index.json``: its class and components.

    Raises:
        BadInputError: missing, not JSON, or not a mapping with a ``_class_name``.
    """
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise BadInputError(f"{model_dir} is not a diffusers pipeline directory (no readable model_index.json)")
    return index


DENOISERS = ("transformer", "unet")  # the component names diffusers gives a pipeline's denoiser


def denoiser_component(index: dict) -> str | None:
    """The name of the pipeline's denoiser component in its ``model_index.json``, or None (no denoiser)."""
    return next((name for name in DENOISERS if isinstance(index.get(name), list) and len(index[name]) == 2
                 and index[name][1]), None)


def component_config(model_dir: Path, component: str) -> dict:
    path = Path(model_dir) / component / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise BadInputError(f"{path} is missing or not JSON") from None
