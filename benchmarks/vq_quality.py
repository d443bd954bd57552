"""VQ4DiT against its two baselines — codebook-only k-means VQ and RTN weight-only (group 64) — at 2 and 3 bits.

1. Layers: structured synthetic layers with planted outliers (``svdq_cli/synthetic.py``) at FLUX.1's aspect
   ratios, quarter width by default (``--full``: FLUX widths, 3072/12288), each method calibrated on the
   layer's own output error over 512 calibration rows (the API's path without blocks) and scored on 512
   held-out rows: relative error ``‖y − y_bf16‖ / ‖y_bf16‖``. Also printed: bits per weight including the
   codebook (bf16), and seconds per layer (single-threaded, the stages' policy).
2. End to end: ``svdq quantize`` on tiny-dit and tiny-flux with ``--method vq4dit --bits B --baselines
   rtn,kmeans``: PSNR/SSIM/latent error against the 16-bit model on 16 validation prompts, and seconds of
   block-wise calibration per block.

    python benchmarks/vq_quality.py            # quarter-width layers + tiny models (about 10 min on 2 cores)
    python benchmarks/vq_quality.py --full     # FLUX-width layers too (much longer)
    python benchmarks/vq_quality.py --json
    python benchmarks/vq_quality.py --flux-block   # one FLUX.1 double block (3072 wide, bf16, random weights):
                                                   # seconds per calibration step and peak memory, 2 cores

Figures, not tests: nothing here asserts; the tests hold the bars on small shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from svdq_cli import QuantConfig
from svdq_cli.engines.vector import quantize_linear
from svdq_cli.methods.baselines import uniform_at_bits
from svdq_cli.models.synthetic import planted_outlier_layer
from svdq_cli.quant.vq import relative_output_error
from svdq_cli.runtime.linear import SVDQLinear
from svdq_cli.system.threads import single_threaded

QUARTER_SHAPES = ((768, 768), (768, 3072), (3072, 768))  # (K, N): attention, MLP up, MLP down at 1/4 width
FLUX_SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072))
MODELS = ("tiny-dit", "tiny-flux")
VALIDATION_PROMPTS = 16  # with 4, differences of a few tenths of a dB between the VQ methods were noise


def layer_row(shape: tuple[int, int], bits: int, seed: int = 0) -> dict[str, object]:
    layer, calibration, held_out = planted_outlier_layer(*shape, seed, calibration_rows=512)
    with torch.no_grad():
        reference = layer(held_out).float()
    row: dict[str, object] = {"K": shape[0], "N": shape[1], "bits": bits}
    for method in ("vq4dit", "kmeans"):
        start = time.perf_counter()
        with single_threaded():
            result = quantize_linear(layer, calibration, QuantConfig(method=method, bits=bits, seed=seed), seed)
        quantized = result.layers[""]
        with torch.no_grad():
            row[method] = relative_output_error(quantized(held_out).float(), reference).item() ** 0.5
        row[f"{method}_seconds"] = time.perf_counter() - start
        row["bits_per_weight"] = quantized.bits_per_weight()
    rtn = SVDQLinear.from_linear(layer, uniform_at_bits(QuantConfig(method="vq4dit", bits=bits)))
    with torch.no_grad():
        row["rtn"] = relative_output_error(rtn(held_out).float(), reference).item() ** 0.5
    return row


def model_row(model: str, bits: int, work: Path) -> dict[str, object]:
    from tests.stages.conftest import svdq  # the CLI in-process, as a user runs it

    run = work / f"{model}-{bits}"
    code, _, stderr = svdq("quantize", model, "--method", "vq4dit", "--bits", str(bits), "--baselines", "rtn,kmeans",
                           "--val-prompts", str(VALIDATION_PROMPTS), "--device", "cpu", "--out", run)
    if code:
        raise SystemExit(f"{model} at {bits} bits failed: {stderr.strip()[-500:]}")
    manifest = json.loads((run / "manifest.json").read_text())
    report = json.loads((run / "validate" / "report.json").read_text())
    blocks = len(manifest["stages"]["quantize"]["artifacts"])
    row: dict[str, object] = {"model": model, "bits": bits,
                              "seconds_per_block": manifest["stages"]["quantize"]["seconds"] / blocks}
    for method, values in report["methods"].items():
        row[method] = {key: values[key] for key in ("psnr", "ssim", "latent_error")}
    return row


def flux_block(tokens: int = 256, text: int = 64, steps: int = 3) -> dict[str, object]:
    """Block-wise calibration of one FLUX.1-sized double block (19 of them in FLUX.1-dev) on one call of
    ``tokens`` image and ``text`` text tokens: seconds per Adam step and this process's peak memory."""
    import resource

    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    from svdq_cli.engines.vector import quantize_block

    torch.manual_seed(0)
    block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(torch.bfloat16).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    names = [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]
    call = ((), {"hidden_states": torch.randn(1, tokens, 3072, dtype=torch.bfloat16),
                 "encoder_hidden_states": torch.randn(1, text, 3072, dtype=torch.bfloat16),
                 "temb": torch.randn(1, 3072, dtype=torch.bfloat16)})
    weights = sum(block.get_submodule(name).weight.numel() for name in names)
    timings = {}
    for count in (0, steps):  # k-means and setup alone, then with the steps: the difference is the steps
        start = time.perf_counter()
        quantize_block(block, names, [call], QuantConfig(method="vq4dit", bits=2, vq_steps=count))
        timings[count] = time.perf_counter() - start
    return {"weights": weights, "tokens": tokens + text, "setup_seconds": timings[0],
            "seconds_per_step": (timings[steps] - timings[0]) / steps,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def render(layers: list[dict], models: list[dict], console: Console) -> None:
    if layers:
        console.print(layer_table(layers))
    if models:
        console.print(model_table(models))


def layer_table(layers: list[dict]) -> Table:
    table = Table(title="layer output relative error on held-out rows (structured synthetic, planted outliers)")
    for column in ("K×N", "bits", "VQ4DiT", "k-means VQ", "RTN g64", "bits/weight", "VQ4DiT s", "k-means s"):
        table.add_column(column, justify="right")
    for r in layers:
        table.add_row(f"{r['K']}×{r['N']}", str(r["bits"]), f"{r['vq4dit']:.4f}", f"{r['kmeans']:.4f}",
                      f"{r['rtn']:.4f}", f"{r['bits_per_weight']:.4f}", f"{r['vq4dit_seconds']:.1f}",
                      f"{r['kmeans_seconds']:.1f}")
    return table


def model_table(models: list[dict]) -> Table:
    table = Table(title="end to end vs the 16-bit model (validation prompts, same seeds)")
    for column in ("model", "bits", "method", "PSNR dB", "SSIM", "latent rel. error", "s/block (calibration)"):
        table.add_column(column, justify="right")
    for r in models:
        for method in ("vq4dit", "kmeans", "rtn"):
            m = r[method]
            table.add_row(r["model"], str(r["bits"]), method, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}",
                          f"{m['latent_error']:.4f}", f"{r['seconds_per_block']:.1f}" if method == "vq4dit" else "")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="FLUX-width layers too")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-models", action="store_true", help="layers only")
    parser.add_argument("--skip-layers", action="store_true", help="tiny models only")
    parser.add_argument("--flux-block", action="store_true", help="only: one FLUX.1 double block's calibration cost")
    args = parser.parse_args()
    console = Console(stderr=args.json)
    if args.flux_block:
        result = flux_block()
        print(json.dumps(result, indent=2) if args.json else
              f"FLUX.1 double block ({result['weights'] / 1e6:.0f} M weights, {result['tokens']} tokens): k-means and "
              f"setup {result['setup_seconds']:.0f} s, {result['seconds_per_step']:.1f} s per Adam step, peak "
              f"{result['peak_rss_gib']:.1f} GiB")
        return 0
    shapes = () if args.skip_layers else QUARTER_SHAPES + (FLUX_SHAPES if args.full else ())
    layers = []
    for shape in shapes:
        for bits in (2, 3):
            layers.append(layer_row(shape, bits))
            console.print(f"layer {shape[0]}×{shape[1]} at {bits} bits: done", style="dim")
    models = []
    if not args.skip_models:
        with tempfile.TemporaryDirectory() as work:
            for model in MODELS:
                for bits in (2, 3):
                    models.append(model_row(model, bits, Path(work)))
                    console.print(f"{model} at {bits} bits: done", style="dim")
    if args.json:
        print(json.dumps({"layers": layers, "models": models}, indent=2))
    else:
        render(layers, models, console)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
