"""``svdq bench``: kernel timings at FLUX shapes, one step of an exported model, or the emulated counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import BadInputError
from .common import (
    JsonOpt,
    out,
    quiet_libraries,
)


def bench(
    run_dir: Annotated[Path | None, typer.Argument(help="A run with an export: time one transformer step of it "
                                                        "against the 16-bit model. Omit for kernel timings.")] = None,
    m: Annotated[int | None, typer.Option("--m", help="Tokens per GEMM (default: 4608 on a GPU = 4096 image + "
                                                      "512 text tokens; 256 on a CPU).")] = None,
    rank: Annotated[int, typer.Option(help="Low-rank branch rank for kernel timings.")] = 32,
    dtype: Annotated[str, typer.Option(help="bfloat16 or float16.")] = "bfloat16",
    device: Annotated[str | None, typer.Option(help="cuda, cuda:N or cpu (default: cuda when present).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats; the median is reported (GPU 50, CPU 3).")] = None,
    emulate: Annotated[bool, typer.Option(metavar="", help="Run the kernels on the CPU emulator and print what "
                                                           "they move and compute, against the ideal and a "
                                                           "roofline model (no timing).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Time the kernels at FLUX shapes, or one transformer step of an exported model."""
    import torch

    from ..run.directory import Run
    from ..ship.bench import kernel_bench, model_bench

    if dtype not in ("bfloat16", "float16"):
        raise BadInputError(f"--dtype {dtype!r} is invalid (allowed: bfloat16, float16)")
    if emulate:
        if run_dir is not None:
            raise BadInputError("--emulate counts the kernels at FLUX shapes; it takes no run directory")
        _emulated_bench(m or 4608, rank, getattr(torch, dtype), as_json)
        return
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA device is available")
    cuda = device.startswith("cuda")
    repeats = repeats or (50 if cuda else 3)
    quiet_libraries()
    if run_dir is not None:
        record = Run.existing(run_dir).manifest["stages"].get("export", {})
        if record.get("status") != "done":
            raise BadInputError(f"{run_dir} has no export yet; run `svdq export {run_dir}` first")
        result = model_bench(str(run_dir / record["file"]), device, repeats)
    else:
        result = kernel_bench(m or (4608 if cuda else 256), rank, getattr(torch, dtype), device, repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"[bold]{result['note']}[/bold]")
    out.print(" ".join(f"{k}={v}" for k, v in result["machine"].items()))
    if result["mode"] == "model":
        table = Table(title="one transformer step")
        for column in ("model", "ms", "weight MiB", "peak MiB"):
            table.add_column(column)
        for name in ("16bit", "quantized"):
            entry = result[name]
            peak = entry.get("peak_memory_bytes")
            table.add_row(name, f"{entry['step_milliseconds']:.2f}", f"{entry['weight_bytes'] / 2**20:.1f}",
                          "-" if peak is None else f"{peak / 2**20:.1f}")
        out.print(table)
        return
    if not any(row["fused"] for row in result["rows"]):  # reference-path timings say nothing of kernel speed
        table = Table(title=f"reference path (torch, dequantized weights), M = {result['rows'][0]['M']} (median µs): "
                            "not kernel timings")
        for column in ("K×N", f"SVDQLinear r{rank}", "SVDQLinear r0", "16-bit matmul"):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            us = row["microseconds"]
            table.add_row(f"{row['K']}×{row['N']}", f"{us['w4a4_lowrank']:.0f}", f"{us['w4a4']:.0f}",
                          f"{us['matmul_16bit']:.0f}")
        out.print(table)
        out.print("for the kernels' traffic and a roofline model without a GPU: svdq bench --emulate")
        return
    table = Table(title=f"W4A4 r{rank} vs 16-bit matmul, M = {result['rows'][0]['M']} (median µs)")
    for column in ("K×N", "W4A4+LR", "W4A4", "naive", "16-bit", "TFLOP/s", "GB/s", "× 16-bit", "LR overhead"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        us = row["microseconds"]
        naive = us.get("naive_unfused")
        table.add_row(f"{row['K']}×{row['N']}", f"{us['w4a4_lowrank']:.0f}", f"{us['w4a4']:.0f}",
                      "-" if naive is None else f"{naive:.0f}", f"{us['matmul_16bit']:.0f}", f"{row['tflops']:.2f}",
                      f"{row['gbps']:.1f}", f"{row['speedup_vs_16bit']:.2f}", f"{row['lowrank_overhead_percent']:.1f}%")
    out.print(table)


def _emulated_bench(m: int, rank: int, dtype, as_json: bool) -> None:
    from ..runtime.cost_model import GPUS
    from ..ship import bench
    from ..system.progress import task

    with task("emulate", len(bench.FLUX_SHAPES) * len(GPUS)) as advance:
        result = bench.emulated_kernel_bench(m, rank, dtype, bench.FLUX_SHAPES, progress=advance)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"[bold]{result['note']}[/bold]")
    megabytes = lambda value: f"{value / 1e6:.1f}"  # noqa: E731
    for gpu in GPUS:
        table = Table(title=f"fused W4A4 r{rank}, M = {m}: counted traffic and {gpu} roofline model")
        for column in ("K×N", "kernel", "requested MB", "distinct MB", "ideal MB", "req÷ideal", "distinct÷ideal",
                       "mma", "smem KB", "bound", "model µs", "no-reuse µs"):
            table.add_column(column, justify="left" if column == "kernel" else "right")
        for row in result["rows"]:
            figures = row["gpus"][gpu]
            for name in ("quantize", "gemm"):
                f = figures[name]
                mma = sum(f.get("mma", {}).values())
                shared = f"{f['shared_bytes'] / 1024:.1f}" if "shared_bytes" in f else ""
                table.add_row(f"{row['K']}×{row['N']}", name, megabytes(f["requested_bytes"]),
                              megabytes(f["unique_bytes"]), megabytes(f["ideal_bytes"]),
                              f"{f['requested_over_ideal']:.2f}", f"{f['unique_over_ideal']:.2f}",
                              f"{mma:,}" if mma else "-", shared, f["bound"], f"{f['estimate_us']:.1f}",
                              f"{f['no_reuse_us']:.0f}")
        out.print(table)
        for row in result["rows"]:
            figures = row["gpus"][gpu]
            out.print(f"{row['K']}×{row['N']}: low-rank branch {100 * figures['branch_bytes_over_gemm_bytes']:.1f}% "
                      f"of the GEMM's requested bytes, {100 * row['branch_share_of_flops']:.1f}% of the FLOPs; "
                      f"model {figures['estimate_us']:.1f} µs for both kernels ({figures['no_reuse_us']:.0f} µs "
                      "if no byte were reused from cache)")
