"""Text first: every prompt is encoded once, before the transformer is touched, and replayed after.

The pipeline's own ``encode_prompt`` is recorded from a real call of the pipeline — the same arguments a
generation passes, whatever the family — and the call is cut short right there, before any latent or
transformer work. A generation then gets the recorded outputs back instead of running the text encoders,
so they can be freed (T5-XXL is 9.5 GB of FLUX.1-dev's memory) and the results are the same bits.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

Encoding = tuple[torch.Tensor | None, ...]  # what the pipeline's encode_prompt returned for one prompt


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
        raise _Encoded(tuple(o.detach().cpu() if isinstance(o, torch.Tensor) else o for o in outputs))

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
        return tuple(o.to(target) if isinstance(o, torch.Tensor) else o for o in encoding)

    pipeline.encode_prompt = replay
    try:
        yield
    finally:
        del pipeline.encode_prompt


def to_tensors(encoding: Encoding) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A flat safetensors-ready form: the tensors by position, and the positions that were None."""
    return ({str(i): o.contiguous() for i, o in enumerate(encoding) if o is not None},
            [i for i, o in enumerate(encoding) if o is None])


def from_tensors(tensors: dict[str, torch.Tensor], empty: list[int]) -> Encoding:
    size = len(tensors) + len(empty)
    return tuple(None if i in empty else tensors[str(i)] for i in range(size))
