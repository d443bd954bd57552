"""The evaluation's generated images: one PNG per method, prompt and seed, under ``RUN/eval/images/METHOD/``.

A file is named by a hash of everything that determines it (the method's fingerprint, the prompt with its
reference image, the seed, steps, guidance and resolution), so an interrupted evaluation — even by kill -9 —
resumes at the next missing image, a larger ``--num-samples`` or another benchmark that shares prompts reuses
what exists, and a changed setting or re-quantized run generates anew. The 16-bit model's images are the run's
reference cache: every method's figures against 16-bit read the same files.

Each file is written atomically (a temporary file, then a rename), and verified on reuse by the checksum PNG
keeps for every chunk, so a damaged file is generated again with a warning, never scored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..calibration.prompts import identity
from ..run.cache import cache_key
from ..run.directory import fault_point
from ..stages.report_images import picture, pixels, png_bytes
from ..system.files import atomic_write_bytes
from ..system.progress import warn

FAULT_STAGE = "eval-images"  # SVDQ_FAULT_AFTER=eval-images:N kills the process after its N-th image (tests)


class ImageStore:
    """One run's evaluation images."""

    def __init__(self, directory: Path, fingerprints: dict[str, dict]) -> None:
        self.directory = Path(directory)
        self.fingerprints = fingerprints  # method → what determines its images besides the sample
        self.written = 0

    def key(self, method: str, prompt: str, seed: int, settings: dict) -> str:
        return cache_key({"method": self.fingerprints[method], "prompt": identity(prompt), "seed": seed, **settings})

    def path(self, method: str, key: str) -> Path:
        return self.directory / method / f"{key}.png"

    def has(self, method: str, key: str) -> bool:
        """Whether the image is there and intact (a damaged one is removed, with a warning)."""
        path = self.path(method, key)
        if not path.is_file():
            return False
        if _intact(path):
            return True
        warn(f"{path} is damaged (a PNG checksum fails); generating it again")
        path.unlink(missing_ok=True)
        return False

    def put(self, method: str, key: str, image: torch.Tensor) -> None:
        """Write one generated image ``[3, H, W]`` (floats in [0, 1])."""
        atomic_write_bytes(self.path(method, key), png_bytes(picture(image)))
        self.written += 1
        fault_point(FAULT_STAGE, self.written)

    def read(self, method: str, key: str) -> torch.Tensor:
        """The image as uint8 ``[3, H, W]``."""
        return read_png(self.path(method, key))


def read_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return pixels(image)


def _intact(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()  # every chunk's CRC, through IEND: a truncated or altered file fails (no decoding)
    except Exception:  # PIL raises SyntaxError, OSError, ValueError… for damaged files
        return False
    return True
