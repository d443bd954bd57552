"""Text first: every prompt is encoded once, before the denoiser is touched, and replayed after.

The pipeline's own ``encode_prompt`` is recorded from a real call of the pipeline — the same arguments a
generation passes, whatever the family — and the call is cut short at the denoiser's first call, before any
denoising. Every ``encode_prompt`` call until then is kept, in order: a pipeline with classifier-free
guidance on a negative prompt encodes twice (FLUX.2 klein, Qwen-Image's true CFG, Wan). A generation then
gets the recorded outputs back, call by call, instead of running the text encoders, so they can be freed
(T5-XXL is 9.5 GB of FLUX.1-dev's memory) and the results are the same bits.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch

# What one encode_prompt call returned: tensors, Nones, and lists of per-prompt tensors of different lengths
# (Z-Image); an Encoding holds every call of one generation, in order.
Outputs = tuple[torch.Tensor | list[torch.Tensor] | None, ...]
Encoding = tuple[Outputs, ...]


class _Encoded(Exception):
    """Raised from the denoiser's forward pre-hook: every prompt of the generation is encoded by then."""


def encode(pipeline, denoiser: torch.nn.Module, call) -> Encoding:
    """The outputs of every ``pipeline.encode_prompt`` call during ``call(pipeline)`` (a generation call), which
    stops at ``denoiser``'s first call.

    Raises:
        RuntimeError: the call reached the denoiser without encoding a prompt.
    """
    original, calls = pipeline.encode_prompt, []

    def recording(*args, **kwargs):
        outputs = original(*args, **kwargs)
        calls.append(tuple(_to(o, "cpu", detach=True) for o in outputs))
        return outputs

    def stop(_module, _args):
        raise _Encoded("prompts encoded")

    pipeline.encode_prompt = recording
    handle = denoiser.register_forward_pre_hook(stop)
    try:
        call(pipeline)
    except _Encoded:
        pass
    finally:
        handle.remove()
        del pipeline.encode_prompt  # back to the class's method
    if not calls:
        raise RuntimeError(f"{type(pipeline).__name__} generated without calling encode_prompt")
    return tuple(calls)


@contextmanager
def replaying(pipeline, encoding: Encoding):
    """Within the block, the pipeline's ``encode_prompt`` returns ``encoding``'s calls in order (on the device
    asked for); one call more than were recorded is an error rather than a silent reuse."""
    calls = []

    def replay(*_args, device=None, **_kwargs):
        if len(calls) == len(encoding):
            raise RuntimeError(f"{type(pipeline).__name__} encoded a prompt {len(calls) + 1} times in one "
                               f"generation; svdq recorded {len(encoding)}")
        outputs = encoding[len(calls)]
        calls.append(device)
        target = device or pipeline._execution_device
        return tuple(_to(o, target) for o in outputs)

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
    """A flat safetensors-ready form: call ``c``'s tensors by position as ``c/position`` (a list's items as
    ``c/position.index``), and metadata naming, per call, the positions that were None and the lists' lengths."""
    tensors, shapes = {}, []
    for number, outputs in enumerate(encoding):
        empty, lists = [], {}
        for i, output in enumerate(outputs):
            if output is None:
                empty.append(i)
            elif isinstance(output, list):
                lists[str(i)] = len(output)
                tensors.update({f"{number}/{i}.{j}": item.contiguous() for j, item in enumerate(output)})
            else:
                tensors[f"{number}/{i}"] = output.contiguous()
        shapes.append({"size": len(outputs), "empty": empty, "lists": lists})
    return tensors, {"calls": json.dumps(shapes)}


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Encoding:
    def outputs(number: int, shape: dict) -> Outputs:
        def output(i: int):
            if i in shape["empty"]:
                return None
            if str(i) in shape["lists"]:
                return [tensors[f"{number}/{i}.{j}"] for j in range(shape["lists"][str(i)])]
            return tensors[f"{number}/{i}"]

        return tuple(output(i) for i in range(shape["size"]))

    return tuple(outputs(number, shape) for number, shape in enumerate(json.loads(metadata["calls"])))
