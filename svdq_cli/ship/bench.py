"""``svdq bench``: kernel timings at FLUX shapes, or one transformer step of an exported model.

Kernel mode times, per (K, N): the fused W4A4 GEMM with its rank-r branch, the same without the branch,
the naive unfused sequence (quantize kernel, GEMM kernel, then the branch as two torch matmuls) and torch's
bf16 matmul — CUDA events, warm-up, median of repeats, all in one run so ratios compare like with like.
Without a usable GPU it times the reference path on the CPU instead and says that GPU kernels were not
measured. Emulated mode (``--emulate``) runs the real kernels on the CPU emulator and reports what it counts
(global bytes, mma instructions) against the ideal traffic, with a roofline *model* for published GPU peaks.
Figures, never pass/fail: the targets live in DESIGN.md §7.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from torch import nn

from ..formats.svdq_file import load_quantized_pipeline, read_metadata, recorded_base
from ..methods.config import QuantConfig
from ..models.loading import adapter_of, load_pipeline
from ..runtime import cost_model, kernels
from ..runtime.emulator.backend import EmulatedBackend
from ..runtime.kernels import describe
from ..runtime.linear import SVDQLinear

FLUX_SHAPES = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072))  # (K, N)


def random_layer(k: int, n: int, rank: int, dtype: torch.dtype, device: str, seed: int = 0):
    """An SVDQLinear from a random Gaussian layer (round-to-nearest, no calibration: timing only)."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=generator) / k**0.5)
    config = QuantConfig(rank=rank, exact_svd_max_elements=0)
    return SVDQLinear.from_linear(linear.to(dtype), config).to(device)


def median_seconds(function: Callable[[], object], cuda: bool, warmup: int, repeats: int) -> float:
    """Median seconds of ``function``."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            function()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def machine(device: str) -> dict[str, object]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                    multiprocessors=properties.multi_processor_count)
        try:
            import cupy

            info["cupy"] = cupy.__version__
        except ImportError:
            pass
        info.update(_clocks())
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def shape_timings(k: int, n: int, m: int, rank: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Median timings of the variants at one (K, N), and the figures derived from them."""
    cuda = device.startswith("cuda")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    with_branch = random_layer(k, n, rank, dtype, device)
    without = random_layer(k, n, 0, dtype, device)
    weight = torch.randn(n, k).to(dtype).to(device)
    fused = cuda and kernels.fused_unsupported(with_branch, x) is None
    timings = {
        "w4a4_lowrank": median_seconds(lambda: with_branch(x), cuda, 3, repeats),
        "w4a4": median_seconds(lambda: without(x), cuda, 3, repeats),
        "matmul_16bit": median_seconds(lambda: x @ weight.T, cuda, 3, repeats),
    }
    if fused:
        def naive():  # the unfused sequence: quantize + GEMM kernels, then the branch as two torch matmuls
            y = kernels.fused_forward(without, x)
            smoothed = x.float() / with_branch.smooth.float()
            return y + ((smoothed @ with_branch.lora_down.float().T) @ with_branch.lora_up.float().T).to(dtype)

        timings["naive_unfused"] = median_seconds(naive, cuda, 3, repeats)
    seconds = timings["w4a4_lowrank"]
    moved = m * k * x.element_size() + n * k // 2 + m * n * x.element_size()
    return {
        "K": k, "N": n, "M": m, "rank": rank, "fused": fused,
        "microseconds": {name: value * 1e6 for name, value in timings.items()},
        "tflops": 2.0 * m * n * k / seconds / 1e12, "gbps": moved / seconds / 1e9,
        "speedup_vs_16bit": timings["matmul_16bit"] / seconds,
        "lowrank_overhead_percent": 100.0 * (timings["w4a4_lowrank"] / timings["w4a4"] - 1.0),
    }


def _clocks() -> dict[str, str]:
    """SM and memory clocks (current and maximum) from nvidia-smi, when it is there."""
    if shutil.which("nvidia-smi") is None:
        return {}
    fields = "clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,driver_version"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))


def kernel_bench(m: int, rank: int, dtype: torch.dtype, device: str, repeats: int,
                 shapes=FLUX_SHAPES) -> dict[str, object]:
    """Timings per shape; on a CUDA device the fused kernels run when they apply."""
    rows = [shape_timings(k, n, m, rank, dtype, device, repeats) for k, n in shapes]
    if any(row["fused"] for row in rows):
        note = "fused CUDA kernels measured"
    elif device.startswith("cuda"):
        note = f"GPU kernels were NOT measured: {kernels.describe(device)}"
    else:
        note = "GPU kernels were NOT measured: no CUDA device, so the reference path was timed on the CPU"
    return {"mode": "kernel", "machine": machine(device), "note": note, "rows": rows}


def model_bench(export: str, device: str, repeats: int) -> dict[str, object]:
    """One transformer step of the exported model against the 16-bit one: latency and memory."""
    metadata = read_metadata(export)
    recipe = metadata["recipe"]
    base = recorded_base(metadata)
    adapter = adapter_of(recipe["family"], base, recipe.get("pipeline_args"))
    pipeline = load_quantized_pipeline(export, device)
    quantized = adapter.denoiser_of(pipeline)
    reference = adapter.denoiser_of(load_pipeline(base, adapter, getattr(torch, recipe["dtype"]), device))
    captured: dict[str, object] = {}

    def keep_inputs(_module, args, kwargs):
        captured.setdefault("args", args)
        captured.setdefault("kwargs", kwargs)

    handle = quantized.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    protocol = adapter.protocol
    adapter.generate(pipeline, ["a red fox in fresh snow"], [0], 1, protocol.guidance,
                     recipe["validation"].get("resolution") or protocol.resolution, output_type="latent")
    handle.remove()
    cuda = device.startswith("cuda")
    result = {"mode": "model", "machine": machine(device), "export": str(export)}
    for name, transformer in (("16bit", reference), ("quantized", quantized)):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            seconds = median_seconds(lambda t=transformer: t(*captured["args"], **captured["kwargs"]), cuda, 2, repeats)
        stored = sum(t.numel() * t.element_size() for t in transformer.state_dict().values())
        entry = {"step_milliseconds": seconds * 1e3, "weight_bytes": stored}
        if cuda:
            entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result[name] = entry
    result["note"] = describe(device) + ("" if cuda else "; peak memory is measured on a GPU only")
    return result


def emulated_kernel_bench(m: int, rank: int, dtype: torch.dtype, shapes=None, progress=None) -> dict:
    """Counted traffic and a roofline model of the fused kernels per shape, from the CPU emulator.

    Each GPU of :data:`~svdq_cli.runtime.cost_model.GPUS` is emulated at its own compute capability (the
    Hopper path differs), counting only (mma arithmetic skipped), so full FLUX shapes take seconds each.
    """
    rows = []
    for k, n in shapes or FLUX_SHAPES:
        layer = random_layer(k, n, rank, dtype, "cpu")
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
        ideal = cost_model.ideal_bytes(m, n, k, rank, x.element_size())
        row = {"K": k, "N": n, "M": m, "rank": rank, "gpus": {}}
        for gpu in cost_model.GPUS.values():
            backend = EmulatedBackend(gpu.capability, checked=True, count_only=True)
            kernels.fused_forward(layer, x, backend=backend)
            quantize, gemm = backend.launches
            figures = {
                "quantize": cost_model.kernel_figures(quantize, ideal["quantize"], gpu, 2 * m * k * rank),
                "gemm": cost_model.kernel_figures(gemm, ideal["gemm"], gpu, 2 * m * n * rank),
            }
            figures["gemm"]["mma"] = dict(gemm.mma)
            figures["gemm"]["shared_bytes"] = gemm.shared_bytes
            total = sum(f["requested_bytes"] for f in figures.values())
            row["gpus"][gpu.name] = {
                **figures,
                "estimate_us": sum(f["estimate_us"] for f in figures.values()),
                "no_reuse_us": sum(f["no_reuse_us"] for f in figures.values()),
                "branch_share_of_bytes": sum(f["branch_bytes"] for f in figures.values()) / total,
                "branch_bytes_over_gemm_bytes": sum(f["branch_bytes"] for f in figures.values())
                / figures["gemm"]["requested_bytes"],
            }
            if progress:
                progress(f"{k}x{n} {gpu.name}")
        row["branch_share_of_flops"] = (2 * m * rank * (k + n)) / (2 * m * n * k + 2 * m * rank * (k + n))
        rows.append(row)
    note = ("MODEL, not a measurement: bytes and mma instructions counted by executing kernels/*.cu on the CPU "
            "emulator, set against published dense peaks (DRAM traffic = distinct sectors touched, i.e. the L2 "
            "serving every re-read)")
    return {"mode": "emulated", "machine": machine("cpu"), "note": note, "rows": rows}
