"""``svdq validate RUN``: (re)validate a run, with the gates and validation settings given."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
    BaselinesOpt,
    JsonOpt,
    RunDirArg,
    RuntimeOpt,
    StreamOpt,
    ValPromptsFromOpt,
    ValPromptsOpt,
    ValResolutionOpt,
    ValStepsOpt,
    rerun,
    validation_overrides,
)


def validate(
    run_dir: RunDirArg,
    val_prompts: ValPromptsOpt = None,
    val_prompts_from: ValPromptsFromOpt = None,
    val_steps: ValStepsOpt = None,
    val_resolution: ValResolutionOpt = None,
    baselines: BaselinesOpt = None,
    runtime: RuntimeOpt = None,
    min_psnr: Annotated[float | None, typer.Option(help="Gate: minimum mean PSNR in dB (exit 3 below).")] = None,
    min_ssim: Annotated[float | None, typer.Option(help="Gate: minimum mean SSIM.")] = None,
    max_latent_error: Annotated[float | None, typer.Option(help="Gate: maximum latent relative error.")] = None,
    stream: StreamOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """(Re)validate a run: 16-bit vs quantized images on held-out prompts, report and PNGs."""
    rerun(run_dir, "validate", {**validation_overrides(val_prompts, val_steps, val_resolution, baselines, runtime,
                                                       val_prompts_from),
                                 "validation.min_psnr": min_psnr, "validation.min_ssim": min_ssim,
                                 "validation.max_latent_error": max_latent_error, "stream": stream}, as_json)
