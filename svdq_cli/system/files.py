"""Artifacts on disk: atomic writes and checksummed reads (DESIGN.md §4).

Every write goes to a temporary file in the same directory, is fsynced, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one. Every read of a stage artifact checks
the sha256 the manifest recorded for it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from ..errors import SvdqError


class CorruptArtifactError(SvdqError):
    """An artifact is missing or its checksum does not match the manifest."""


class DiskFullError(SvdqError):
    """The device ran out of space while writing; what was finished is kept, and a re-run resumes."""


def _file_mode() -> int:
    """Permissions a plain ``open`` would give under the current umask (mkstemp's are private: 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class AtomicFile:
    """A file that appears at ``path`` only once complete: written to a temporary file beside it, then fsynced
    and renamed, the directory fsynced too, on :meth:`close`. :meth:`abort`, or leaving the ``with`` block on
    any exception (an interrupt included), removes the temporary file; the target keeps its old content.

    Raises (from any method):
        DiskFullError: no space left.
        SvdqError: any other failure to write, naming the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, self._temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                                           dir=self.path.parent)
        except OSError as error:
            raise _write_error(self.path, error) from None
        self._handle = os.fdopen(descriptor, "wb")

    def write(self, data) -> None:
        try:
            self._handle.write(data)
        except OSError as error:
            self.abort()
            raise _write_error(self.path, error) from None

    def close(self) -> None:
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.chmod(self._temporary, _file_mode())
            os.replace(self._temporary, self.path)
            _fsync_directory(self.path.parent)
        except OSError as error:
            self.abort()
            raise _write_error(self.path, error) from None

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        Path(self._temporary).unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, *_exc) -> None:
        if kind is not None:
            self.abort()


def user_cache() -> Path:
    """svdq's own cache of things made once per machine (compiled kernels, assembled models): SVDQ_CACHE_DIR,
    else the XDG cache."""
    root = os.environ.get("SVDQ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svdq"
    return Path(root)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :class:`AtomicFile`)."""
    with AtomicFile(path) as file:
        file.write(data)
        file.close()


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: the directory entry is on disk, not just the file's data."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


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


# torch dtype → safetensors dtype name (the format's spelling).
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    """Name → (dtype, shape) of each tensor, in the dict's order."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def file_layout(path: Path) -> Layout:
    """Name → (dtype, shape) of each tensor of a safetensors file, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {name: (_TORCH_DTYPES[piece.get_dtype()], tuple(piece.get_shape()))
                for name in handle.keys() for piece in (handle.get_slice(name),)}


def safetensors_header(layout: Layout, metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed header of a safetensors file whose tensors follow in ``layout`` order.

    Keys are sorted and the JSON padded to 8 bytes (as the format requires), so equal content gives equal
    bytes in any process; offsets follow the layout's order, which is the order the data is written in.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's data, row-major and little-endian (this machine's order), without a copy when it can."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class TensorFileWriter:
    """A safetensors file written one tensor at a time, so a file larger than memory is never assembled.

    The layout (every name, dtype and shape) is declared first, which fixes the header; tensors are then
    written in that order. The file appears atomically (:class:`AtomicFile`) on :meth:`close`, which returns
    its sha256; leaving the ``with`` block early removes the temporary file.
    """

    def __init__(self, path: Path, layout: Layout, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._pending = list(layout.items())
        self._digest = hashlib.sha256()
        self._file = AtomicFile(self.path)
        self._emit(safetensors_header(layout, metadata))

    def _emit(self, data) -> None:
        self._file.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout."""
        if not self._pending:
            raise ValueError(f"tensor {name} is not in the declared layout (all tensors were written)")
        expected, (dtype, shape) = self._pending.pop(0)
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} written where the layout "
                             f"declares {expected} {dtype} {shape}")
        self._emit(tensor_bytes(tensor))

    def close(self) -> str:
        """Finish the file (atomically in place); returns its sha256."""
        if self._pending:
            self.abort()
            raise ValueError(f"{len(self._pending)} declared tensor(s) never written, e.g. {self._pending[0][0]}")
        self._file.close()
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Drop the unfinished file (the target keeps its old content)."""
        self._file.abort()

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, kind, *_exc) -> None:
        if kind is not None:
            self.abort()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      seal: str | None = None) -> bytes:
    """Serialized safetensors (tensors in name order, canonical header: equal content, equal bytes).

    A ``seal`` (a stage and its config hash) is stored with the data section's sha256, so the file can be
    verified, and claimed by its stage, without a manifest.
    """
    ordered = {name: tensors[name] for name in sorted(tensors)}
    body = b"".join(tensor_bytes(t) for t in ordered.values())
    if seal is not None:
        metadata = {**(metadata or {}), SEAL: seal, DATA_SHA256: sha256_bytes(body)}
    return safetensors_header(layout_of(ordered), metadata) + body


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


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, each copied into fresh memory, and its metadata (seal removed).

    Read tensor by tensor (never the whole file held as bytes besides its tensors), and never a tensor left on
    the file's mapping, whose 8-byte alignment would make the CPU kernels' results depend on the file's layout.
    """
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    return tensors, load_metadata(path)


def load_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (seal removed), from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    # sorted, as in the file: safetensors hands the metadata over in a hash map's order, new in every process
    return {key: metadata[key] for key in sorted(metadata) if key not in (SEAL, DATA_SHA256)}
