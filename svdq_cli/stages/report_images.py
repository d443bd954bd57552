"""The validate stage's pictures, drawn with Pillow: image comparisons and per-layer errors."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

LABEL = 14  # pixels of caption above each row


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def comparison_png(prompts: list[str], reference: torch.Tensor, quantized: torch.Tensor,
                   baselines: dict[str, torch.Tensor]) -> Image.Image:
    """One row per prompt: 16-bit | quantized | |difference| ×4 | each baseline."""
    columns = ["16-bit", "quantized", "|diff| x4", *baselines]
    height, width = reference.shape[-2:]
    sheet = Image.new("RGB", (width * len(columns), (height + LABEL) * len(prompts) + LABEL), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(columns):
        draw.text((c * width + 2, 1), title, fill="black")
    for r, prompt in enumerate(prompts):
        top = LABEL + r * (height + LABEL)
        draw.text((2, top + 1), prompt[: (width * len(columns)) // 6], fill="black")
        tiles = [reference[r], quantized[r], ((quantized[r] - reference[r]).abs() * 4)]
        tiles += [images[r] for images in baselines.values()]
        for c, tile in enumerate(tiles):
            sheet.paste(_to_image(tile.float()), (c * width, top + LABEL))
    return sheet


def layers_png(reports: list[dict], bar_width: int = 360) -> Image.Image:
    """Per-layer relative output error: naive quantization (grey) and the run's (blue), same scale."""
    name_width, row = 330, 12
    scale = max([r["relative_error_before"] for r in reports] + [r["relative_error_after"] for r in reports] + [1e-9])
    sheet = Image.new("RGB", (name_width + bar_width + 70, row * (len(reports) + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 0), f"relative output error per layer (grey: naive RTN, blue: this run; full bar = {scale:.3f})",
              fill="black")
    for i, report in enumerate(reports):
        y = row * (i + 1) + 2
        draw.text((2, y - 1), report["name"][-52:], fill="black")
        for value, color, offset in ((report["relative_error_before"], (190, 190, 190), 0),
                                     (report["relative_error_after"], (40, 90, 200), 5)):
            length = int(bar_width * value / scale)
            draw.rectangle((name_width, y + offset, name_width + length, y + offset + 4), fill=color)
        draw.text((name_width + bar_width + 4, y - 1), f"{report['relative_error_after']:.3f}", fill="black")
    return sheet
