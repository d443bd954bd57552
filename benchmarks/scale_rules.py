"""Before/after the scale rules of config version 2: the whole −8…7 range and the weight-scale search.

Version 1 took ``max|x| / 7`` for every group of weights and activations (code −8 unused) and never searched
a weight scale; version 2 uses the full range (``max(max x / 7, −min x / 8)``) and picks each weight group's
scale among symmetric, full-range and shrunk candidates by the output error on the calibration rows. The
same configs differ only in ``version``, so each pair is like for like, measured side by side in one run:

- layers: relative output error on held-out rows of the synthetic FLUX-shaped layers (planted outliers), per
  method, and the weight side's seconds per layer (one thread: svdq's policy);
- tiny-flux: PSNR, SSIM and latent error of validate (2 held-out prompts) per method, end to end.

    python benchmarks/scale_rules.py              # FLUX shapes and tiny-flux (several minutes on 2 cores)
    python benchmarks/scale_rules.py --quick      # one small shape
    python benchmarks/scale_rules.py --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_quality import FLUX_SHAPES, QUICK_SHAPES, evaluate  # noqa: E402

from svdq_cli import QuantConfig  # noqa: E402

METHODS = {
    "W4A16 RTN": {"method": "rtn", "weight_only": True},
    "W4A4 RTN": {"method": "rtn"},
    "W4A4 SmoothQuant": {"method": "smoothquant"},
    "W4A4 SVDQuant r16": {"rank": 16},
    "W4A4 SVDQuant r32": {"rank": 32},
    "W4A4 SVDQuant r64": {"rank": 64},
}
TINY_RECIPE = """model: tiny-flux
family: tiny-flux
dtype: bfloat16
quant: {{method: svdquant, rank: 16, version: {version}}}
calibration: {{num_prompts: 8, steps: 4, resolution: 64}}
validation: {{num_prompts: 2, steps: 4, resolution: 64, baselines: [rtn, smoothquant, w4a16]}}
"""


def layer_rows(shapes, seed: int, talk: Console) -> list[dict]:
    rows = []
    for shape in shapes:
        for name, fields in METHODS.items():
            row = {"shape": f"{shape[0]}x{shape[1]}", "method": name}
            for version in (1, 2):
                talk.print(f"[dim]{row['shape']} {name} v{version} …[/dim]")
                result = evaluate(shape, name, QuantConfig(version=version, **fields), seed, structured=True)
                row[f"error_v{version}"] = result["relative_error"]
                row[f"seconds_v{version}"] = result["weight_side_seconds"]
            rows.append(row)
    return rows


def tiny_flux(talk: Console) -> dict[str, dict]:
    """validate's figures for every method of a tiny-flux run at config version 1 and 2."""
    results = {}
    scratch = Path(tempfile.mkdtemp(prefix="svdq-scale-rules-"))
    try:
        for version in (1, 2):
            talk.print(f"[dim]tiny-flux v{version} …[/dim]")
            recipe = scratch / f"v{version}.yaml"
            recipe.write_text(TINY_RECIPE.format(version=version))
            run = scratch / f"run-v{version}"
            subprocess.run([sys.executable, "-m", "svdq_cli", "quantize", "tiny-flux", "--recipe", str(recipe),
                            "--out", str(run)], check=True, capture_output=True)
            report = json.loads((run / "validate" / "report.json").read_text())
            results[f"v{version}"] = {m: {k: v[k] for k in ("psnr", "ssim", "latent_error")}
                                      for m, v in report["methods"].items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def render(layers: list[dict], tiny: dict | None, console: Console) -> None:
    table = Table(title="Held-out relative output error, config version 1 (max|x|/7) → 2 (full range + search)")
    for column in ("shape K×N", "method", "v1", "v2", "v2 ÷ v1", "weight side s v1 → v2"):
        table.add_column(column, justify="left" if column in ("shape K×N", "method") else "right")
    for r in layers:
        table.add_row(r["shape"], r["method"], f"{r['error_v1']:.4f}", f"{r['error_v2']:.4f}",
                      f"{r['error_v2'] / r['error_v1']:.3f}", f"{r['seconds_v1']:.2f} → {r['seconds_v2']:.2f}")
    console.print(table)
    if tiny:
        table = Table(title="tiny-flux bf16, validate on 2 held-out prompts: v1 → v2")
        for column in ("method", "PSNR dB", "SSIM", "latent rel. error"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method in tiny["v1"]:
            a, b = tiny["v1"][method], tiny["v2"][method]
            table.add_row(method, f"{a['psnr']:.2f} → {b['psnr']:.2f}", f"{a['ssim']:.4f} → {b['ssim']:.4f}",
                          f"{a['latent_error']:.4f} → {b['latent_error']:.4f}")
        console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, no tiny-flux run")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # svdq's thread policy (svdq_cli/threads.py)
    talk = Console(stderr=True)
    layers = layer_rows(QUICK_SHAPES if args.quick else FLUX_SHAPES, args.seed, talk)
    tiny = None if args.quick else tiny_flux(talk)
    if args.json:
        print(json.dumps({"layers": layers, "tiny_flux": tiny}, indent=2))
    else:
        render(layers, tiny, Console(width=None if sys.stdout.isatty() else 140))
    return 0


if __name__ == "__main__":
    sys.exit(main())
