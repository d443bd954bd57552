"""A bounded, seeded sample of each transformer block's inputs, for block-wise calibration (VQ4DiT).

A block's forward call (positional and keyword arguments: hidden states, conditioning, rotary embeddings…)
is flattened into named tensors and a JSON spec of the rest, whatever the family. Every call over every
prompt and denoising step gets a key from a hash of (seed, block, prompt, call number); each block keeps
the ``keep`` calls with the smallest keys, so the sample is fixed by the seed and the prompts, not by the
order of the calls. A kept call is written to a spill file at once and dropped from memory, so memory holds
one call, whatever the prompts × steps; the block's artifact is assembled from its spill files at the end.
Under torchrun each rank samples the calls of its own prompts; since keys do not depend on which rank ran a
prompt, the smallest keys over every rank's kept calls are the one-process sample, exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BadInputError


def flatten(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """A JSON spec of ``value`` whose tensors go into ``tensors`` under names starting with ``prefix``."""
    if isinstance(value, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [flatten(v, prefix, tensors) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: flatten(v, prefix, tensors) for k, v in value.items()}}
    raise BadInputError(f"a block input of type {type(value).__name__} cannot be recorded for calibration")


def unflatten(spec, tensors: dict[str, torch.Tensor]):
    (kind, body), = spec.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "value":
        return body
    if kind in ("tuple", "list"):
        items = [unflatten(item, tensors) for item in body]
        return tuple(items) if kind == "tuple" else items
    return {k: unflatten(v, tensors) for k, v in body.items()}


def call_key(seed: int, block: int, unit: int, call: int) -> int:
    """The sampling key of a block's ``call``-th call during calibration unit (prompt) ``unit``."""
    digest = hashlib.blake2b(f"{seed}:{block}:{unit}:{call}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BlockInputSampler:
    """Forward pre-hooks on the blocks that keep each block's ``keep`` smallest-key calls in spill files."""

    def __init__(self, blocks: list[torch.nn.Module], keep: int, seed: int, spill: Path) -> None:
        self.blocks, self.keep, self.seed, self.spill = blocks, keep, seed, spill
        self.kept: list[list[tuple[int, Path]]] = [[] for _ in blocks]  # max-heaps by key (negated)
        self.unit, self.calls = 0, [0] * len(blocks)
        shutil.rmtree(spill, ignore_errors=True)  # an interrupted collect's files: none is referenced any more
        spill.mkdir(parents=True)

    def start_unit(self, unit: int) -> None:
        self.unit, self.calls = unit, [0] * len(self.blocks)

    def observe(self, index: int, args: tuple, kwargs: dict) -> None:
        key = call_key(self.seed, index, self.unit, self.calls[index])
        self.calls[index] += 1
        heap = self.kept[index]
        if len(heap) >= self.keep and key >= -heap[0][0]:
            return
        tensors: dict[str, torch.Tensor] = {}
        spec = flatten((tuple(args), dict(kwargs)), "t", tensors)
        path = self.spill / f"block-{index:03d}-{key:016x}.safetensors"
        save_file(tensors, str(path), metadata={"spec": json.dumps(spec)})
        heapq.heappush(heap, (-key, path))
        if len(heap) > self.keep:
            _, evicted = heapq.heappop(heap)
            evicted.unlink()

    @contextmanager
    def recording(self):
        handles = [block.register_forward_pre_hook(
            lambda _m, args, kwargs, index=index: self.observe(index, args, kwargs), with_kwargs=True)
            for index, block in enumerate(self.blocks)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def kept_calls(self) -> list[list[tuple[int, str]]]:
        """Per block, the kept calls as ``(key, spill file)``, in key order."""
        return [sorted((-negated, str(path)) for negated, path in heap) for heap in self.kept]

    def discard(self) -> None:
        shutil.rmtree(self.spill, ignore_errors=True)


def smallest_calls(shares: list[list[tuple[int, str]]], keep: int) -> list[tuple[int, str]]:
    """The ``keep`` smallest-key calls of one block over every rank's kept calls (keys are unique: they hash
    the prompt and the call number)."""
    return sorted(call for share in shares for call in share)[:keep]


def block_artifact(calls: list[tuple[int, str]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One block's calls, in key order, as one artifact: call j's tensors under ``c{j}.``, and a ``calls``
    metadata list of their specs (names without the prefix)."""
    tensors, specs = {}, []
    for number, (_, path) in enumerate(calls):
        with safe_open(path, "pt") as opened:
            specs.append(json.loads(opened.metadata()["spec"]))
            tensors.update({f"c{number}.{name}": opened.get_tensor(name) for name in opened.keys()})
    return tensors, {"calls": json.dumps(specs)}


def calls_from_artifact(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` calls of a block artifact written by :func:`block_artifact`."""
    calls = []
    for number, spec in enumerate(json.loads(metadata["calls"])):
        prefix = f"c{number}."
        own = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
        calls.append(unflatten(spec, own))
    return calls
