"""Text first: every prompt is encoded once, before the transformer is touched, and replayed after.

The pipeline's own ``encode_prompt`` is recorded from a real call of the pipeline — the same arguments a
generation passes, whatever the family — and the call is cut short right there, before any latent or
transformer work. A generation then gets the recorded outputs back instead of running the text encoders,
so they can be freed (T5-XXL is 9.5 GB of FLUX.1-dev's memory) and the results are the same bits.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch

# What the pipeline's encode_prompt returned for one prompt: tensors, Nones, and lists of per-prompt tensors of
# different lengths (Z-Image).
Encoding = tuple[torch.Tensor | list[torch.Tensor] | None, ...]


class _Encoded(Exception):
    """Raised from inside the pipeline call once the prompt is encoded: nothing after it needs to run."""

    def __init__(self, outputs: Encoding) -> None:
        super().__init__("prompt encoded")
        self.outputs = outputs


def encode(pipeline, call) -> Encoding:
    """The outputs of ``pipeline.encode_prompt`` during ``call(pipeline)`` (a generation call that stops there).

    Raises:
        RuntimeError: the call finished without encoding a prompt (a pipeline without ``encode_prompt``).
    """
    original = pipeline.encode_prompt

    def recording(*args, **kwargs):
        outputs = original(*args, **kwargs)
        raise _Encoded(tuple(_to(o, "cpu", detach=True) for o in outputs))

    pipeline.encode_prompt = recording
    try:
        call(pipeline)
    except _Encoded as encoded:
        return encoded.outputs
    finally:
        del pipeline.encode_prompt  # back to the class's method
    raise RuntimeError(f"{type(pipeline).__name__} generated without calling encode_prompt")


@contextmanager
def replaying(pipeline, encoding: Encoding):
    """Within the block, the pipeline's ``encode_prompt`` returns ``encoding`` (on the device asked for) once;
    a second call is an error rather than a silent reuse."""
    calls = []

    def replay(*_args, device=None, **_kwargs):
        if calls:
            raise RuntimeError(f"{type(pipeline).__name__} encoded a prompt twice in one generation; svdq "
                               "recorded one encoding per prompt")
        calls.append(device)
        target = device or pipeline._execution_device
        return tuple(_to(o, target) for o in encoding)

    pipeline.encode_prompt = replay
    try:
        yield
    finally:
        del pipeline.encode_prompt


def _to(output, device, detach: bool = False):
    if isinstance(output, torch.Tensor):
        return (output.detach() if detach else output).to(device)
    if isinstance(output, list) and all(isinstance(o, torch.Tensor) for o in output):
        return [_to(o, device, detach) for o in output]
    return output


def to_tensors(encoding: Encoding) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A flat safetensors-ready form: the tensors by position (a list's items as ``position.index``), and
    metadata naming the positions that were None and the lengths of the lists."""
    tensors, empty, lists = {}, [], {}
    for i, output in enumerate(encoding):
        if output is None:
            empty.append(i)
        elif isinstance(output, list):
            lists[str(i)] = len(output)
            tensors.update({f"{i}.{j}": item.contiguous() for j, item in enumerate(output)})
        else:
            tensors[str(i)] = output.contiguous()
    return tensors, {"empty": json.dumps(empty), "lists": json.dumps(lists)}


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Encoding:
    empty, lists = json.loads(metadata["empty"]), json.loads(metadata.get("lists", "{}"))  # older caches: no lists

    def output(i: int):
        if i in empty:
            return None
        if str(i) in lists:
            return [tensors[f"{i}.{j}"] for j in range(lists[str(i)])]
        return tensors[str(i)]

    size = len(empty) + len(lists) + sum(1 for key in tensors if "." not in key)
    return tuple(output(i) for i in range(size))
