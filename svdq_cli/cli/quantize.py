"""``svdq quantize MODEL``: resolve MODEL to a RunConfig and run every stage, resuming what is done."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadInputError
from .common import (
    BaselinesOpt,
    BaseOpt,
    JsonOpt,
    PromptsOpt,
    RuntimeOpt,
    SkipOpt,
    StreamOpt,
    ValPromptsFromOpt,
    ValPromptsOpt,
    ValResolutionOpt,
    ValStepsOpt,
    WeightOnlyLayersOpt,
    print_summary,
    quiet_libraries,
    run_dir_for,
    target_overrides,
    validation_overrides,
)


def resolve_model(model: str, recipe: str | None, overrides: dict[str, object], base: str | None = None):
    """RunConfig for MODEL (a recipe name, a tiny model, a local diffusers directory, a Hub repo id, or a
    single-file fine-tune of ``base``), as it computes on this machine."""
    from ..models.single_file import is_single_file
    from ..stages.runner import on_this_device

    if is_single_file(model):
        return on_this_device(_fine_tune(Path(model), base, recipe, overrides))
    if base is not None:
        raise BadInputError(f"--base names the model a single .safetensors file fine-tunes; {model} is not one")
    if Path(model).is_file():
        raise BadInputError(f"{model} is a file but not a .safetensors one; svdq reads single-file fine-tunes as "
                            "safetensors (with --base), or diffusers directories")
    return on_this_device(_recipe_for(model, recipe, overrides))


def _fine_tune(file: Path, base: str | None, recipe: str | None, overrides: dict[str, object]):
    """A single-file fine-tune assembled with its base's other parts; the base is ``--base`` (a recipe, a
    diffusers directory or a Hub id) or the ``--recipe``'s model."""
    from ..models.loading import model_directory
    from ..models.single_file import assemble
    from ..run.recipe import load_recipe, recipe_path

    if base is None and recipe is None:
        raise BadInputError(f"{file} is a single file: pass --base, the model it fine-tunes (a recipe such as "
                            "flux-dev, a diffusers directory or a Hub id)")
    base = base or recipe
    if recipe is None and recipe_path(base) is not None:
        recipe = base
    base_model = load_recipe(base).model if recipe_path(base) is not None else base
    directory = model_directory(base_model)
    if directory is None:
        raise BadInputError(f"--base {base_model} is built in memory; a fine-tune needs the base's files (save it "
                            "as a diffusers directory)")
    config = _recipe_for(str(assemble(file, directory, base_model)), recipe, overrides)
    return dataclasses.replace(config, recipe=f"{config.family}:{file.stem}")


def _directory_recipe(directory: Path) -> str:
    """The recipe a diffusers directory starts from: its pipeline's preset family (of a family's several
    recipes, the one made for the model's own resolution: DiT-XL-2 at 256 or 512 px), else the generic one."""
    from ..models import generic
    from ..models.loading import family_of_directory, resolution_of_directory
    from ..run.recipe import load_recipe, recipe_names, recipe_path

    family = family_of_directory(directory)
    if recipe_path(family) is not None:
        return family
    candidates = [name for name in recipe_names() if load_recipe(name).family == family]
    if not candidates:  # a family without a recipe of its own: the generic recipe drives its pipeline
        return generic.FAMILY
    native = resolution_of_directory(directory)
    return next((name for name in candidates if load_recipe(name).calibration.resolution == native), candidates[0])


def _recipe_for(model: str, recipe: str | None, overrides: dict[str, object]):
    from ..models.loading import ModelFetchError
    from ..run.recipe import load_recipe, recipe_names, recipe_path

    if recipe is not None:
        return load_recipe(recipe, {"model": model, **overrides})
    if recipe_path(model) is not None:
        return load_recipe(model, overrides)
    if Path(model).is_dir():
        family = _directory_recipe(Path(model))
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

        from ..system import online

        index = hf_hub_download(model, "model_index.json", local_files_only=not online.hub_reachable())
        family = _directory_recipe(Path(index).parent)
    except BadInputError:
        raise
    except Exception as error:  # offline, gated or missing repo: huggingface_hub has many error types
        raise ModelFetchError(f"could not fetch {model} from the Hugging Face Hub ({type(error).__name__}); "
                              f"download it with `hf download {model} --local-dir DIR` and pass DIR") from None
    return load_recipe(family, {"model": model, **overrides})


def quantize(
    model: Annotated[str, typer.Argument(help="Recipe name (flux-dev), tiny model (tiny-flux), local diffusers "
                                              "directory, Hub repo id, or a fine-tune's .safetensors file "
                                              "(with --base).")],
    recipe: Annotated[str | None, typer.Option(help="Recipe name or YAML file; default: MODEL's own.")] = None,
    rank: Annotated[int | None, typer.Option(help="Low-rank branch rank, a multiple of 16 (default: the "
                                                  "recipe's; `svdq recipes MODEL` shows it).")] = None,
    precision: Annotated[str | None, typer.Option(help="int4, nvfp4 or int8 (default: the recipe's).")] = None,
    method: Annotated[str | None, typer.Option(help="svdquant, smoothquant, rtn, vq4dit (2-/3-bit vector "
                                                    "quantization) or kmeans (its baseline) (default: the "
                                                    "recipe's).")] = None,
    bits: Annotated[int | None, typer.Option(help="Bits per weight of vq4dit/kmeans: 2 or 3 (default 2).")] = None,
    act_range: Annotated[str | None, typer.Option(help="How activations are quantized: svdq (full-range signed "
                                                       "groups, unsigned after GELU) or nunchaku (the rule of "
                                                       "Nunchaku's kernels, which the diffusers export runs on: "
                                                       "signed max|x|/7; NVFP4 without a per-token scale) "
                                                       "(default: the recipe's, svdq).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/RECIPE).")] = None,
    prompts: PromptsOpt = None,
    num_prompts: Annotated[int | None, typer.Option(help="Calibration prompts used (default: the recipe's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per calibration prompt (default: the "
                                                   "recipe's, else the model's).")] = None,
    resolution: Annotated[str | None, typer.Option(help="Calibration image size: pixels (1024) or WxH (832x480) "
                                                        "(default: the recipe's).")] = None,
    val_prompts: ValPromptsOpt = None,
    val_prompts_from: ValPromptsFromOpt = None,
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
    base: BaseOpt = None,
    skip: SkipOpt = None,
    weight_only_layers: WeightOnlyLayersOpt = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    redo: Annotated[str | None, typer.Option(help="Recompute this stage and every later one.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every stage (collect, smooth, svd, quantize, validate, export), resuming what is done. Under torchrun,
    the ranks share collect and the per-block stages (see the README)."""
    from ..run.directory import RunLockedError, opened
    from ..stages.runner import check_config, run_stages
    from ..system.distributed import joined
    from ..system.progress import set_rank_label

    overrides = {"quant.rank": rank, "quant.precision": precision, "quant.method": method, "quant.bits": bits,
                 "quant.act_range": act_range,
                 "calibration.prompts": prompts,
                 "calibration.num_prompts": num_prompts, "calibration.steps": steps,
                 "calibration.resolution": resolution, "device": device, "dtype": dtype, "offload": offload,
                 "stream": stream, **target_overrides(skip, weight_only_layers),
                 **validation_overrides(val_prompts, val_steps, val_resolution, baselines, runtime,
                                        val_prompts_from)}
    config = resolve_model(model, recipe, overrides, base)
    with joined(config.device) as world:
        if world.size > 1:
            set_rank_label(f"rank {world.rank}/{world.size}")
        check_config(config, until, redo)
        run_path = run_dir_for(config, out_dir)
        quiet_libraries()
        try:
            with opened(run_path, world) as run:
                summary = run_stages(run, config, until=until, redo=redo, world=world)
        except RunLockedError as error:  # quantize alone can go elsewhere
            raise RunLockedError(f"{error}, or choose another --out") from None
    if world.leader:
        print_summary(run_path, summary, as_json)
