"""Peak RSS and wall time of `svdq eval`'s scoring as the number of samples grows, at a real resolution.

Scoring reads the PNGs back a batch at a time, so peak memory should stay flat as the samples grow. Each case
writes N pairs of 16-bit / quantized PNGs (smooth random images plus noise, so they compress like pictures)
and scores them in a fresh process (os.wait4 gives its peak RSS) with PSNR, SSIM and FID on a stand-in
feature network (a linear map of pooled pixels: the real Inception needs a download this machine cannot make).

    python benchmarks/eval_scoring.py                  # 1024 px, 16 / 64 / 256 samples
    python benchmarks/eval_scoring.py --size 512 --samples 16 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CHILD = r"""
import sys, time, torch
from pathlib import Path
from svdq_cli.evaluation import metrics
from svdq_cli.evaluation.images import ImageStore

directory, count = Path(sys.argv[1]), int(sys.argv[2])

class Pooled(torch.nn.Module):  # FID features: a fixed linear map of 4x4-pooled pixels
    num_features = 64
    def __init__(self):
        super().__init__()
        self.register_buffer("matrix", torch.randn(64, 48, generator=torch.Generator().manual_seed(0)))
    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.double(), 4).flatten(1) @ self.matrix.double().T

metrics.inception = lambda: Pooled()
store = ImageStore(directory, {})
suite = metrics.load(["fid", "psnr", "ssim"], True, "cpu", "unused", print)
suite.set_real(torch.stack([store.read("16-bit", f"{i:05d}") for i in part]) for part in
               [range(s, min(s + metrics.BATCH, count)) for s in range(0, count, metrics.BATCH)])
def batches():
    for start in range(0, count, metrics.BATCH):
        part = range(start, min(start + metrics.BATCH, count))
        yield (torch.stack([store.read("quantized", f"{i:05d}") for i in part]), ["p"] * len(part),
               torch.stack([store.read("16-bit", f"{i:05d}") for i in part]))
start = time.perf_counter()
values = suite.scores(batches())
print(f"{time.perf_counter() - start:.3f} {values['psnr']:.3f} {values['ssim']:.5f} {values['fid']:.6f}")
"""


def write_images(directory: Path, count: int, size: int) -> None:
    import torch

    from svdq_cli.evaluation.images import ImageStore

    store = ImageStore(directory, {})
    generator = torch.Generator().manual_seed(count)
    for index in range(count):
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=size,
                                                 mode="bicubic", align_corners=False)[0].clamp(0, 1)
        store.put("16-bit", f"{index:05d}", smooth)
        store.put("quantized", f"{index:05d}", smooth + 0.02 * torch.randn(smooth.shape, generator=generator))


def measure(count: int, size: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as directory:
        write_images(Path(directory), count, size)
        child = subprocess.Popen([sys.executable, "-c", CHILD, directory, str(count)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        start = time.perf_counter()
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"scoring {count} samples failed")
        seconds, psnr, ssim, fid = (float(x) for x in output.split()[-4:])
        return {"samples": count, "size": size, "scoring_seconds": seconds,
                "process_seconds": round(time.perf_counter() - start, 2),
                "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "psnr": psnr, "ssim": ssim, "fid": fid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(count, args.size) for count in args.samples]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"svdq eval scoring at {args.size} px (PSNR, SSIM, FID on a stand-in network; CPU)")
    for column in ("samples", "scoring s", "peak RSS MiB", "PSNR dB", "SSIM", "FID"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["samples"]), f"{row['scoring_seconds']:.1f}", f"{row['peak_rss_mib']:.0f}",
                      f"{row['psnr']:.2f}", f"{row['ssim']:.4f}", f"{row['fid']:.5f}")
    Console().print(table)


if __name__ == "__main__":
    main()
