"""``svdq export RUN``: the single-file export, and the engines' formats written beside it."""

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

FORMATS = ("svdq", "nunchaku", "diffusers")


def export(
    run_dir: RunDirArg,
    format: Annotated[str, typer.Option(help="svdq (our single file); nunchaku (Nunchaku's Flux checkpoint, under "
                                             "export/nunchaku/); diffusers (a pipeline directory diffusers opens "
                                             "with its Nunchaku Lite quantizer, any family, under "
                                             "export/diffusers/).")] = "svdq",
    per_layer_rank: Annotated[bool, typer.Option(metavar="", help="nunchaku: keep each layer's rank (fused qkv: "
                                                                  "3r) instead of padding all to the largest; "
                                                                  "smaller, but only NunchakuFluxTransformer2dModel "
                                                                  "loads it.")] = False,
    pipeline: Annotated[bool, typer.Option(help="diffusers: the whole pipeline (the base's other components "
                                                "hard-linked beside the denoiser), or the denoiser's folder "
                                                "alone.")] = True,
    base: Annotated[str | None, typer.Option(help="diffusers: the base pipeline's directory or Hub id, if not "
                                                  "the one the run recorded (moved, or quantized elsewhere).")
                    ] = None,
    force: Annotated[bool, typer.Option(metavar="", help="diffusers: export even if validation failed.")] = False,
    stream: StreamOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the single-file export of a run (after validating it, if not done yet)."""
    if format not in FORMATS:
        raise BadInputError(f"--format {format!r} is unknown (available: {', '.join(FORMATS)})")
    if format == "svdq":
        rerun(run_dir, "export", {"stream": stream}, as_json, gate_exit=False)
        return
    from ..formats.nunchaku import export as nunchaku
    from ..formats.nunchaku import lite_export
    from ..run.directory import Run

    stored = Run.existing(run_dir).manifest.get("config")
    if stored is not None:
        (nunchaku if format == "nunchaku" else lite_export).check_run(stored)
    summary = rerun(run_dir, "export", {"stream": stream}, as_json, show=False)
    with Run(run_dir) as run:
        if format == "nunchaku":
            written = nunchaku.export_run(run, uniform_rank=not per_layer_rank)
            extra = {"nunchaku": {**written, "file": str(run_dir / written["file"])}}
        else:
            written = lite_export.export_run(run, pipeline=pipeline, force=force, base=base)
            extra = {"diffusers": {**written, "directory": str(run_dir / written["directory"])}}
    print_summary(run_dir, summary, as_json, extra, gate_exit=False)
