"""svdq: SVDQuant W4A4 (and VQ4DiT 2-/3-bit) post-training quantization for diffusion transformers.

Public API::

    from svdq_cli import QuantConfig, quantize_model
    report = quantize_model(model, calibrate=lambda m: m(example), config=QuantConfig(rank=32))

    from svdq_cli import load_quantized_pipeline
    pipeline = load_quantized_pipeline("svdq-int4_r32-FLUX.1-dev.safetensors")

    # a `svdq export --format diffusers` directory, opened by diffusers itself; on a machine without the
    # GPU its kernels need, first install the slow pure-torch stand-in:
    from svdq_cli import use_cpu_lite_kernels
    use_cpu_lite_kernels()
    pipeline = DiffusionPipeline.from_pretrained("run/export/diffusers", torch_dtype=torch.bfloat16)

The names load on first use (PEP 562), so importing one part of svdq (the CLI, a stage) does not import the
rest. docs/DESIGN.md §3 lays out the packages and the direction their imports go.
"""

from importlib import import_module

from .version import __version__

_PUBLIC = {  # name → the module that defines it
    "quantize_model": "api", "select_targets": "api",
    "LayerReport": "engines.reports", "QuantReport": "engines.reports",
    "BadInputError": "errors", "SvdqError": "errors",
    "QuantConfig": "methods.config",
    "SVDQLinear": "runtime.linear", "VQLinear": "runtime.vq_linear",
    "load_quantized": "formats.svdq_file", "load_quantized_pipeline": "formats.svdq_file",
    "use_cpu_lite_kernels": "formats.nunchaku.lite_kernels",
}
__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
