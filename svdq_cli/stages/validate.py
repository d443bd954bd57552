"""validate: generate the held-out prompts with the 16-bit and the quantized transformer at the same seeds
and report what quantization cost — latent relative error, PSNR and SSIM of the images (LPIPS when its weights
are available locally), per-layer output errors — as report.json, report.md, comparison.png and layers.png.

``validation.baselines`` (rtn, w4a16, smoothquant, nf4; for VQ runs rtn at the run's bits and kmeans) adds the same
metrics for those methods, quantized in memory from the same calibration data, so a user sees what the method
bought them. Gates (``min_psnr``, ``min_ssim``, ``max_latent_error``) are checked here; the CLI exits 3 when one
fails.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from functools import cache, partial

import torch
from torch import nn

from ..calibration.prompts import identity, load_prompts, prompt_seed
from ..engines.uniform import GroupPlan, input_gram, plan_group, quantize_layer
from ..methods.baselines import NF4, baseline_config
from ..methods.config import LOW_BIT_PRECISIONS, QuantConfig
from ..models.base import strip_frames
from ..models.resolution import dimensions
from ..quant import nf4
from ..run.directory import library_versions
from ..run.gates import check_gates
from ..runtime.emulator.backend import EmulatedBackend
from ..runtime.kernels import describe, emulated
from ..runtime.nf4_linear import NF4Linear
from ..system.distributed import World
from ..system.progress import warn
from ..system.threads import single_threaded
from ..version import __version__
from .base import Stage, block_artifact
from .quantize import load_block_layers, vq_block
from .report_images import comparison_png, layers_png, png_bytes
from .smooth import group_stats


def reads(config) -> dict:
    return {"validation": config.to_dict()["validation"]}


def quantized_block(run, index: int) -> dict[str, nn.Module]:
    """Block ``index``'s quantized layers, from the quantize stage's artifact."""
    return {name: layer for name, (layer, _) in load_block_layers(run, index).items()}


def layer_reports(run, workspace) -> list[dict]:
    """Every quantized layer's report in the model's order, from the quantize artifacts' metadata (their
    tensors are not loaded; the metadata's own order is a hash map's, different in every process)."""
    reports = []
    for index, (_, groups) in enumerate(workspace.blocks):
        metadata = run.read_metadata("quantize", block_artifact("quantize", index))
        reports += [json.loads(metadata[name])["report"] for group in groups for name in group]
    return reports


def baseline_block(run, workspace, config: QuantConfig, index: int) -> dict[str, nn.Module]:
    """Block ``index``'s layers quantized in memory by a baseline method from the collected data."""
    layers = {}
    if config.is_vector:  # k-means VQ, calibrated on the block's inputs like the run's own layers
        with workspace.block_resident(index), single_threaded():
            return {f"{workspace.blocks[index][0]}.{name}": layer
                    for name, layer in vq_block(run, workspace, index, config).layers.items()}
    if config.precision in LOW_BIT_PRECISIONS:  # RTN at a VQ run's bits: weights only, no statistics needed
        with workspace.block_resident(index):
            plan = GroupPlan("none", 0.0, 0.0, 0.0, None)
            return {name: quantize_layer(workspace.originals[name], config, plan)
                    for group in workspace.blocks[index][1] for name in group}
    collected, _ = run.read("collect", block_artifact("collect", index))
    with workspace.block_resident(index), single_threaded():  # numerics independent of the thread count
        for group in workspace.blocks[index][1]:
            modules = [workspace.originals[name] for name in group]
            stats = group_stats(collected, group[0])
            plan = plan_group(group, modules, stats, config,
                              weight_only=[group[0]] if group[0] in workspace.layout.weight_only else (),
                              nonnegative=[group[0]] if group[0] in workspace.layout.nonnegative else ())
            for name, module in zip(group, modules, strict=True):
                layers[name] = quantize_layer(module, config, plan, gram=input_gram(stats, plan, config))
    return layers


def nf4_block(workspace, index: int) -> dict[str, nn.Module]:
    """Block ``index``'s targets as weight-only NF4 layers: those whose K the NF4 block divides (its blocks run
    along K here; bitsandbytes' run along the flattened weight, the same blocks then); the others stay 16-bit."""
    with workspace.block_resident(index):
        return {name: NF4Linear.from_linear(workspace.originals[name]) for group in workspace.blocks[index][1]
                for name in group if workspace.originals[name].in_features % nf4.BLOCK == 0}


def baseline_layers(run, workspace, config: QuantConfig, baseline: str, keep: bool = False):
    """Block index → ``baseline``'s layers for that block. ``keep``: each block's are made once and kept (a
    streamed block re-enters at every denoising step), which a VQ baseline's calibration always is."""
    if baseline == NF4:
        layers_of_block = partial(nf4_block, workspace)
    else:
        method_config = baseline_config(config, baseline)
        layers_of_block = partial(baseline_block, run, workspace, method_config)
        keep = keep or method_config.is_vector
    return cache(layers_of_block) if keep else layers_of_block


@contextmanager
def decoded_latents(pipeline):
    """Record what the pipeline hands its VAE to decode: the final latents, the same way for every family
    (not all pipelines offer a step-end callback)."""
    captured: list[torch.Tensor] = []
    decode = pipeline.vae.decode

    def recording_decode(latents, *args, **kwargs):
        captured.append(latents.detach().float().cpu())
        return decode(latents, *args, **kwargs)

    pipeline.vae.decode = recording_decode
    try:
        yield captured
    finally:
        del pipeline.vae.decode  # back to the class's method


def generate(workspace, prompts: list[str], seeds: list[int], world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[P, 3, H, W]`` in [0, 1] and final latents, one prompt at a time (bounded memory). In a
    ``world`` of several ranks each generates its share (prompt i on rank i mod N) and all get every prompt's,
    in prompt order: the same tensors one process makes, since each prompt is generated the same way."""
    mine = [index for index in range(len(prompts)) if world.owns(index)]
    with decoded_latents(workspace.pipeline) as latents:
        images = workspace.generate([prompts[i] for i in mine], [seeds[i] for i in mine],
                                    workspace.config.validation, progress="validate")
    pieces = zip(mine, (image.float().cpu() for image in images), latents, strict=True)
    gathered = sorted(piece for share in world.exchange(list(pieces), "the exchange of validation images")
                      for piece in share)  # (prompt index, image, latent): indices are unique
    return torch.cat([image for _, image, _ in gathered]), torch.cat([latent for _, _, latent in gathered])


def reference(workspace, prompts: list[str], seeds: list[int],
              world: World) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The 16-bit model's images and latents, from the run's cache when this validation setting was generated
    before (re-validating then runs only the quantized side). Rank 0's cache decides for every rank; on a cache
    hit the other ranks get None (rank 0 alone computes the metrics)."""
    steps, guidance, resolution = workspace.settings(workspace.config.validation)
    fields = {"model": workspace.config.model, "family": workspace.config.family, "dtype": workspace.config.dtype,
              "prompts": [identity(p) for p in prompts], "seeds": seeds, "steps": steps, "guidance": guidance,
              "resolution": resolution,
              "extra": workspace.adapter.protocol.extra, "versions": {**library_versions(), "svdq": __version__}}

    found = workspace.cache.get("reference", fields) if world.leader else None
    if world.exchange(found is not None, "the reference cache check")[0]:
        return (found[0]["images"], found[0]["latents"]) if found else (None, None)
    images, latents = generate(workspace, prompts, seeds, world)
    if world.leader:
        workspace.cache.put("reference", fields, {"images": images, "latents": latents})
    return images, latents


def frame_width(workspace) -> int:
    """The width of one validation frame (a video's images are its frames side by side)."""
    return dimensions(workspace.settings(workspace.config.validation)[2])[0]


def metrics(images: torch.Tensor, latents: torch.Tensor, reference_images: torch.Tensor,
            reference_latents: torch.Tensor, frame_width: int) -> dict:
    """Per prompt and mean: PSNR, SSIM, latent relative error. Single-threaded: the figures go into the
    export's metadata, which must not depend on the thread count (SSIM's convolutions would)."""
    with single_threaded():
        return _metrics(images, latents, reference_images, reference_latents, frame_width)


def _metrics(images: torch.Tensor, latents: torch.Tensor, reference_images: torch.Tensor,
             reference_latents: torch.Tensor, frame_width: int) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    per_prompt = []
    for i in range(len(images)):
        image, reference = images[i : i + 1].clamp(0, 1), reference_images[i : i + 1].clamp(0, 1)
        latent_error = (torch.linalg.vector_norm(latents[i] - reference_latents[i])
                        / torch.linalg.vector_norm(reference_latents[i]).clamp(min=1e-12)).item()
        per_prompt.append({
            "psnr": min(peak_signal_noise_ratio(image, reference, data_range=1.0).item(), 100.0),
            # frame by frame: SSIM's windows must not straddle two frames of a video's strip
            "ssim": structural_similarity_index_measure(strip_frames(image, frame_width),
                                                        strip_frames(reference, frame_width),
                                                        data_range=1.0).item(),
            "latent_error": latent_error,
        })
    mean = {key: sum(p[key] for p in per_prompt) / len(per_prompt) for key in per_prompt[0]}
    return {**mean, "per_prompt": per_prompt}


def lpips_status() -> str:
    """LPIPS needs torchvision and pretrained AlexNet/VGG weights, which svdq never downloads."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        LearnedPerceptualImagePatchSimilarity(net_type="alex")
    except Exception as error:  # missing torchvision, or weights not in the local cache (offline)
        return f"not computed: LPIPS weights are not available locally ({type(error).__name__})"
    return "available here; `svdq eval RUN --metrics lpips,psnr,ssim` computes it"


def through_emulated_kernels(run, workspace, prompts: list[str], seeds: list[int]):
    """Generate with the quantized layers on the fused kernels, run by the CPU emulator, and again on the
    reference path: the images, latents, a runtime description, and how far the two paths lie apart.

    Two figures, because a quantized network amplifies last-bit differences: per layer, the kernels' output
    against the reference path's on the same input (signal-to-noise in dB, the worst layer reported), and end
    to end, the images of the two paths.
    """
    energy: dict[str, list[float]] = {}  # layer → [Σ reference², Σ (kernels − reference)²]

    def compare(module, args, output, name):
        reference_output = module.reference_forward(args[0]).double()
        sums = energy.setdefault(name, [0.0, 0.0])
        sums[0] += reference_output.pow(2).sum().item()
        sums[1] += (output.double() - reference_output).pow(2).sum().item()

    def compared_block(index: int) -> dict[str, nn.Module]:
        layers = quantized_block(run, index)
        for name, layer in layers.items():
            layer.register_forward_hook(lambda m, a, o, n=name: compare(m, a, o, n))
        return layers

    backend = EmulatedBackend()
    with workspace.with_layers(compared_block), emulated(backend) as tally:
        images, latents = generate(workspace, prompts, seeds, World())
    fused, fallbacks = tally.pop("fused", 0), dict(tally)
    if not fused:
        warn(f"no layer ran on the emulated kernels ({'; '.join(fallbacks) or 'no quantized layer was called'})")
    snr = {name: 10 * math.log10(signal / noise) if noise else math.inf for name, (signal, noise) in energy.items()}
    worst = min(snr, key=snr.get) if snr else None
    with workspace.with_layers(lambda index: quantized_block(run, index)):
        reference_images, reference_latents = generate(workspace, prompts, seeds, World())
    agreement = metrics(images, latents, reference_images, reference_latents, frame_width(workspace))
    runtime = (f"fused kernels on the CPU emulator ({backend.device.name}): {fused} layer calls fused, "
               f"{sum(fallbacks.values())} on the reference path")
    check = {"fused_calls": fused, "reference_path_calls": fallbacks, "worst_layer": worst,
             "worst_layer_snr_db": snr[worst] if worst else None,
             **{key: agreement[key] for key in ("psnr", "ssim", "latent_error")}}
    return images, latents, runtime, check


def run(run, workspace) -> dict:
    """Generate, then (rank 0) measure, report and check the gates. Under torchrun the ranks share the
    generations; an emulated-kernels validation runs on rank 0 alone (``Workspace.stage_world``)."""
    config = workspace.config
    validation = config.validation
    world = workspace.stage_world("validate")
    prompts = load_prompts(validation.prompts, validation.num_prompts)
    seeds = [prompt_seed(p, validation.seed) for p in prompts]
    reference_images, reference_latents = reference(workspace, prompts, seeds, world)
    if validation.runtime == "emulated":
        images, latents, runtime, kernels_check = through_emulated_kernels(run, workspace, prompts, seeds)
    else:
        with workspace.with_layers(lambda index: quantized_block(run, index)):
            images, latents = generate(workspace, prompts, seeds, world)
        runtime, kernels_check = describe(workspace.device), None
    outputs = {config.quant.method: (images, latents)}
    for baseline in validation.baselines:
        with workspace.with_layers(baseline_layers(run, workspace, config.quant, baseline)):
            outputs[baseline] = generate(workspace, prompts, seeds, world)
    if not world.leader:
        return {}
    width = frame_width(workspace)
    methods = {name: metrics(*output, reference_images, reference_latents, width) for name, output in outputs.items()}
    baseline_images = {name: outputs[name][0] for name in validation.baselines}
    reports = layer_reports(run, workspace)
    main = next(iter(methods.values()))
    gates = check_gates(validation, main)
    report = {
        "model": config.model, "prompts": prompts, "seeds": seeds,
        "runtime": runtime, "device": workspace.device, "kernels_vs_reference_path": kernels_check,
        "methods": methods, "gates": gates, "passed": all(g["passed"] for g in gates.values()),
        "lpips": lpips_status(), "layers": reports,
    }
    run.write_file("validate", "validate/report.json", (json.dumps(report, indent=2) + "\n").encode())
    run.write_file("validate", "validate/report.md", render_markdown(report).encode())
    run.write_file("validate", "validate/comparison.png",
                   png_bytes(comparison_png(prompts, reference_images, images, baseline_images)))
    run.write_file("validate", "validate/layers.png", png_bytes(layers_png(reports)))
    return {"passed": report["passed"], "psnr": main["psnr"], "ssim": main["ssim"],
            "latent_error": main["latent_error"]}


def render_markdown(report: dict) -> str:
    lines = [f"# Validation of {report['model']}", "",
             f"{len(report['prompts'])} held-out prompts, same seeds for every method; {report['runtime']}.", "",
             "| method | PSNR (dB) ↑ | SSIM ↑ | latent rel. error ↓ |", "|---|---:|---:|---:|"]
    for method, values in report["methods"].items():
        lines.append(f"| {method} | {values['psnr']:.2f} | {values['ssim']:.4f} | {values['latent_error']:.4f} |")
    lines += ["", f"LPIPS: {report['lpips']}.", ""]
    check = report.get("kernels_vs_reference_path")
    if check:
        lines += [f"Fused kernels (emulated) against the reference path: worst layer {check['worst_layer']} at "
                  f"{check['worst_layer_snr_db']:.1f} dB SNR on the same inputs; end to end PSNR {check['psnr']:.2f} "
                  f"dB, SSIM {check['ssim']:.4f}, latent relative error {check['latent_error']:.2e}.", ""]
    if report["gates"]:
        lines += ["| gate | threshold | value | passed |", "|---|---:|---:|---|"]
        for name, gate in report["gates"].items():
            verdict = "yes" if gate["passed"] else "NO"
            lines.append(f"| {name} | {gate['threshold']} | {gate['value']:.4f} | {verdict} |")
        lines.append("")
    worst = sorted(report["layers"], key=lambda r: -r["relative_error_after"])[:10]
    lines += ["Layers with the largest output error (calibration rows):", "",
              "| layer | act | α | β | rel. error naive | rel. error |", "|---|---|---:|---:|---:|---:|"]
    for layer in worst:
        lines.append(f"| {layer['name']} | {layer['act']} | {layer['alpha']:.2f} | {layer['beta']:.2f} | "
                     f"{layer['relative_error_before']:.4f} | {layer['relative_error_after']:.4f} |")
    lines += ["", "![comparison](comparison.png)", "", "![layers](layers.png)", ""]
    return "\n".join(lines)


STAGE = Stage("validate", ("quantize",), reads, run)
