"""Artifacts on disk: atomic writes and checksummed reads (DESIGN.md §4).

Every write goes to a temporary file in the same directory, is fsynced, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one. Every read of a stage artifact checks
the sha256 the manifest recorded for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load, save

from .errors import SvdqError


class CorruptArtifactError(SvdqError):
    """An artifact is missing or its checksum does not match the manifest."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialized safetensors with a canonical header, so equal content gives equal bytes in any process.

    safetensors writes its metadata from a hash map whose order changes between processes; re-encoding the
    header with sorted keys (padded to 8 bytes, as the format requires) fixes that. Tensor offsets are
    relative to the data section, so they are unaffected.
    """
    data = save({name: t.detach().contiguous() for name, t in tensors.items()}, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = header.encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + size :]


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    data = safetensors_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_tensors(path: Path, expected_sha256: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file after checking its sha256; returns tensors and metadata.

    Raises:
        CorruptArtifactError: the file is missing, truncated or altered.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptArtifactError(f"{path} is missing") from None
    if sha256_bytes(data) != expected_sha256:
        raise CorruptArtifactError(f"{path} does not match its checksum (truncated or altered)")
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    return load(data), header.get("__metadata__", {})
