"""Artifacts on disk: atomic writes and checksummed reads (DESIGN.md §4).

Every write goes to a temporary file in the same directory, is fsynced, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one. Every read of a stage artifact checks
the sha256 the manifest recorded for it.
"""

from __future__ import annotations

import errno
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


class DiskFullError(SvdqError):
    """The device ran out of space while writing; what was finished is kept, and a re-run resumes."""


def _file_mode() -> int:
    """Permissions a plain ``open`` would give under the current umask (mkstemp's are private: 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + directory fsync).

    Raises:
        DiskFullError: no space left (the temporary file is removed; the target keeps its old content).
        SvdqError: any other failure to write, naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise _write_error(path, error) from None
    except BaseException:  # interrupted: never leave a half-written temporary file behind
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_error(path: Path, error: OSError) -> SvdqError:
    if error.errno == errno.ENOSPC:
        return DiskFullError(f"no space left on the device writing {path}; free space and re-run the same command "
                             "(finished stages and blocks are kept: it resumes)")
    return SvdqError(f"cannot write {path}: {error.strerror or error}")


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


SEAL, DATA_SHA256 = "svdq_seal", "svdq_data_sha256"


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      seal: str | None = None) -> bytes:
    """Serialized safetensors with a canonical header, so equal content gives equal bytes in any process.

    safetensors writes its metadata from a hash map whose order changes between processes; re-encoding the
    header with sorted keys (padded to 8 bytes, as the format requires) fixes that. Tensor offsets are
    relative to the data section, so they are unaffected. A ``seal`` (a stage and its config hash) is stored
    with the data section's sha256, so the file can be verified, and claimed by its stage, without a manifest.
    """
    data = save({name: t.detach().contiguous() for name, t in tensors.items()}, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + size]), data[8 + size :]
    if seal is not None:
        header.setdefault("__metadata__", {}).update({SEAL: seal, DATA_SHA256: sha256_bytes(body)})
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + body


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  seal: str | None = None) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    data = safetensors_bytes(tensors, metadata, seal)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def sealed_sha256(path: Path, seal: str) -> str | None:
    """The file's sha256 when it carries ``seal`` and its data section matches the hash sealed with it."""
    try:
        data = Path(path).read_bytes()
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__", {})
    except (OSError, ValueError, AttributeError):
        return None
    if metadata.get(SEAL) != seal or metadata.get(DATA_SHA256) != sha256_bytes(data[8 + size :]):
        return None
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
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__", {})
    return load(data), {key: value for key, value in metadata.items() if key not in (SEAL, DATA_SHA256)}
