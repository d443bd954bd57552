"""The README.md of a Lite pipeline directory (and of its Hub repo): what it is, where it runs, how to open
it, and what was validated."""

from __future__ import annotations

from pathlib import Path

import yaml

from .lite import GPUS


def card(metadata: dict, summary: dict, repo_id: str | None = None) -> str:
    """Model card for the directory ``svdq export --format diffusers`` wrote (``repo_id``: once on the Hub)."""
    recipe, quant = metadata["recipe"], metadata["quantization_config"]
    base, precision = str(metadata.get("base_model") or recipe["model"]), quant["precision"]
    front = {"library_name": "diffusers", "tags": ["svdquant", "svdq", "nunchaku", precision, "diffusers",
                                                   "quantized"]}
    if "/" in base and not Path(base).exists():
        front.update(base_model=base, base_model_relation="quantized")
    where = f'"{repo_id}"' if repo_id else '"path/to/this/directory"'
    dtype = recipe["dtype"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else Path(base).name + ' — SVDQuant ' + precision}", "",
             f"SVDQuant W4A4 ({precision}, rank {summary['rank']}) of `{base}`, made with svdq "
             f"{metadata.get('svdq_version', '')} and stored in diffusers' Nunchaku Lite format: "
             f"{summary['w4a4_layers']} linears run 4-bit weights and activations with a 16-bit low-rank branch, "
             f"{summary['w4a16_layers']} (the weight-only ones: adaptive norms by default) 4-bit weights and 16-bit "
             "activations.", "",
             "## Where it runs", "",
             f"{GPUS[precision]}, through the kernels diffusers fetches from the Hub with the `kernels` package "
             "(downloaded code: diffusers asks you to opt in).", "",
             "```bash", "pip install diffusers kernels", "export DIFFUSERS_TRUST_REMOTE_KERNELS=true", "```", "",
             "```python", "import torch", "from diffusers import DiffusionPipeline", "",
             f"pipe = DiffusionPipeline.from_pretrained({where}, torch_dtype=torch.{dtype}).to(\"cuda\")",
             'image = pipe("a red fox in fresh snow").images[0]', "```", "",
             "Without such a GPU, svdq runs the same checkpoint on the CPU (slowly, for checking) with a pure-torch "
             "stand-in for the four kernels: `import svdq_cli; svdq_cli.use_cpu_lite_kernels()` before "
             "`from_pretrained`.", ""]
    lines += _activation_note(summary["act_range"]) + _w4a16_note(summary["w4a16_relative_error_max"])
    lines += _dense_note(summary["dense_layers"])
    lines += _validation(metadata.get("validate", {}))
    return "\n".join(lines)


def _activation_note(act_range: str) -> list[str]:
    if act_range == "nunchaku":
        return ["Quantized and validated with `--act-range nunchaku`: the activation rule the Lite kernels apply "
                "(signed, `max|x|/7` per 64 for INT4; `max|x|/6` in fp8 per 16 for NVFP4) and weight-only layers "
                "the W4A16 kernel runs as they are, so the validation below measures what runs (up to the "
                "kernels' 16-bit arithmetic).", ""]
    return ["Validated with svdq's own activation rule (full-range signed groups, unsigned after GELU); the Lite "
            "kernels quantize activations as Nunchaku does (signed, `max|x|/7`), so the images differ slightly "
            "from the validated ones. Quantize with `--act-range nunchaku` for a checkpoint whose validation is "
            "what runs.", ""]


def _w4a16_note(error: float) -> list[str]:
    if not error:
        return []
    return [f"The weight-only layers carry a low-rank branch or smoothing, which the W4A16 kernel has not: they "
            f"were re-quantized from their effective weights (largest relative weight error {error:.2%}). "
            "`--act-range nunchaku` quantizes them without either, so they convert exactly.", ""]


def _dense_note(dense: dict[str, str]) -> list[str]:
    if not dense:
        return []
    lines = [f"{len(dense)} quantized layer(s) have shapes the kernels cannot take and are stored as their "
             "effective 16-bit weights (4-bit weight values, 16-bit activations):", ""]
    return lines + [f"- `{name}`: {reason}" for name, reason in sorted(dense.items())] + [""]


def _validation(validate: dict) -> list[str]:
    if not validate.get("ran"):
        return ["This model was exported without validation.", ""]
    lines = ["## Validation against the 16-bit model", "",
             "Held-out prompts, same seeds; higher PSNR/SSIM and lower latent error are closer to 16-bit.", "",
             "| method | PSNR (dB) | SSIM | latent rel. error |", "|---|---:|---:|---:|"]
    for method, values in validate["methods"].items():
        lines.append(f"| {method} | {values['psnr']:.2f} | {values['ssim']:.4f} | {values['latent_error']:.4f} |")
    return [*lines, ""]
