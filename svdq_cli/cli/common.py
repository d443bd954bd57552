"""What the commands share: typer classes, options defined once, the console, and the run summary they print."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import BadInputError, QualityGateError


class HelpWithoutType:
    """Flags show no ``<bool>`` type in help, the generated -h/--help included."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Group(HelpWithoutType, typer.core.TyperGroup):
    pass


class Command(HelpWithoutType, typer.core.TyperCommand):
    pass


out = Console(width=None if sys.stdout.isatty() else 140)  # CI logs: wide tables, not wrapped


JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON document on stdout instead of "
                                                                   "tables.")]


RunDirArg = Annotated[Path, typer.Argument(help="A run directory made by `svdq quantize`.")]


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read at import: before diffusers imports it
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # svdq draws its own progress; loading bars are noise in CI logs
    transformers_logging.disable_progress_bar()


def run_dir_for(config, out_dir: Path | None) -> Path:
    """The run directory: ``--out``, or ``runs/RECIPE``.

    Raises:
        BadInputError: a run directory that is the local model's directory or inside it (the run's files
            would mix with the model's, and a later download or cleanup of the model would take them).
    """
    path = out_dir or Path("runs") / config.recipe.replace(":", "-")
    model = Path(config.model)
    if model.is_dir() and path.resolve().is_relative_to(model.resolve()):
        raise BadInputError(f"--out {path} is inside the model directory {model}; write the run elsewhere "
                            f"(e.g. --out runs/{model.resolve().name})")
    return path


def print_summary(run_path: Path, summary: dict, as_json: bool, extra: dict | None = None,
                  gate_exit: bool = True) -> None:
    """Print what a run did (tables, or one JSON document). A failed validation gate exits 3 when
    ``gate_exit`` (quantize, validate); elsewhere (export) it is a warning naming the gate."""
    from ..run.directory import Run
    from ..run.gates import failed_gates
    from ..system.progress import warn

    manifest = Run.existing(run_path).manifest
    result = {"run": str(run_path), "stages": summary, **(extra or {})}
    export = manifest["stages"].get("export", {})
    if export.get("status") == "done":
        result["export"] = str(run_path / export["file"])
    validate = manifest["stages"].get("validate", {})
    if validate.get("status") == "done":
        result["validate"] = {k: validate[k] for k in ("passed", "psnr", "ssim", "latent_error")}
        report = json.loads((run_path / "validate" / "report.json").read_text())
        result["validate"]["failed_gates"] = failed_gates(report)
        result["validate"]["methods"] = {
            method: {k: values[k] for k in ("psnr", "ssim", "latent_error")}
            for method, values in report["methods"].items()
        }
        result["validate"]["runtime"] = report["runtime"]
        if report.get("kernels_vs_reference_path"):
            result["validate"]["kernels_vs_reference_path"] = report["kernels_vs_reference_path"]
        result["report"] = str(run_path / "validate" / "report.md")
        result["comparison"] = str(run_path / "validate" / "comparison.png")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        if all(s["status"] == "up to date" for s in summary.values()):
            out.print("nothing to do: every stage is up to date")
        table = Table(title=f"run {run_path}")
        for column in ("stage", "status", "seconds"):
            table.add_column(column)
        for name, stage in summary.items():
            table.add_row(name, stage["status"], f"{stage['seconds']:.1f}")
        out.print(table)
        if "validate" in result:
            v = result["validate"]
            methods = Table(title="quantized vs 16-bit on held-out prompts (same seeds)")
            for column in ("method", "PSNR dB ↑", "SSIM ↑", "latent rel. error ↓"):
                methods.add_column(column, justify="left" if column == "method" else "right")
            for method, values in v["methods"].items():
                methods.add_row(method, f"{values['psnr']:.2f}", f"{values['ssim']:.4f}",
                                f"{values['latent_error']:.4f}")
            out.print(methods)
            out.print(f"runtime: {v['runtime']}")
            if "kernels_vs_reference_path" in v:
                check = v["kernels_vs_reference_path"]
                out.print(f"kernels vs reference path: worst layer {check['worst_layer_snr_db']:.1f} dB SNR on the "
                          f"same inputs; end to end PSNR {check['psnr']:.2f} dB, latent relative error "
                          f"{check['latent_error']:.2e}")
            out.print(f"gates: {'passed' if v['passed'] else 'FAILED: ' + v['failed_gates']}")
            out.print(f"report: {result['report']}\ncomparison: {result['comparison']}")
        if "export" in result:
            out.print(f"export: {result['export']}")
        if "nunchaku" in result:
            n = result["nunchaku"]
            out.print(f"nunchaku: {n['file']} ({n['bytes'] / 2**20:.1f} MiB; {n['w4a4_layers']} W4A4 layers at "
                      f"rank {n['rank'] if n['uniform_rank'] else 'per layer'}; {n['w4a16_layers']} AdaLN layers "
                      f"re-quantized to W4A16, relative weight error max {n['adanorm_relative_error_max']:.4f})")
        if "diffusers" in result:
            d = result["diffusers"]
            requantized = (f", re-quantized with relative weight error max {d['w4a16_relative_error_max']:.4f}"
                           if d["w4a16_relative_error_max"] else ", exact")
            out.print(f"diffusers: {d['directory']} ({'pipeline' if d['pipeline'] else d['component'] + ' only'}, "
                      f"{d['bytes'] / 2**20:.1f} MiB; {d['w4a4_layers']} W4A4 layers at rank {d['rank']}; "
                      f"{d['w4a16_layers']} W4A16{requantized}; {len(d['dense_layers'])} left 16-bit; activations "
                      f"{d['act_range']})")
    if "validate" in result and not result["validate"]["passed"]:
        message = f"validation gate failed ({result['validate']['failed_gates']}); see {result['report']}"
        if gate_exit:
            raise QualityGateError(message)
        warn(message)


PromptsOpt = Annotated[str | None, typer.Option(help="Calibration prompts: builtin:calibration, a text/JSON/CSV file "
                                                   "(JSON/CSV may give each prompt an image) or "
                                                   "hf:org/name[:split[:column]].")]


ValPromptsOpt = Annotated[int | None, typer.Option("--val-prompts", help="Held-out prompts validation generates "
                                                                        "(default: the recipe's).")]


ValPromptsFromOpt = Annotated[str | None, typer.Option("--val-prompts-from", help="Validation prompt set, as "
                                                                               "--prompts takes them (default: the "
                                                                               "recipe's, builtin:validation).")]


ValStepsOpt = Annotated[int | None, typer.Option("--val-steps", help="Denoising steps per validation image "
                                                                    "(default: the recipe's, else the model's).")]


ValResolutionOpt = Annotated[str | None, typer.Option("--val-resolution", help="Validation image size: pixels "
                                                                              "(1024) or WxH (832x480) (default: "
                                                                              "the recipe's).")]


BaselinesOpt = Annotated[str | None, typer.Option(help="Baselines also scored, comma-separated: rtn (naive W4A4), "
                                                       "w4a16 (INT4 weights), smoothquant, nf4 (bitsandbytes' NF4 "
                                                       "weights); a VQ run: rtn, kmeans.")]


StreamOpt = Annotated[bool | None, typer.Option("--stream/--no-stream", metavar="",
                                                help="Read the denoiser (transformer or UNet) block by block "
                                                     "from its checkpoint, so memory holds one block (default: "
                                                     "when the checkpoint is over half the available memory).")]


RuntimeOpt = Annotated[str | None, typer.Option(help="How validation runs the quantized layers: auto (fused CUDA "
                                                     "kernels on a GPU, else the reference path) or emulated (the "
                                                     "kernels on the CPU emulator, compared with the reference).")]


BaseOpt = Annotated[str | None, typer.Option("--base", help="The model a single-file fine-tune (MODEL.safetensors) "
                                                         "fine-tunes: a recipe, diffusers directory or Hub id; "
                                                         "it gives every part but the denoiser's weights.")]


SkipOpt = Annotated[list[str] | None, typer.Option("--skip", help="Keep these linears 16-bit: a glob over full "
                                                                "names, repeatable (transformer_blocks.0.*).")]


WeightOnlyLayersOpt = Annotated[list[str] | None, typer.Option(
    "--weight-only-layers", help="Quantize these linears' weights only (16-bit activations): a glob, repeatable.")]


def target_overrides(skip, weight_only) -> dict[str, object]:
    return {"targets.skip": skip or None, "targets.weight_only": weight_only or None}


def validation_overrides(prompts, steps, resolution, baselines, runtime, source=None) -> dict[str, object]:
    listed = [b.strip() for b in baselines.split(",") if b.strip()] if baselines is not None else None
    return {"validation.num_prompts": prompts, "validation.steps": steps, "validation.resolution": resolution,
            "validation.baselines": listed, "validation.runtime": runtime, "validation.prompts": source}


def stored_config(run_dir: Path, overrides: dict[str, object]):
    """The run's resolved config with ``overrides`` ("section.field" → value; None leaves a field alone)."""
    from ..run.directory import Run
    from ..run.recipe import RunConfig, build_config

    stored = Run.existing(run_dir).manifest.get("config")
    if stored is None:
        raise BadInputError(f"{run_dir} has no resolved config in its manifest")
    for key, value in overrides.items():
        if value is not None:
            section, _, leaf = key.rpartition(".")
            (stored[section] if section else stored)[leaf] = value
    return build_config(RunConfig, stored, "")


def rerun(run_dir: Path, until: str, overrides: dict[str, object], as_json: bool, show: bool = True,
           gate_exit: bool = True) -> dict:
    from ..run.directory import Run
    from ..stages.runner import check_config, run_stages

    config = stored_config(run_dir, overrides)
    check_config(config, until)
    quiet_libraries()
    with Run(run_dir) as run:
        summary = run_stages(run, config, until=until)
    if show:
        print_summary(run_dir, summary, as_json, gate_exit=gate_exit)
    return summary
