"""``svdq status RUN``: each stage's status, config hash and verified artifacts."""

from __future__ import annotations

import json

from rich.table import Table

from .common import (
    JsonOpt,
    RunDirArg,
    out,
)


def status(run_dir: RunDirArg, as_json: JsonOpt = False) -> None:
    """Show each stage of a run: status, config hash, artifacts verified, seconds; earlier exports kept."""
    from ..run.directory import Run
    from ..stages.base import ORDER

    run = Run.existing(run_dir)
    interrupted = not run.in_use()  # "running" with nobody holding the lock: the process died or was stopped
    rows = []
    evaluated = ("eval",) if "eval" in run.manifest["stages"] else ()  # `svdq eval`'s report, once it has one
    for name in (*ORDER, *evaluated):
        record = run.manifest["stages"].get(name, {})
        artifacts = record.get("artifacts", {})
        state = record.get("status", "pending")
        if state == "running" and interrupted:
            state = "interrupted"
        if state == "done" and record.get("applies") is False:
            state = "not applicable"
        rows.append({"stage": name, "status": state, "hash": record.get("hash"), "artifacts": len(artifacts),
                     "broken": run.broken_artifacts(name) if artifacts else [], "seconds": record.get("seconds")})
    previous = sorted(run.manifest["stages"].get("export", {}).get("previous", {}))
    if as_json:
        print(json.dumps({"run": str(run_dir), "stages": rows, "previous_exports": previous}, indent=2))
        return
    table = Table(title=f"run {run_dir}")
    for column in ("stage", "status", "hash", "artifacts", "seconds"):
        table.add_column(column)
    for row in rows:
        artifacts = f"{row['artifacts']}" + (f" ({len(row['broken'])} BROKEN)" if row["broken"] else " ok")
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
        table.add_row(row["stage"], row["status"], row["hash"] or "", artifacts, seconds)
    out.print(table)
    if any(row["status"] == "interrupted" for row in rows):
        out.print("interrupted: re-run the same `svdq quantize` command to resume")
    for relative in previous:
        out.print(f"earlier export kept: {run_dir / relative}")
