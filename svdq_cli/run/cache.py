"""Run-local caches: results keyed by everything that determines them, under ``RUN/cache/KIND/KEY.safetensors``.

Unlike stage artifacts they are not listed in the manifest: the key names the content (a prompt's text
encoding, the 16-bit reference images of a validation setting), so a changed setting simply looks up
another key, and an unchanged one is reused by any stage or command. Each file is sealed with its kind and
key and the sha256 of its data, so a damaged, truncated or foreign file is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..system.files import atomic_write_bytes, load_tensors, safetensors_bytes, sealed_sha256

Tensors = dict[str, torch.Tensor]


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Cache:
    """One run's cache directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / kind / f"{key}.safetensors"

    def get(self, kind: str, fields: dict) -> tuple[Tensors, dict[str, str]] | None:
        """The cached tensors and metadata for ``fields``, or None when absent or not intact."""
        key = cache_key(fields)
        path = self._path(kind, key)
        if not path.is_file() or sealed_sha256(path, f"{kind}:{key}") is None:
            return None
        return load_tensors(path)

    def put(self, kind: str, fields: dict, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
        key = cache_key(fields)
        atomic_write_bytes(self._path(kind, key), safetensors_bytes(tensors, metadata, seal=f"{kind}:{key}"))
