"""The ``svdq`` command line (DESIGN.md §5). It only parses, builds a RunConfig, calls stages and renders.

Exit codes: 0 success; 1 runtime failure; 2 bad usage or bad input; 3 a quality gate failed. Errors are one
line on stderr; ``--debug`` shows the traceback. Results go to stdout (``--json``: exactly one document).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import BadInputError, QualityGateError, SvdqError


class _HelpWithoutType:
    """Flags show no ``<bool>`` type in help, the generated -h/--help included."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Group(_HelpWithoutType, typer.core.TyperGroup):
    pass


class _Command(_HelpWithoutType, typer.core.TyperCommand):
    pass


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="SVDQuant 4-bit quantization for diffusion transformers.")
out = Console(width=None if sys.stdout.isatty() else 140)  # CI logs: wide tables, not wrapped

JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON document on stdout instead of "
                                                                   "tables.")]
RunDirArg = Annotated[Path, typer.Argument(help="A run directory made by `svdq quantize`.")]
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"svdq {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show tracebacks of errors (accepted anywhere "
                                                                    "on the command line).")] = False,
) -> None:
    _state["debug"] = _state["debug"] or debug


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read at import: before diffusers imports it
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # svdq draws its own progress; loading bars are noise in CI logs
    transformers_logging.disable_progress_bar()


def resolve_model(model: str, recipe: str | None, overrides: dict[str, object]):
    """RunConfig for MODEL: a recipe name, a tiny model, a local diffusers directory or a Hub repo id."""
    from .models.loading import ModelFetchError, family_of_directory
    from .recipe import load_recipe, recipe_names, recipe_path

    if recipe is not None:
        return load_recipe(recipe, {"model": model, **overrides})
    if recipe_path(model) is not None:
        return load_recipe(model, overrides)
    if Path(model).is_dir():
        family = family_of_directory(Path(model))
        return load_recipe(family, {"model": model, "recipe": f"{family}:{Path(model).name}", **overrides})
    for name in recipe_names():
        candidate = load_recipe(name)
        if candidate.model == model:
            return load_recipe(name, overrides)
    if "/" not in model:
        raise BadInputError(f"unknown model {model!r}: not a recipe ({', '.join(recipe_names())}), "
                            "a local diffusers directory or a Hub repo id")
    try:
        from huggingface_hub import hf_hub_download

        from .online import hub_reachable

        index = hf_hub_download(model, "model_index.json", local_files_only=not hub_reachable())
        family = family_of_directory(Path(index).parent)
    except BadInputError:
        raise
    except Exception as error:  # offline, gated or missing repo: huggingface_hub has many error types
        raise ModelFetchError(f"could not fetch {model} from the Hugging Face Hub ({type(error).__name__}); "
                              f"download it with `hf download {model} --local-dir DIR` and pass DIR") from None
    return load_recipe(family, {"model": model, **overrides})


def _run_dir(config, out_dir: Path | None) -> Path:
    return out_dir or Path("runs") / config.recipe.replace(":", "-")


def _summary(run_path: Path, summary: dict, as_json: bool, extra: dict | None = None, gate_exit: bool = True) -> None:
    """Print what a run did (tables, or one JSON document). A failed validation gate exits 3 when
    ``gate_exit`` (quantize, validate); elsewhere (export) it is a warning naming the gate."""
    from .progress import warn
    from .run import Run
    from .stages.validate import failed_gates

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
    if "validate" in result and not result["validate"]["passed"]:
        message = f"validation gate failed ({result['validate']['failed_gates']}); see {result['report']}"
        if gate_exit:
            raise QualityGateError(message)
        warn(message)


ValPromptsOpt = Annotated[int | None, typer.Option("--val-prompts", help="Held-out prompts validation generates "
                                                                        "(default: the recipe's).")]
ValStepsOpt = Annotated[int | None, typer.Option("--val-steps", help="Denoising steps per validation image "
                                                                    "(default: the recipe's, else the model's).")]
ValResolutionOpt = Annotated[int | None, typer.Option("--val-resolution", help="Validation image size in pixels "
                                                                              "(default: the recipe's).")]
BaselinesOpt = Annotated[str | None, typer.Option(help="Baselines validation also scores, comma-separated: rtn, "
                                                       "w4a16, smoothquant.")]
StreamOpt = Annotated[bool | None, typer.Option("--stream/--no-stream", metavar="",
                                                help="Read the transformer block by block from its checkpoint, "
                                                     "so memory holds one block (default: when the checkpoint is "
                                                     "over half the available memory).")]
RuntimeOpt = Annotated[str | None, typer.Option(help="How validation runs the quantized layers: auto (fused CUDA "
                                                     "kernels on a GPU, else the reference path) or emulated (the "
                                                     "kernels on the CPU emulator, compared with the reference).")]


def _validation_overrides(prompts, steps, resolution, baselines, runtime) -> dict[str, object]:
    listed = [b.strip() for b in baselines.split(",") if b.strip()] if baselines is not None else None
    return {"validation.num_prompts": prompts, "validation.steps": steps, "validation.resolution": resolution,
            "validation.baselines": listed, "validation.runtime": runtime}


@app.command(cls=_Command)
def quantize(
    model: Annotated[str, typer.Argument(help="Recipe name (flux-dev), tiny model (tiny-flux), local diffusers "
                                              "directory or Hub repo id.")],
    recipe: Annotated[str | None, typer.Option(help="Recipe name or YAML file; default: MODEL's own.")] = None,
    rank: Annotated[int | None, typer.Option(help="Low-rank branch rank, a multiple of 16 (default: the "
                                                  "recipe's; `svdq recipes MODEL` shows it).")] = None,
    precision: Annotated[str | None, typer.Option(help="int4, nvfp4 or int8 (default: the recipe's).")] = None,
    method: Annotated[str | None, typer.Option(help="svdquant, smoothquant, rtn, vq4dit (2-/3-bit vector "
                                                    "quantization) or kmeans (its baseline) (default: the "
                                                    "recipe's).")] = None,
    bits: Annotated[int | None, typer.Option(help="Bits per weight of vq4dit/kmeans: 2 or 3 (default 2).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/RECIPE).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Calibration prompts: builtin:calibration, a text/JSON/CSV "
                                                     "file or hf:org/name[:split[:column]].")] = None,
    num_prompts: Annotated[int | None, typer.Option(help="Calibration prompts used (default: the recipe's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per calibration prompt (default: the "
                                                   "recipe's, else the model's).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Calibration image size in pixels (default: the "
                                                        "recipe's).")] = None,
    val_prompts: ValPromptsOpt = None,
    val_steps: ValStepsOpt = None,
    val_resolution: ValResolutionOpt = None,
    baselines: BaselinesOpt = None,
    runtime: RuntimeOpt = None,
    device: Annotated[str | None, typer.Option(help="auto (a CUDA device when there is one, else the CPU), cpu, "
                                                    "cuda or cuda:N (default: the recipe's, auto).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the recipe's).")] = None,
    offload: Annotated[bool | None, typer.Option("--offload/--no-offload", metavar="",
                                                 help="diffusers model CPU offload (fits FLUX in 24 GB of "
                                                      "GPU memory).")] = None,
    stream: StreamOpt = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    redo: Annotated[str | None, typer.Option(help="Recompute this stage and every later one.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every stage (collect, smooth, svd, quantize, validate, export), resuming what is done. Under torchrun,
    the ranks share collect and the per-block stages (see the README)."""
    from .distributed import joined
    from .progress import set_rank_label
    from .run import opened
    from .stages import check_config, run_stages

    overrides = {"quant.rank": rank, "quant.precision": precision, "quant.method": method, "quant.bits": bits,
                 "calibration.prompts": prompts,
                 "calibration.num_prompts": num_prompts, "calibration.steps": steps,
                 "calibration.resolution": resolution, "device": device, "dtype": dtype, "offload": offload,
                 "stream": stream,
                 **_validation_overrides(val_prompts, val_steps, val_resolution, baselines, runtime)}
    config = resolve_model(model, recipe, overrides)
    with joined(config.device) as world:
        if world.size > 1:
            set_rank_label(f"rank {world.rank}/{world.size}")
        check_config(config, until, redo)
        run_path = _run_dir(config, out_dir)
        _quiet_libraries()
        with opened(run_path, world) as run:
            summary = run_stages(run, config, until=until, redo=redo, world=world)
    if world.leader:
        _summary(run_path, summary, as_json)


def _rerun(run_dir: Path, until: str, overrides: dict[str, object], as_json: bool, show: bool = True,
           gate_exit: bool = True) -> dict:
    from .recipe import RunConfig, build_config
    from .run import Run
    from .stages import check_config, run_stages

    stored = Run.existing(run_dir).manifest.get("config")
    if stored is None:
        raise BadInputError(f"{run_dir} has no resolved config in its manifest")
    for key, value in overrides.items():
        if value is not None:
            section, _, leaf = key.rpartition(".")
            (stored[section] if section else stored)[leaf] = value
    config = build_config(RunConfig, stored, "")
    check_config(config, until)
    _quiet_libraries()
    with Run(run_dir) as run:
        summary = run_stages(run, config, until=until)
    if show:
        _summary(run_dir, summary, as_json, gate_exit=gate_exit)
    return summary


@app.command(cls=_Command)
def validate(
    run_dir: RunDirArg,
    val_prompts: ValPromptsOpt = None,
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
    _rerun(run_dir, "validate", {**_validation_overrides(val_prompts, val_steps, val_resolution, baselines, runtime),
                                 "validation.min_psnr": min_psnr, "validation.min_ssim": min_ssim,
                                 "validation.max_latent_error": max_latent_error, "stream": stream}, as_json)


@app.command(cls=_Command)
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
        _rerun(run_dir, "export", {"stream": stream}, as_json, gate_exit=False)
        return
    from . import nunchaku
    from .run import Run

    stored = Run.existing(run_dir).manifest.get("config")
    if stored is not None:
        nunchaku.check_run(stored)
    summary = _rerun(run_dir, "export", {"stream": stream}, as_json, show=False)
    with Run(run_dir) as run:
        written = nunchaku.export_run(run, uniform_rank=not per_layer_rank)
    _summary(run_dir, summary, as_json, {"nunchaku": {**written, "file": str(run_dir / written["file"])}},
             gate_exit=False)


@app.command(cls=_Command)
def status(run_dir: RunDirArg, as_json: JsonOpt = False) -> None:
    """Show each stage of a run: status, config hash, artifacts verified, seconds; earlier exports kept."""
    from .run import Run
    from .stages import ORDER

    run = Run.existing(run_dir)
    interrupted = not run.in_use()  # "running" with nobody holding the lock: the process died or was stopped
    rows = []
    for name in ORDER:
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


@app.command(cls=_Command)
def recipes(
    name: Annotated[str | None, typer.Argument(help="Print this recipe resolved; omit to list them.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the recipes, or print one with every field resolved."""
    from .recipe import load_recipe, recipe_names

    if name is None:
        listing = {n: load_recipe(n).model for n in recipe_names()}
        if as_json:
            print(json.dumps(listing, indent=2))
        else:
            table = Table(title="recipes")
            table.add_column("recipe")
            table.add_column("model")
            for recipe_name, model_id in listing.items():
                table.add_row(recipe_name, model_id)
            out.print(table)
        return
    resolved = load_recipe(name).to_dict()
    if as_json:
        print(json.dumps(resolved, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(resolved, sort_keys=False), end="")


@app.command(cls=_Command)
def inspect(file: Annotated[Path, typer.Argument(help="An exported .safetensors file.")], as_json: JsonOpt = False):
    """What a quantized file holds: format, precision, rank, per-layer shapes and bytes, size vs bf16, validation."""
    from .export_format import is_nunchaku, layer_inventory, read_metadata, read_raw_metadata

    if is_nunchaku(raw := read_raw_metadata(file)):
        _inspect_nunchaku(file, raw, as_json)
        return
    metadata = read_metadata(file)
    quant = metadata["quantization_config"]
    layers, other_bytes = layer_inventory(file, metadata["layers"])
    bf16 = other_bytes + sum(2 * (layer["in_features"] * layer["out_features"] + layer["out_features"])
                             for layer in layers)
    result = {"file": str(file), "format_version": metadata["format_version"], "model": metadata["recipe"]["model"],
              "method": quant["method"], "precision": quant["precision"], "rank": quant["rank"],
              **({"bits": quant["bits"], "vq_dim": quant["vq_dim"]} if quant.get("bits") else {}),
              "quantized_layers": len(layers), "bytes": file.stat().st_size, "bytes_bf16": bf16,
              "loras": metadata.get("loras", []), "validate": metadata["validate"], "layers": layers}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    summary = Table(title=str(file), show_header=False)
    for key, value in result.items():
        if key != "layers":
            summary.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    summary.add_row("size vs bf16", f"{bf16 / result['bytes']:.2f}× smaller")
    out.print(summary)
    table = Table(title="quantized layers")
    for column in ("layer", "in", "out", "rank", "act", "bytes"):
        table.add_column(column, justify="left" if column in ("layer", "act") else "right")
    for layer in layers:
        table.add_row(layer["name"], str(layer["in_features"]), str(layer["out_features"]), str(layer["rank"]),
                      layer["act"], str(layer["bytes"]))
    out.print(table)


def _inspect_nunchaku(file: Path, raw: dict[str, str], as_json: bool) -> None:
    from safetensors import safe_open

    from .export_format import decode_metadata

    metadata = decode_metadata(file, raw, plain=("model_class", "svdq_version"))
    quant, recipe = metadata["quantization_config"], metadata["svdq_recipe"]
    with safe_open(str(file), "pt") as handle:
        layers = sorted(key[: -len(".qweight")] for key in handle.keys() if key.endswith(".qweight"))
    result = {"file": str(file), "format": "nunchaku", "model_class": metadata["model_class"],
              "model": recipe["model"], "precision": quant["weight"]["dtype"], "rank": quant["rank"],
              "quantized_layers": len(layers), "bytes": file.stat().st_size, "svdq_version": metadata["svdq_version"]}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    summary = Table(title=f"{file} (Nunchaku's Flux checkpoint, written by svdq)", show_header=False)
    for key, value in result.items():
        summary.add_row(key, str(value))
    out.print(summary)


@app.command("push-to-hub", cls=_Command)
def push_to_hub(
    run_dir: RunDirArg,
    repo_id: Annotated[str, typer.Argument(help="namespace/name on the Hugging Face Hub.")],
    private: Annotated[bool, typer.Option(metavar="", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (default: main).")] = None,
    create_pr: Annotated[bool, typer.Option(metavar="", help="Open a pull request instead of committing.")] = False,
    dry_run: Annotated[bool, typer.Option(metavar="", help="Print the files and the card; upload nothing.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN or the cached login); "
                                                   "never printed or stored.")] = None,
    force: Annotated[bool, typer.Option(metavar="", help="Publish even if validation failed or never ran.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Upload the export, a generated model card and the resolved recipe in one commit."""
    from .hub import describe, plan_upload, push

    upload = plan_upload(run_dir, repo_id, force)
    summary = {"repo_id": repo_id, "dry_run": dry_run, **describe(upload)}
    if not dry_run:
        summary["url"] = push(upload, repo_id, token, private, revision, create_pr)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print("files: " + ", ".join(summary["files"]))
    if dry_run:
        print(upload.card)
        out.print("dry run: nothing was uploaded")
    else:
        out.print(f"uploaded: {summary['url']}")


lora_app = typer.Typer(cls=_Group, help="Off-the-shelf LoRAs on quantized exports, with no re-quantization.")
app.add_typer(lora_app, name="lora")


@lora_app.command("apply", cls=_Command)
def lora_apply(
    export_file: Annotated[Path, typer.Argument(metavar="EXPORT", help="An exported svdq .safetensors file.")],
    loras: Annotated[list[Path], typer.Argument(metavar="LORA...", help="LoRA .safetensors files; they stack.")],
    scale: Annotated[float, typer.Option(help="Strength applied to every LoRA (times its own alpha/rank).")] = 1.0,
    out_file: Annotated[Path | None, typer.Option("--out", help="Output file (default: EXPORT with +lora).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Join LoRAs to the low-rank branch of quantized layers (merge them into 16-bit layers)."""
    from .lora import apply_lora

    target = out_file or export_file.with_name(f"{export_file.stem}+lora.safetensors")
    if target.resolve() == export_file.resolve():
        raise BadInputError(f"--out {target} is the export itself: write the model with LoRAs to another file "
                            "(the export stays the run's verified artifact)")
    source, results = export_file, []
    for lora in loras:
        results.append(apply_lora(source, lora, scale, target))
        source = target
    if as_json:
        print(json.dumps({"out": str(target), "applied": results}, indent=2))
    else:
        for lora, result in zip(loras, results, strict=True):
            out.print(f"{lora.name}: joined to {result['joined']} quantized layers, merged into "
                      f"{result['merged']} 16-bit layers")
        out.print(f"wrote {target}")


@app.command(cls=_Command)
def bench(
    run_dir: Annotated[Path | None, typer.Argument(help="A run with an export: time one transformer step of it "
                                                        "against the 16-bit model. Omit for kernel timings.")] = None,
    m: Annotated[int | None, typer.Option("--m", help="Tokens per GEMM (default: 4608 on a GPU = 4096 image + "
                                                      "512 text tokens; 256 on a CPU).")] = None,
    rank: Annotated[int, typer.Option(help="Low-rank branch rank for kernel timings.")] = 32,
    dtype: Annotated[str, typer.Option(help="bfloat16 or float16.")] = "bfloat16",
    device: Annotated[str | None, typer.Option(help="cuda, cuda:N or cpu (default: cuda when present).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats; the median is reported (GPU 50, CPU 3).")] = None,
    emulate: Annotated[bool, typer.Option(metavar="", help="Run the kernels on the CPU emulator and print what "
                                                           "they move and compute, against the ideal and a "
                                                           "roofline model (no timing).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Time the kernels at FLUX shapes, or one transformer step of an exported model."""
    import torch

    from .bench import kernel_bench, model_bench
    from .run import Run

    if dtype not in ("bfloat16", "float16"):
        raise BadInputError(f"--dtype {dtype!r} is invalid (allowed: bfloat16, float16)")
    if emulate:
        if run_dir is not None:
            raise BadInputError("--emulate counts the kernels at FLUX shapes; it takes no run directory")
        _emulated_bench(m or 4608, rank, getattr(torch, dtype), as_json)
        return
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA device is available")
    cuda = device.startswith("cuda")
    repeats = repeats or (50 if cuda else 3)
    _quiet_libraries()
    if run_dir is not None:
        record = Run.existing(run_dir).manifest["stages"].get("export", {})
        if record.get("status") != "done":
            raise BadInputError(f"{run_dir} has no export yet; run `svdq export {run_dir}` first")
        result = model_bench(str(run_dir / record["file"]), device, repeats)
    else:
        result = kernel_bench(m or (4608 if cuda else 256), rank, getattr(torch, dtype), device, repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"[bold]{result['note']}[/bold]")
    out.print(" ".join(f"{k}={v}" for k, v in result["machine"].items()))
    if result["mode"] == "model":
        table = Table(title="one transformer step")
        for column in ("model", "ms", "weight MiB", "peak MiB"):
            table.add_column(column)
        for name in ("16bit", "quantized"):
            entry = result[name]
            peak = entry.get("peak_memory_bytes")
            table.add_row(name, f"{entry['step_milliseconds']:.2f}", f"{entry['weight_bytes'] / 2**20:.1f}",
                          "-" if peak is None else f"{peak / 2**20:.1f}")
        out.print(table)
        return
    if not any(row["fused"] for row in result["rows"]):  # reference-path timings say nothing of kernel speed
        table = Table(title=f"reference path (torch, dequantized weights), M = {result['rows'][0]['M']} (median µs): "
                            "not kernel timings")
        for column in ("K×N", f"SVDQLinear r{rank}", "SVDQLinear r0", "16-bit matmul"):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            us = row["microseconds"]
            table.add_row(f"{row['K']}×{row['N']}", f"{us['w4a4_lowrank']:.0f}", f"{us['w4a4']:.0f}",
                          f"{us['matmul_16bit']:.0f}")
        out.print(table)
        out.print("for the kernels' traffic and a roofline model without a GPU: svdq bench --emulate")
        return
    table = Table(title=f"W4A4 r{rank} vs 16-bit matmul, M = {result['rows'][0]['M']} (median µs)")
    for column in ("K×N", "W4A4+LR", "W4A4", "naive", "16-bit", "TFLOP/s", "GB/s", "× 16-bit", "LR overhead"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        us = row["microseconds"]
        naive = us.get("naive_unfused")
        table.add_row(f"{row['K']}×{row['N']}", f"{us['w4a4_lowrank']:.0f}", f"{us['w4a4']:.0f}",
                      "-" if naive is None else f"{naive:.0f}", f"{us['matmul_16bit']:.0f}", f"{row['tflops']:.2f}",
                      f"{row['gbps']:.1f}", f"{row['speedup_vs_16bit']:.2f}", f"{row['lowrank_overhead_percent']:.1f}%")
    out.print(table)


def _emulated_bench(m: int, rank: int, dtype, as_json: bool) -> None:
    from . import bench
    from .progress import task
    from .runtime.cost_model import GPUS

    with task("emulate", len(bench.FLUX_SHAPES) * len(GPUS)) as advance:
        result = bench.emulated_kernel_bench(m, rank, dtype, bench.FLUX_SHAPES, progress=advance)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"[bold]{result['note']}[/bold]")
    megabytes = lambda value: f"{value / 1e6:.1f}"  # noqa: E731
    for gpu in GPUS:
        table = Table(title=f"fused W4A4 r{rank}, M = {m}: counted traffic and {gpu} roofline model")
        for column in ("K×N", "kernel", "requested MB", "distinct MB", "ideal MB", "req÷ideal", "distinct÷ideal",
                       "mma", "smem KB", "bound", "model µs", "no-reuse µs"):
            table.add_column(column, justify="left" if column == "kernel" else "right")
        for row in result["rows"]:
            figures = row["gpus"][gpu]
            for name in ("quantize", "gemm"):
                f = figures[name]
                mma = sum(f.get("mma", {}).values())
                shared = f"{f['shared_bytes'] / 1024:.1f}" if "shared_bytes" in f else ""
                table.add_row(f"{row['K']}×{row['N']}", name, megabytes(f["requested_bytes"]),
                              megabytes(f["unique_bytes"]), megabytes(f["ideal_bytes"]),
                              f"{f['requested_over_ideal']:.2f}", f"{f['unique_over_ideal']:.2f}",
                              f"{mma:,}" if mma else "-", shared, f["bound"], f"{f['estimate_us']:.1f}",
                              f"{f['no_reuse_us']:.0f}")
        out.print(table)
        for row in result["rows"]:
            figures = row["gpus"][gpu]
            out.print(f"{row['K']}×{row['N']}: low-rank branch {100 * figures['branch_bytes_over_gemm_bytes']:.1f}% "
                      f"of the GEMM's requested bytes, {100 * row['branch_share_of_flops']:.1f}% of the FLOPs; "
                      f"model {figures['estimate_us']:.1f} µs for both kernels ({figures['no_reuse_us']:.0f} µs "
                      "if no byte were reused from cache)")


def _fail(message: str, code: int) -> None:
    """One line on stderr and the exit code (the traceback too with --debug)."""
    if _state["debug"] and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console entry point: every failure is one line on stderr and a documented exit code (DESIGN.md §5)."""
    from .distributed import leave

    try:
        _main()
    except SystemExit as done:
        leave(done.code)
        raise


def _main() -> None:
    args = sys.argv[1:]
    _state["debug"] = "--debug" in args  # accepted before or after the command
    args = [arg for arg in args if arg != "--debug"]
    from .distributed import world_size
    from .threads import configure_threads

    configure_threads()
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if world_size() > 1 and command not in (None, "quantize"):
        _fail(f"under torchrun only `svdq quantize` runs on several ranks; run `svdq {command}` as one process", 2)
    try:
        code = app(args=args, prog_name="svdq", standalone_mode=False)
    except SvdqError as error:
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        code = 130
    except typer.Abort:  # standard input closed under a prompt
        _fail("aborted", 1)
    except typer.TyperException as error:  # click's usage errors: unknown option or command, bad value, missing
        usage = getattr(error, "exit_code", 1) == 2
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
            print(context.get_help())
            sys.exit(2)
        hint = f" (see `{context.command_path} --help`)" if usage and context is not None else ""
        _fail(error.format_message().replace("\n", " ") + hint, 2 if usage else error.exit_code)
    except Exception as error:  # unexpected: a bug; its type and the way to the traceback
        if _state["debug"]:
            raise
        _fail(f"unexpected {type(error).__name__}: {error} (re-run with --debug for the traceback)", 1)
    if code == 130:
        _fail("interrupted; re-run the same command to resume (finished stages and blocks are kept)", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
