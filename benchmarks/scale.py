"""Peak memory and time of a streamed `svdq quantize` on FLUX.1-dev-shaped checkpoints, 1 to 57 blocks, and on
an SDXL-shaped UNet.

Each size is a diffusers directory written by `svdq_cli.models.shaped` (FLUX.1-dev's or SDXL base's exact
widths, random weights), quantized in a fresh process with every stage at its smallest protocol (one
prompt, one step, 256 px), so the figures are the model's cost, not the calibration's. The child's /proc status is
sampled every 50 ms; each stage's peak is attributed from the stage name that prefixes its progress lines.

    python benchmarks/scale.py                         # 1, 4 and 16 blocks (about 10 GB of disk)
    python benchmarks/scale.py --blocks 1 4 16 57      # and FLUX.1-dev's full 19 + 38 (24 GB more)
    python benchmarks/scale.py --work /big/disk --json
    python benchmarks/scale.py --sdxl                  # the SDXL-shaped UNet instead (5.1 GB of disk)
    python benchmarks/scale.py --blocks 57 --diffusers # also `svdq export --format diffusers` (quantized
                                                       # with --act-range nunchaku): its peak and size

Anonymous RSS is what the process itself holds (tensors, the interpreter); total RSS adds the checkpoint
pages mapped while a block is read, which the kernel can drop at will. The split of a block count into
double- and single-stream blocks keeps FLUX.1-dev's one to two ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SPLITS = {1: (1, 0), 4: (1, 3), 16: (5, 11), 57: (19, 38)}
STAGES = ("encode", "collect", "smooth", "svd", "quantize", "validate", "export")
SMALLEST_PROTOCOL = ("--num-prompts", "1", "--steps", "1", "--resolution", "256", "--val-prompts", "1",
                     "--val-steps", "1", "--val-resolution", "256")


def sample_memory(pid: int) -> tuple[int, int] | None:
    """(anonymous, total) resident MiB of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status)
    except (OSError, ValueError):
        return None
    if "RssAnon" not in fields:  # exited, not yet reaped: no memory left to count
        return None
    return int(fields["RssAnon"].split()[0]) // 1024, int(fields["VmRSS"].split()[0]) // 1024


def run_measured(command: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run ``command``; its exit code, wall time, JSON output and peak memory per stage."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stage, peaks, output, tail = ["load"], {}, [], []

    def follow_stderr():
        for line in child.stderr:
            tail.append(line)
            del tail[:-20]
            name = line.split(":", 1)[0]
            if name in STAGES:
                stage[0] = name

    readers = [threading.Thread(target=follow_stderr),
               threading.Thread(target=lambda: output.append(child.stdout.read()))]
    for reader in readers:
        reader.start()
    while child.poll() is None:
        sample = sample_memory(child.pid)
        if sample:
            anon, total = peaks.get(stage[0], (0, 0))
            peaks[stage[0]] = (max(anon, sample[0]), max(total, sample[1]))
        time.sleep(0.05)
    for reader in readers:
        reader.join()
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{''.join(tail)}")
    return {"wall_seconds": time.perf_counter() - start, "result": json.loads(output[0]), "peaks": peaks}


def measure(blocks: int | None, work: Path, keep: bool, diffusers: bool = False) -> dict[str, object]:
    """One streamed quantize: of ``blocks`` FLUX blocks, or (None) of the SDXL-shaped UNet; with ``diffusers``,
    quantized with Nunchaku's activation rule and then exported for diffusers in a second process."""
    from svdq_cli.models.shaped import write_flux_shaped, write_sdxl_shaped

    if blocks is None:
        label = "sdxl-unet"
        model, run = work / "sdxl-shaped", work / "run-sdxl"
        write = functools.partial(write_sdxl_shaped, model)
    else:
        double, single = SPLITS.get(blocks, (round(blocks / 3), blocks - round(blocks / 3)))
        label = f"{double}+{single}"
        model, run = work / f"flux-shaped-{label}", work / f"run-{label}"
        write = functools.partial(write_flux_shaped, model, double=double, single=single)
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    checkpoint = write()
    write_seconds = time.perf_counter() - start
    command = [sys.executable, "-m", "svdq_cli", "quantize", str(model), "--out", str(run), "--stream",
               *SMALLEST_PROTOCOL, *(["--act-range", "nunchaku"] if diffusers else []), "--json"]
    measured = run_measured(command, {**os.environ})
    stages = measured["result"]["stages"]
    layers = stages["quantize"].get("layers", 0)
    weight_side = sum(stages[name]["seconds"] for name in ("smooth", "svd", "quantize"))
    peaks = measured["peaks"]
    row = {"model": label, "checkpoint_bytes": checkpoint,
           "write_seconds": write_seconds, "wall_seconds": measured["wall_seconds"],
           "stage_seconds": {name: stages[name]["seconds"] for name in stages},
           "layers": layers, "weight_side_seconds_per_layer": weight_side / max(layers, 1),
           "export_bytes": stages["export"]["bytes"],
           "peak_anon_mib": max(anon for anon, _ in peaks.values()),
           "peak_total_mib": max(total for _, total in peaks.values()),
           "stage_peaks_mib": {name: {"anon": anon, "total": total} for name, (anon, total) in peaks.items()},
           "peak_anon_over_checkpoint": max(anon for anon, _ in peaks.values()) * 2**20 / checkpoint,
           "psnr": measured["result"]["validate"]["psnr"]}
    if diffusers:
        lite = run_measured([sys.executable, "-m", "svdq_cli", "export", str(run), "--format", "diffusers",
                             "--force", "--json"], {**os.environ})
        written = lite["result"]["diffusers"]
        denoiser = run / "export" / "diffusers" / written["component"]
        lite_bytes = sum(path.stat().st_size for path in denoiser.iterdir())
        row["diffusers"] = {"wall_seconds": lite["wall_seconds"], "denoiser_bytes": lite_bytes,
                            "over_svdq_export": lite_bytes / row["export_bytes"],
                            "peak_anon_mib": max(anon for anon, _ in lite["peaks"].values()),
                            "peak_total_mib": max(total for _, total in lite["peaks"].values()),
                            "w4a4_layers": written["w4a4_layers"], "w4a16_layers": written["w4a16_layers"],
                            "dense_layers": len(written["dense_layers"]), "rank": written["rank"]}
    if not keep:
        shutil.rmtree(model)
        shutil.rmtree(run)
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    table = Table(title="streamed svdq quantize on real-size checkpoints (one prompt, one step, 256 px)")
    columns = ("model", "ckpt GiB", "export GiB", "peak anon MiB", "peak / ckpt", "peak total MiB", "heaviest stage",
               "weight side s/layer", "wall s")
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        heaviest = max(r["stage_peaks_mib"], key=lambda name: r["stage_peaks_mib"][name]["anon"])
        table.add_row(r["model"], f"{r['checkpoint_bytes'] / 2**30:.2f}", f"{r['export_bytes'] / 2**30:.2f}",
                      str(r["peak_anon_mib"]), f"{r['peak_anon_over_checkpoint']:.2f}", str(r["peak_total_mib"]),
                      heaviest, f"{r['weight_side_seconds_per_layer']:.2f}", f"{r['wall_seconds']:.0f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    stages = Table(title="seconds per stage")
    stages.add_column("model", justify="right")
    for name in STAGES[1:]:
        stages.add_column(name, justify="right")
    for r in rows:
        stages.add_row(r["model"], *(f"{r['stage_seconds'].get(n, 0):.0f}" for n in STAGES[1:]))
    Console(width=None if sys.stdout.isatty() else 140).print(stages)
    lite = [r for r in rows if "diffusers" in r]
    if lite:
        table = Table(title="svdq export --format diffusers (a second process, after the quantize)")
        for column in ("model", "denoiser GiB", "÷ svdq export", "peak anon MiB", "peak total MiB", "wall s",
                       "W4A4 / W4A16 / 16-bit layers"):
            table.add_column(column, justify="right")
        for r in lite:
            d = r["diffusers"]
            table.add_row(r["model"], f"{d['denoiser_bytes'] / 2**30:.2f}", f"{d['over_svdq_export']:.4f}",
                          str(d["peak_anon_mib"]), str(d["peak_total_mib"]), f"{d['wall_seconds']:.0f}",
                          f"{d['w4a4_layers']} / {d['w4a16_layers']} / {d['dense_layers']}")
        Console(width=None if sys.stdout.isatty() else 140).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16], help="FLUX.1-dev-shaped block counts")
    parser.add_argument("--sdxl", action="store_true", help="measure the SDXL-shaped UNet instead")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"), help="where checkpoints and runs go")
    parser.add_argument("--keep", action="store_true", help="keep each checkpoint and run (else removed)")
    parser.add_argument("--diffusers", action="store_true", help="also measure `svdq export --format diffusers`")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for blocks in [None] if args.sdxl else args.blocks:
        rows.append(measure(blocks, args.work, args.keep, args.diffusers))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a long run's partial results survive
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
