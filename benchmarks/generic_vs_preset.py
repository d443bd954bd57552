"""The generic adapter against a preset, side by side in one run, on the same saved model:

- ``svdq quantize DIR --recipe tiny-flux`` (the preset: the family's facts written down) and
  ``svdq quantize DIR --recipe generic.yaml`` (family ``diffusers``: the same facts read from the directory
  and the call's signature), with the same quantization, calibration and validation settings;
- wall time of the whole command (process start and model load included) and of its stages (weights:
  smooth + svd + quantize) (median over ``--repeats`` runs, the two paths
  alternating so that the machine's changing speed falls on both), and their ratio;
- whether both quantized the same linears to the same bits (the weight artifacts' tensors, compared one by
  one; metadata naming the recipe differs by design).

    python benchmarks/generic_vs_preset.py                      # tiny-flux and tiny-sd3, 5 repeats
    python benchmarks/generic_vs_preset.py --models tiny-sd3 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

WEIGHT_SIDE = ("smooth", "svd", "quantize")
STAGES = ("collect", *WEIGHT_SIDE, "validate", "export")
VAL_PROMPTS = 4  # the tiny recipes' own
GENERIC_RECIPE = """\
model: ""
family: diffusers
dtype: float32
device: cpu
quant: {{method: svdquant, precision: int4, rank: 16, calib_rows: 256}}
calibration: {{num_prompts: {prompts}, steps: 4, resolution: 64}}
validation: {{num_prompts: {val_prompts}, steps: 4, resolution: 64, baselines: []}}
pipeline_args: {{max_sequence_length: 32}}
"""


def save_model(preset: str, directory: Path) -> None:
    """The preset's tiny pipeline saved in diffusers format, as a user's model directory would be."""
    from svdq_cli.models.registry import get_adapter

    get_adapter(preset).build_tiny(0).save_pretrained(directory)


def quantize(directory: Path, recipe: str, out: Path, prompts: int) -> dict:
    """One ``svdq quantize`` run; its wall time and stage timings."""
    command = [sys.executable, "-m", "svdq_cli", "quantize", str(directory), "--recipe", recipe, "--out", str(out),
               "--num-prompts", str(prompts), "--val-prompts", str(VAL_PROMPTS), "--baselines", "",
               "--device", "cpu", "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{recipe} failed:\n{done.stderr[-2000:]}")
    stages = json.loads(done.stdout)["stages"]
    seconds = {f"{name}_s": stages[name]["seconds"] for name in STAGES}
    return {"wall_s": wall, "stages_s": sum(seconds.values()), **seconds}


def same_weights(first: Path, second: Path) -> bool:
    """Both runs' quantized weights (every tensor of the quantize stage's safetensors) are equal."""
    from safetensors.torch import load_file

    files = sorted(path.relative_to(first) for path in (first / "quantize").glob("*.safetensors"))
    if not files:
        return False
    for name in files:
        a, b = load_file(first / name), load_file(second / name)
        if a.keys() != b.keys() or any(not a[key].equal(b[key]) for key in a):
            return False
    return True


def compare(preset: str, scratch: Path, repeats: int, prompts: int) -> dict:
    directory, recipe = scratch / preset, scratch / f"{preset}-generic.yaml"
    save_model(preset, directory)
    recipe.write_text(GENERIC_RECIPE.format(prompts=prompts, val_prompts=VAL_PROMPTS))
    runs: dict[str, list[dict]] = {"preset": [], "generic": []}
    for repeat in range(repeats):
        order = ("preset", "generic") if repeat % 2 == 0 else ("generic", "preset")
        for path in order:
            out = scratch / f"{preset}-{path}-{repeat}"
            runs[path].append(quantize(directory, preset if path == "preset" else str(recipe), out, prompts))
    medians = {path: {key: statistics.median(run[key] for run in found) for key in found[0]}
               for path, found in runs.items()}
    return {"model": preset, "repeats": repeats, **medians,
            "ratio": medians["generic"]["wall_s"] / medians["preset"]["wall_s"],
            "stages_ratio": medians["generic"]["stages_s"] / medians["preset"]["stages_s"],
            "same_weights": same_weights(scratch / f"{preset}-preset-0", scratch / f"{preset}-generic-0")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-flux,tiny-sd3", help="comma-separated tiny presets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=8, help="calibration prompts of each run (the tiny "
                                                                   "recipes' 8)")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="svdq-generic-") as scratch:
        results = [compare(model, Path(scratch), options.repeats, options.num_prompts)
                   for model in options.models.split(",")]
    good = all(result["same_weights"] for result in results)
    if options.json:
        print(json.dumps(results, indent=2))
        return 0 if good else 1
    table = Table(title=f"generic adapter vs preset, same saved model, median of {options.repeats} (this CPU)")
    for column in ("model", "path", "command s", "stages s", "collect s", "weights s", "validate s"):
        table.add_column(column, justify="right")
    for result in results:
        for path in ("preset", "generic"):
            run = result[path]
            weights = sum(run[f"{stage}_s"] for stage in WEIGHT_SIDE)
            table.add_row(result["model"], path, f"{run['wall_s']:.1f}", f"{run['stages_s']:.2f}",
                          f"{run['collect_s']:.2f}", f"{weights:.2f}", f"{run['validate_s']:.2f}")
    console = Console()
    console.print(table)
    for result in results:
        console.print(f"{result['model']}: generic / preset = {result['ratio']:.3f} (whole command), "
                      f"{result['stages_ratio']:.3f} (stages); quantized weights "
                      f"{'identical' if result['same_weights'] else 'DIFFER'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
