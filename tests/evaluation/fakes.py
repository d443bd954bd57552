"""Offline copies of the benchmarks' files, in their real layouts, with a handful of made-up samples."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

PROMPTS = ["a red fox in fresh snow", "a lighthouse at dusk", "a bowl of ramen", "two dogs on a beach",
           "a glass of iced tea", "an old map of a harbor"]


def picture(index: int, size: tuple[int, int] = (96, 64)) -> bytes:
    """A JPEG (not square, as the benchmarks' photos are not always) whose colour depends on ``index``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (40 * index % 256, 255 - 30 * index % 256, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def mjhq(directory: Path) -> Path:
    """meta_data.json and mjhq30k_imgs.zip (CATEGORY/ID.jpg), as playgroundai/MJHQ-30K holds them."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {f"{index:040x}": {"category": ("animals", "food")[index % 2], "prompt": prompt}
            for index, prompt in enumerate(PROMPTS)}
    (directory / "meta_data.json").write_text(json.dumps(meta))
    with zipfile.ZipFile(directory / "mjhq30k_imgs.zip", "w") as archive:
        for index, (key, value) in enumerate(meta.items()):
            archive.writestr(f"{value['category']}/{key}.jpg", picture(index))
    return directory


def dci(directory: Path) -> Path:
    """sDCI.yaml (name: prompt) and sDCI.gz (a gzipped tarball of NAME.jpg in a folder)."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    meta = {f"sa_{index:05d}": prompt for index, prompt in enumerate(PROMPTS)}
    (directory / "sDCI.yaml").write_text(yaml.safe_dump(meta))
    with tarfile.open(directory / "sDCI.gz", "w:gz") as archive:
        for index, name in enumerate(meta):
            data = picture(index, (64, 80))
            member = tarfile.TarInfo(f"sDCI/{name}.jpg")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return directory
