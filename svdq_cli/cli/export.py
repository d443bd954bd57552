"""``svdq export RUN``: the single-file export, or Nunchaku's Flux checkpoint beside it."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import BadInputError
from .common import (
    JsonOpt,
    RunDirArg,
    StreamOpt,
    print_summary,
    rerun,
)


def export(
    run_dir: RunDirArg,
    format: Annotated[str, typer.Option(help="svdq (our single file) or nunchaku (Nunchaku's Flux checkpoint, "
                                             "written next to it under export/nunchaku/).")] = "svdq",
    per_layer_rank: Annotated[bool, typer.Option(metavar="", help="nunchaku: keep each layer's rank (fused qkv: "
                                                                  "3r) instead of padding all to the largest; "
                                                                  "smaller, but only NunchakuFluxTransformer2dModel "
                                                                  "loads it.")] = False,
    stream: StreamOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the single-file export of a run (after validating it, if not done yet)."""
    if format not in ("svdq", "nunchaku"):
        raise BadInputError(f"--format {format!r} is unknown (available: svdq, nunchaku)")
    if format == "svdq":
        rerun(run_dir, "export", {"stream": stream}, as_json, gate_exit=False)
        return
    from ..formats.nunchaku import export as nunchaku
    from ..run.directory import Run

    stored = Run.existing(run_dir).manifest.get("config")
    if stored is not None:
        nunchaku.check_run(stored)
    summary = rerun(run_dir, "export", {"stream": stream}, as_json, show=False)
    with Run(run_dir) as run:
        written = nunchaku.export_run(run, uniform_rank=not per_layer_rank)
    print_summary(run_dir, summary, as_json, {"nunchaku": {**written, "file": str(run_dir / written["file"])}},
             gate_exit=False)
