"""Peak RSS and wall time of `svdq quantize` on the tiny models, as the calibration grows.

Collect keeps a running min/max and a bounded row sample per input group, never all activations, so peak
memory should stay flat as prompts × steps grow, and grow with the model (block count), not the data.
Each run is a fresh process measured on its own (os.wait4), in a fresh run directory.

    python benchmarks/pipeline_memory.py            # tiny-flux and tiny-flux-deep, 4…64 prompts
    python benchmarks/pipeline_memory.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

CASES = (("tiny-flux", 4), ("tiny-flux", 16), ("tiny-flux", 64), ("tiny-flux-deep", 4), ("tiny-flux-deep", 16),
         ("tiny-flux-deep", 64))


def measure(model: str, prompts: int, steps: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "svdq_cli", "quantize", model, "--out", run_dir,
                   "--num-prompts", str(prompts), "--steps", str(steps), "--json"]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
        stages = json.loads(output)["stages"]
    return {"model": model, "prompts": prompts, "steps": steps, "prompt_steps": prompts * steps,
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_seconds": seconds,
            "collect_seconds": stages["collect"]["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [measure(model, prompts, args.steps) for model, prompts in CASES]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title="svdq quantize: peak RSS and wall time (fresh process per row)")
    for column in ("model", "prompts × steps", "peak RSS MiB", "wall s", "collect s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        table.add_row(r["model"], f"{r['prompts']} × {r['steps']}", f"{r['peak_rss_mib']:.0f}",
                      f"{r['wall_seconds']:.1f}", f"{r['collect_seconds']:.1f}")
    Console(width=None if sys.stdout.isatty() else 100).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
