"""One process against N torchrun ranks (gloo on this CPU), side by side in one run, on the same model:

- wall time of collect, of the weight side (smooth + svd + quantize) and of validate, from each run's stage
  timings, and of the whole command (process start, model build and process-group set-up included);
- the bytes the ranks exchanged during collect (pickled statistics, summed over ranks): the per-prompt sums
  (Gram blocks, row sums) every round, and the row samples once per rank;
- whether the artifacts of both runs (validation report and export included) are the same bytes (they must
  be).

On a 2-core machine two ranks share the cores, so expect little gain; the figures say how much.

    python benchmarks/distributed.py                      # tiny-flux-deep, 1 vs 2 ranks
    python benchmarks/distributed.py --model tiny-flux --ranks 2 --num-prompts 16 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

WEIGHT_SIDE = ("smooth", "svd", "quantize")


def quantize(model: str, ranks: int, out: Path, num_prompts: int | None) -> dict:
    """Run ``svdq quantize MODEL`` on ``ranks`` processes; its stage timings, bytes exchanged and wall time."""
    command = ["-m", "svdq_cli", "quantize", model, "--out", str(out), "--json"]
    if num_prompts:
        command += ["--num-prompts", str(num_prompts)]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *command]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)["stages"]
    collect = summary["collect"]
    return {
        "ranks": ranks, "wall_s": round(wall, 2), "collect_s": collect["seconds"],
        "weight_side_s": round(sum(summary[name]["seconds"] for name in WEIGHT_SIDE), 3),
        "validate_s": summary["validate"]["seconds"],
        "prompts": collect["prompts"], "exchanged_bytes": collect.get("exchanged_bytes", 0),
        "exchanged_sample_bytes": collect.get("exchanged_sample_bytes", 0),
    }


def same_artifacts(first: Path, second: Path) -> bool:
    names = sorted(path.relative_to(first) for stage in ("collect", *WEIGHT_SIDE, "validate", "export")
                   for path in (first / stage).glob("*.*"))
    return bool(names) and all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux-deep")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="svdq-distributed-") as scratch:
        one = quantize(options.model, 1, Path(scratch) / "one", options.num_prompts)
        many = quantize(options.model, options.ranks, Path(scratch) / "many", options.num_prompts)
        identical = same_artifacts(Path(scratch) / "one", Path(scratch) / "many")
    sums = many["exchanged_bytes"] - many["exchanged_sample_bytes"]
    result = {"model": options.model, "runs": [one, many], "identical_artifacts": identical,
              "sum_bytes_per_prompt": round(sums / many["prompts"]),
              "sample_bytes_per_rank": round(many["exchanged_sample_bytes"] / options.ranks)}
    if options.json:
        print(json.dumps(result, indent=2))
        return 0 if identical else 1
    table = Table(title=f"{options.model}: 1 process vs {options.ranks} ranks (gloo, this CPU)")
    for column in ("ranks", "collect s", "weight side s", "validate s", "whole command s", "exchanged MB"):
        table.add_column(column, justify="right")
    for run in (one, many):
        table.add_row(str(run["ranks"]), f"{run['collect_s']:.2f}", f"{run['weight_side_s']:.2f}",
                      f"{run['validate_s']:.2f}", f"{run['wall_s']:.1f}", f"{run['exchanged_bytes'] / 1e6:.1f}")
    console = Console()
    console.print(table)
    console.print(f"exchanged: {result['sum_bytes_per_prompt'] / 1e6:.2f} MB of sums per prompt, "
                  f"{result['sample_bytes_per_rank'] / 1e6:.2f} MB of row samples per rank; artifacts "
                  f"{'identical' if identical else 'DIFFER'} between the runs")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
