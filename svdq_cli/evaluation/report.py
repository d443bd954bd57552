"""The evaluation's report, laid out like the SVDQuant paper's Table 1 (rows: 16-bit, the run's method, each
baseline; columns: FID against real images, ImageReward, LPIPS and PSNR against 16-bit, then SSIM and CLIP
score); the grid PNG of the first prompts side by side is ``stages/report_images.sheet``.

``RUN/eval/report.json`` keeps every evaluation of the run (one entry per benchmark and setting, the latest
rewriting its own entry); ``report.md`` shows them all, newest first.
"""

from __future__ import annotations

import math

from ..models.resolution import label
from .metrics import ALL, HIGHER_IS_BETTER, LABELS

GRID_ROWS = 8  # prompts in the grid


def entry_key(evaluation: dict) -> str:
    settings = evaluation["settings"]
    return (f"{evaluation['benchmark']} · {len(evaluation['prompts'])} samples · {settings['steps']} steps · "
            f"{label(settings['resolution'])} · guidance {settings['guidance']} · seed {settings['seed']}")


def figure(value) -> str:
    if value is None:
        return "—"
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "∞"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def table(evaluation: dict) -> list[str]:
    """The Table-1 rows of one evaluation, as markdown lines."""
    metrics = [name for name in ALL if name in evaluation["metrics"]]
    arrows = {name: "↑" if HIGHER_IS_BETTER[name] else "↓" for name in metrics}
    lines = ["| model | " + " | ".join(f"{LABELS[m]} {arrows[m]}" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for method, values in evaluation["methods"].items():
        lines.append(f"| {method} | " + " | ".join(figure(values.get(m)) for m in metrics) + " |")
    return lines


def markdown(model: str, evaluations: list[dict]) -> str:
    lines = [f"# Evaluation of {model}", ""]
    for evaluation in evaluations:
        settings = evaluation["settings"]
        lines += [f"## {entry_key(evaluation)}", "",
                  f"{len(evaluation['prompts'])} prompts from {evaluation['benchmark']}, each method at the same seed; "
                  f"{settings['steps']} steps at {label(settings['resolution'])}, guidance {settings['guidance']}. "
                  f"Runtime: {evaluation['runtime']}.", "", *table(evaluation), ""]
        if evaluation.get("skipped"):
            lines += ["Not computed:", "", *(f"- {name}: {why}" for name, why in evaluation["skipped"].items()), ""]
        lines += ["Images: " + ", ".join(f"`{folder}`" for folder in evaluation["folders"].values()) + ".", ""]
    lines += ["![grid](grid.png)", ""]
    return "\n".join(lines)


def card_section(document: dict) -> list[str]:
    """The model card's evaluation section: each evaluation's table, with the grid (uploaded as eval/grid.png)."""
    lines = ["## Evaluation", "",
             "`svdq eval` on the benchmarks below: every model at the same prompts and seeds; FID against the "
             "benchmark's real images, LPIPS, PSNR and SSIM against the 16-bit model's images. Full report in "
             "`eval/report.md`.", ""]
    for evaluation in document["evaluations"].values():
        lines += [f"### {entry_key(evaluation)}", "", *table(evaluation), ""]
    return [*lines, "![evaluation grid](eval/grid.png)", ""]

