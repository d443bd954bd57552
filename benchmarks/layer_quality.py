"""Layer quality of every method on synthetic FLUX-shaped layers with planted activation outliers.

Real diffusion and text transformers show a few input channels 20–50× the median; random layers don't,
so this plants them. Each method quantizes the same bf16 layer from the same calibration rows through
``quantize_model`` and is scored on held-out rows:

    relative error = ‖y_quant − y_bf16‖ / ‖y_bf16‖

Also printed: the SVDQuant/naive error ratio, weight-side seconds per layer (smoothing search + SVD +
quantization; calibration forward passes excluded) and bytes against bf16.

    python benchmarks/layer_quality.py            # FLUX shapes, all methods (minutes on 2 cores)
    python benchmarks/layer_quality.py --quick    # one small shape (the demo)
    python benchmarks/layer_quality.py --search   # the default (local) α/β search against the exhaustive one
    python benchmarks/layer_quality.py --json     # one JSON document on stdout

Weight-side seconds are single-threaded, svdq's policy (svdq_cli/threads.py); ``--search`` also times the
stages' work per layer (search, branch, residual, report) with a layer per core, as the stages run a block.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from svdq_cli import QuantConfig, quantize_model
from svdq_cli.calibration.collector import collect_statistics
from svdq_cli.engines.uniform import input_gram, measure_layer, plan_group, quantize_layer
from svdq_cli.models.synthetic import planted_outlier_layer
from svdq_cli.quant.svdquant import branch_factors
from svdq_cli.system.threads import parallel_map, workers

FLUX_SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072))  # (in_features K, out_features N)
QUICK_SHAPES = ((1024, 1024),)
# Every FLUX.1-dev layer shape (K, N, weight-only): attention and MLP in and out, and the AdaLN projections.
SEARCH_SHAPES = ((3072, 3072, False), (12288, 3072, False), (3072, 12288, False), (15360, 3072, False),
                 (3072, 18432, True))

METHODS: dict[str, QuantConfig] = {
    "W4A16 RTN": QuantConfig(method="rtn", weight_only=True),
    "W4A4 naive (RTN)": QuantConfig(method="rtn"),
    "W4A4 SmoothQuant": QuantConfig(method="smoothquant"),
    "W4A4 SVDQuant r16": QuantConfig(rank=16),
    "W4A4 SVDQuant r32": QuantConfig(rank=32),
    "W4A4 SVDQuant r64": QuantConfig(rank=64),
    "W4A4 SVDQuant r32 + GPTQ": QuantConfig(rank=32, gptq=True),
}
QUICK_METHODS = ("W4A16 RTN", "W4A4 naive (RTN)", "W4A4 SmoothQuant", "W4A4 SVDQuant r32")


def evaluate(shape: tuple[int, int], name: str, config: QuantConfig, seed: int, structured: bool) -> dict[str, object]:
    in_features, out_features = shape
    layer, calibration, held_out = planted_outlier_layer(in_features, out_features, seed, structured)
    with torch.no_grad():
        reference = nn.functional.linear(held_out.float(), layer.weight.float(), layer.bias.float())
    model = nn.Sequential(layer)
    batches = calibration.split(512)
    report = quantize_model(model, lambda m: [m(batch) for batch in batches], config)
    with torch.no_grad():
        output = model(held_out).float()
    error = (torch.linalg.vector_norm(output - reference) / torch.linalg.vector_norm(reference)).item()
    layer_report = report.layers[0]
    return {
        "shape": f"{in_features}x{out_features}",
        "method": name,
        "relative_error": error,
        "alpha": layer_report.alpha,
        "beta": layer_report.beta,
        "weight_side_seconds": layer_report.seconds,
        "bytes": layer_report.bytes_after,
        "bytes_bf16": layer_report.bytes_before,
    }


def render(results: list[dict[str, object]], console: Console) -> None:
    naive = {r["shape"]: r["relative_error"] for r in results if r["method"] == "W4A4 naive (RTN)"}
    table = Table(title="Relative output error on held-out rows (planted 20–50× outlier channels), bf16 layers")
    for column in ("shape K×N", "method", "rel. error", "÷ naive W4A4", "α", "β", "weight side s", "bf16 ÷ bytes"):
        table.add_column(column, justify="left" if column in ("shape K×N", "method") else "right")
    for r in results:
        table.add_row(
            str(r["shape"]),
            str(r["method"]),
            f"{r['relative_error']:.4f}",
            f"{r['relative_error'] / naive[r['shape']]:.3f}" if r["shape"] in naive else "-",
            f"{r['alpha']:.2f}",
            f"{r['beta']:.2f}",
            f"{r['weight_side_seconds']:.2f}",
            f"{r['bytes_bf16'] / r['bytes']:.2f}×",
        )
    console.print(table)


def search_rows(seed: int, talk: Console) -> list[dict[str, object]]:
    """The default SVDQuant r32 config with the local α/β search against the same with the exhaustive one, and
    the default's weight side per layer as the stages run it on every core."""
    rows = []
    for k, n, weight_only in SEARCH_SHAPES:
        row = {"shape": f"{k}x{n}", "weight_only": weight_only}
        for search in ("exhaustive", "local"):
            talk.print(f"[dim]{k}x{n} {search} search …[/dim]")
            config = QuantConfig(rank=32, weight_only=weight_only, search=search)
            result = evaluate((k, n), search, config, seed, structured=True)
            row[search] = {"error": result["relative_error"], "seconds": result["weight_side_seconds"],
                           "alpha": result["alpha"], "beta": result["beta"]}
        talk.print(f"[dim]{k}x{n} stage weight side on {workers()} workers …[/dim]")
        row["stage"] = stage_seconds((k, n), weight_only, seed)
        rows.append(row)
    return rows


def stage_seconds(shape: tuple[int, int], weight_only: bool, seed: int) -> dict[str, float]:
    """Wall seconds per layer of the smooth, svd and quantize stages' work (search, branch, residual, report)
    on :func:`workers` copies of the layer at once, as a block's layers run; and one copy alone."""
    in_features, out_features = shape
    layer, calibration, _ = planted_outlier_layer(in_features, out_features, seed, structured=True)
    config = QuantConfig(rank=32, weight_only=weight_only)
    stats = collect_statistics(nn.Sequential(layer), {"0": layer}, lambda m: [m(b) for b in calibration.split(512)],
                               config).stats["0"]

    def weight_side(_) -> None:
        plan = plan_group(["0"], [layer], stats, config, weight_only=["0"] if weight_only else ())
        smooth = plan.smooth if plan.smooth is not None else torch.ones(in_features)
        factors = branch_factors(layer.weight, smooth, config, layer.weight.dtype)
        quantized = quantize_layer(layer, config, plan, None, factors, input_gram(stats, plan, config))
        measure_layer("0", "0", layer, quantized, plan, stats.sample(config.search_rows), config, 0.0)

    timings = {}
    for label, copies in (("alone", 1), ("parallel", workers())):
        start = time.perf_counter()
        for _ in parallel_map(weight_side, range(copies)):
            pass
        timings[label] = (time.perf_counter() - start) / copies
    return {**timings, "workers": workers()}


def render_search(rows: list[dict[str, object]], console: Console) -> None:
    table = Table(title="α/β search, SVDQuant r32: local (default) vs exhaustive; the default's weight side")
    for column in ("shape K×N", "exhaustive error", "local error", "local ÷ exhaustive", "α/β exhaustive → local",
                   "1 thread s exhaustive → local", "weight side s/layer: alone", "on all workers"):
        table.add_column(column, justify="left" if column == "shape K×N" else "right")
    for r in rows:
        e, lo, stage = r["exhaustive"], r["local"], r["stage"]
        table.add_row(r["shape"] + (" W4A16" if r["weight_only"] else ""), f"{e['error']:.4f}", f"{lo['error']:.4f}",
                      f"{lo['error'] / e['error']:.3f}", f"{e['alpha']:.2f}/{e['beta']:.2f} → {lo['alpha']:.2f}/"
                      f"{lo['beta']:.2f}", f"{e['seconds']:.2f} → {lo['seconds']:.2f}", f"{stage['alone']:.2f}",
                      f"{stage['parallel']:.2f} ({stage['workers']} workers)")
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape and four methods (the demo)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of a table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iid", action="store_true", help="i.i.d. Gaussian weights and inputs (no structure)")
    parser.add_argument("--search", action="store_true", help="the local α/β search against the exhaustive one")
    args = parser.parse_args()
    torch.set_num_threads(1)  # svdq's thread policy
    if args.search:
        rows = search_rows(args.seed, Console(stderr=True))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            render_search(rows, Console(width=None if sys.stdout.isatty() else 200))
        return 0
    shapes = QUICK_SHAPES if args.quick else FLUX_SHAPES
    names = QUICK_METHODS if args.quick else tuple(METHODS)
    talk = Console(stderr=True)
    results = []
    started = time.perf_counter()
    for shape in shapes:
        for name in names:
            talk.print(f"[dim]{shape[0]}x{shape[1]} {name} …[/dim]")
            results.append(evaluate(shape, name, METHODS[name], args.seed, structured=not args.iid))
    machine = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if args.json:
        json.dump(
            {"machine": machine, "results": results, "seconds": time.perf_counter() - started}, sys.stdout, indent=2
        )
        print()
    else:
        render(results, Console(width=None if sys.stdout.isatty() else 140))
        talk.print(
            f"torch {machine['torch']}, {machine['threads']} threads; {time.perf_counter() - started:.0f} s in all"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
