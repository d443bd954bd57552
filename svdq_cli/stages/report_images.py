"""Pictures drawn with Pillow: image sheets (validate's comparison, eval's grid), per-layer errors, and the
conversions between pictures, pixel tensors and PNG bytes."""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageDraw

LABEL = 14  # pixels of caption above each row


def picture(tensor: torch.Tensor) -> Image.Image:
    """An image ``[3, H, W]`` — uint8 pixels, or floats in [0, 1] (clamped, rounded) — as an RGB picture."""
    if tensor.dtype != torch.uint8:
        tensor = (tensor.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().cpu().numpy())


def pixels(image: Image.Image) -> torch.Tensor:
    """A picture's RGB pixels as uint8 ``[3, H, W]``."""
    rgb = image.convert("RGB")
    flat = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return flat.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sheet(prompts: list[str], columns: dict[str, list[torch.Tensor]]) -> Image.Image:
    """One row per prompt, captioned with it, and one titled column per entry of ``columns`` (its images in
    prompt order, each resized to the first one's size)."""
    titles = list(columns)
    height, width = next(iter(columns.values()))[0].shape[-2:]
    page = Image.new("RGB", (width * len(titles), (height + LABEL) * len(prompts) + LABEL), "white")
    draw = ImageDraw.Draw(page)
    for c, title in enumerate(titles):
        draw.text((c * width + 2, 1), title, fill="black")
    for r, prompt in enumerate(prompts):
        top = LABEL + r * (height + LABEL)
        draw.text((2, top + 1), str(prompt)[: (width * len(titles)) // 6], fill="black")
        for c, title in enumerate(titles):
            tile = picture(columns[title][r])
            page.paste(tile if tile.size == (width, height) else tile.resize((width, height)),
                       (c * width, top + LABEL))
    return page


def comparison_png(prompts: list[str], reference: torch.Tensor, quantized: torch.Tensor,
                   baselines: dict[str, torch.Tensor]) -> Image.Image:
    """One row per prompt: 16-bit | quantized | |difference| ×4 | each baseline."""
    columns = {"16-bit": list(reference), "quantized": list(quantized),
               "|diff| x4": [(q - r).abs() * 4 for q, r in zip(quantized, reference, strict=True)],
               **{name: list(images) for name, images in baselines.items()}}
    return sheet(prompts, columns)


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
