"""A run directory and its manifest (DESIGN.md §4).

``RUN/manifest.json`` holds the resolved config, and per stage its config hash, status, the sha256 of every
artifact it wrote, and timings. The manifest is rewritten (atomically) after every artifact, so an
interrupted stage knows which blocks are done. A process holds ``RUN/.lock`` (an flock, released by the
kernel even on SIGKILL) while it writes the run.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import BadInputError, SvdqError
from ..system.distributed import World
from ..system.files import (
    CorruptArtifactError,
    TensorFileWriter,
    atomic_write_bytes,
    atomic_write_json,
    load_metadata,
    load_tensors,
    sealed_sha256,
    sha256_bytes,
    sha256_file,
    write_tensors,
)
from ..system.progress import warn
from ..version import __version__

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Test-only fault injection, right after the N-th artifact of STAGE is recorded: "STAGE:N" SIGKILLs the process;
# "STAGE:N:pause" says so on stderr and waits for a signal (a test's Ctrl-C, at a known point). Under torchrun,
# FAULT_RANK_VARIABLE=R limits it to rank R.
FAULT_VARIABLE = "SVDQ_FAULT_AFTER"
FAULT_RANK_VARIABLE = "SVDQ_FAULT_RANK"


def fault_point(stage: str, written: int) -> None:
    """The test-only fault hook (:data:`FAULT_VARIABLE`), called after ``written`` files of ``stage``."""
    fault = os.environ.get(FAULT_VARIABLE, "").split(":")
    rank = os.environ.get("RANK", "0")
    if os.environ.get(FAULT_RANK_VARIABLE, rank) != rank:
        return
    if fault[0] == stage and written >= int(fault[1]):
        if fault[2:] == ["pause"]:
            print(f"fault hook: paused after {stage} artifact {fault[1]}", file=sys.stderr, flush=True)
            while True:  # not signal.pause(): a signal landing between the print and the pause was lost (a hang)
                time.sleep(0.1)  # a signal ends the sleep and its handler runs at once
        else:
            os.kill(os.getpid(), signal.SIGKILL)


class RunLockedError(BadInputError):
    """Another process is writing this run directory."""


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "svdq": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
    }


class Run:
    """A run directory. Use as a context manager to hold its lock while writing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_handle = None
        self.manifest: dict = {"format": MANIFEST_FORMAT, "stages": {}}
        self.corrupt: str | None = None  # why the manifest on disk cannot be used, if it cannot
        self._digests: dict[str, tuple[tuple[int, int, int], str]] = {}  # relative → (file identity, sha256)
        self.reload()

    @classmethod
    def existing(cls, path: Path) -> Run:
        """Open a run that must already exist and be readable (status, validate, export).

        Raises:
            BadInputError: no run there, or a manifest that cannot be read (with how to rebuild the run).
        """
        if not (Path(path) / MANIFEST).is_file():
            raise BadInputError(f"{path} is not an svdq run directory (no {MANIFEST}); run `svdq quantize` first")
        run = cls(path)
        if run.corrupt:
            raise BadInputError(f"{path / MANIFEST} {run.corrupt}; re-run `svdq quantize MODEL --out {path}` with the "
                                "run's model and recipe: it sets the manifest aside and reuses every artifact that "
                                "still verifies")
        return run

    def _read_manifest(self) -> tuple[dict, str | None]:
        fresh = {"format": MANIFEST_FORMAT, "stages": {}}
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError, RecursionError) as error:  # RecursionError: absurd nesting
            return fresh, f"is unreadable ({type(error).__name__})"
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            return fresh, "is not an svdq manifest (valid JSON of another shape)"
        version = manifest.get("format")
        if isinstance(version, int) and version > MANIFEST_FORMAT:
            raise BadInputError(f"{self.path / MANIFEST} was written by a newer svdq (manifest format {version}, "
                                f"this one reads {MANIFEST_FORMAT}); upgrade svdq or choose another --out")
        if version != MANIFEST_FORMAT:
            return fresh, f"has an unknown manifest format {version!r}"
        return manifest, None

    # --- locking ------------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise BadInputError(f"run directory {self.path} is not writable ({error.strerror})") from None
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"run directory {self.path} is in use by process {owner}; wait for it to finish "
                f"(`svdq status {self.path}` shows how far it is)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle
        if self.corrupt:  # set it aside (never delete a user's file) and start a manifest the artifacts can rejoin
            aside = self.path / f"{MANIFEST}.corrupt-{int(time.time())}"
            os.replace(self.path / MANIFEST, aside)

            warn(f"{self.path / MANIFEST} {self.corrupt}: set aside as {aside.name}; artifacts that still verify "
                 "are reused")
            self.corrupt = None
        return self

    def in_use(self) -> bool:
        """Whether a process holds this run's lock now (a stage marked running without one was interrupted)."""
        if self._lock_handle is not None:
            return True
        try:
            with open(self.path / ".lock", "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def __exit__(self, *exc) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # --- manifest -----------------------------------------------------------------------------------

    def save(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def reload(self) -> None:
        """Read the manifest from disk, when there is one (again: a follower, after rank 0 has updated it)."""
        if (self.path / MANIFEST).exists():
            self.manifest, self.corrupt = self._read_manifest()

    def stage(self, name: str) -> dict:
        return self.manifest["stages"].setdefault(name, {"status": "pending", "artifacts": {}})

    def set_config(self, config: dict, versions: dict[str, str]) -> None:
        self.manifest["config"] = config
        self.manifest["versions"] = versions

    def begin_stage(self, name: str, config_hash: str, keep_previous: bool = False) -> bool:
        """Mark a stage running under ``config_hash``; returns True when earlier artifacts of the same
        hash can be kept (resume), False when the config changed and they were discarded — or, with
        ``keep_previous`` (exports: a user's deliverables), moved to the record's ``previous`` list, still on
        disk and verifiable."""
        record = self.stage(name)
        resume = record.get("hash") == config_hash
        if not resume:
            for relative, digest in record.get("artifacts", {}).items():
                if keep_previous and (self.path / relative).is_file():
                    record.setdefault("previous", {})[relative] = digest
                else:
                    (self.path / relative).unlink(missing_ok=True)
            record["artifacts"] = {}
        record.update(hash=config_hash, status="running", started=time.time())
        record.pop("finished", None)
        self.save()
        return resume

    def finish_stage(self, name: str, seconds: float, **extra: object) -> None:
        record = self.stage(name)
        record.update(status="done", seconds=round(seconds, 3), finished=time.time(), **extra)
        self.save()

    def is_current(self, name: str, config_hash: str) -> bool:
        record = self.manifest["stages"].get(name)
        return bool(record) and record.get("hash") == config_hash and record.get("status") == "done"

    # --- artifacts ----------------------------------------------------------------------------------

    def artifact_ok(self, stage: str, relative: str) -> bool:
        """Whether the artifact exists and matches the checksum the manifest recorded."""
        expected = self.stage(stage)["artifacts"].get(relative)
        return expected is not None and self._sha256(relative) == expected

    def _sha256(self, relative: str) -> str | None:
        """The file's sha256 (None when it is missing), hashed once per process while the file stays the same
        (size, modification time, inode): stages check and read the same artifacts many times, and a streamed
        validation reads every block's artifact at every denoising step."""
        path = self.path / relative
        try:
            info = path.stat()
        except OSError:
            return None
        identity = (info.st_size, info.st_mtime_ns, info.st_ino)
        known = self._digests.get(relative)
        if known is None or known[0] != identity:
            known = self._digests[relative] = (identity, sha256_file(path))
        return known[1]

    def broken_artifacts(self, stage: str) -> list[str]:
        return [relative for relative in self.stage(stage)["artifacts"] if not self.artifact_ok(stage, relative)]

    def write(self, stage: str, relative: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
        """Write a safetensors artifact atomically, sealed with its stage's config hash, then record its
        checksum (manifest last)."""
        seal = f"{stage}:{self.stage(stage)['hash']}"
        self._record(stage, relative, write_tensors(self.path / relative, tensors, metadata, seal))

    def adopt(self, stage: str) -> int:
        """Record the stage's files that are on disk but not in the manifest (a manifest set aside as corrupt,
        a crash between a write and its record) when they carry the stage's current seal and their data
        verifies; returns how many were adopted."""
        record, adopted = self.stage(stage), 0
        for path in sorted((self.path / stage).glob("*.safetensors")):
            relative = f"{stage}/{path.name}"
            if relative in record["artifacts"]:
                continue
            digest = sealed_sha256(path, f"{stage}:{record['hash']}")
            if digest is not None:
                record["artifacts"][relative] = digest
                adopted += 1
        if adopted:
            self.save()
        return adopted

    @contextmanager
    def writer(self, stage: str, relative: str, layout, metadata: dict[str, str] | None = None):
        """A safetensors artifact written tensor by tensor (:class:`TensorFileWriter`): it appears, and is
        recorded, when the block ends without an error."""
        with TensorFileWriter(self.path / relative, layout, metadata) as writer:
            yield writer
            digest = writer.close()
        self._record(stage, relative, digest)

    def write_file(self, stage: str, relative: str, data: bytes) -> None:
        atomic_write_bytes(self.path / relative, data)
        self._record(stage, relative, sha256_bytes(data))

    def link_file(self, stage: str, relative: str, source: Path) -> None:
        """Place ``source`` at ``relative`` as a hard link (a copy across file systems), recorded with its
        sha256 like a written artifact: an export's unchanged base files cost no disk."""
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.linking")
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
        except OSError:
            shutil.copyfile(source, partial)
        os.replace(partial, target)
        self._record(stage, relative, sha256_file(target))

    def discard(self, stage: str, relative: str) -> None:
        """Remove an artifact and its record (a file a newer export no longer has)."""
        (self.path / relative).unlink(missing_ok=True)
        self.stage(stage)["artifacts"].pop(relative, None)
        self.stage(stage).get("previous", {}).pop(relative, None)
        self.save()

    def _record(self, stage: str, relative: str, digest: str) -> None:
        self.stage(stage)["artifacts"][relative] = digest
        self.stage(stage).get("previous", {}).pop(relative, None)  # rewritten: no longer a previous file
        self.save()
        fault_point(stage, len(self.stage(stage)["artifacts"]))

    def read(self, stage: str, relative: str):
        """Tensors and metadata of an artifact, verified against the manifest."""
        self._verify(stage, relative)
        return load_tensors(self.path / relative)

    def read_metadata(self, stage: str, relative: str) -> dict[str, str]:
        """The metadata of an artifact, verified against the manifest, without loading its tensors."""
        self._verify(stage, relative)
        return load_metadata(self.path / relative)

    def _verify(self, stage: str, relative: str) -> None:
        expected = self.manifest["stages"].get(stage, {}).get("artifacts", {}).get(relative)
        if expected is None:
            raise CorruptArtifactError(f"{self.path / relative} was never recorded by stage {stage}")
        digest = self._sha256(relative)
        if digest is None:
            raise CorruptArtifactError(f"{self.path / relative} is missing")
        if digest != expected:
            raise CorruptArtifactError(f"{self.path / relative} does not match its checksum (truncated or altered)")


class FollowerRun(Run):
    """A run directory as ranks other than 0 of a distributed run use it: they write their blocks' artifacts
    (sealed, atomically) and keep their checksums in memory; rank 0 holds the lock, writes the manifest and
    adopts their files (:meth:`Run.adopt`) once they are done. It is never entered: the lock is rank 0's."""

    def save(self) -> None:
        pass


WORLD_TOKEN = ".world"


@contextmanager
def opened(path: Path, world: World):
    """The run directory for this process, as a context: locked by this process alone, or in a distributed run
    locked by rank 0 and followed by the others — after every rank has checked that it sees the same
    directory (multi-node runs need a filesystem every rank shares).

    Raises:
        BadInputError: on every rank, when any rank cannot open the directory (locked, not writable, another
            directory than rank 0's).
    """
    if world.size == 1:
        with Run(path) as run:
            yield run
        return
    leader, error, token = None, None, None
    if world.leader:
        try:
            leader = Run(path).__enter__()
            token = os.urandom(16).hex()
            atomic_write_bytes(Path(path) / WORLD_TOKEN, token.encode())
        except SvdqError as failure:
            error = str(failure)
    try:
        world.agree(error, "opening the run directory")
        token = world.exchange(token, "opening the run directory")[0]
        if not world.leader and _read_token(Path(path) / WORLD_TOKEN, token) != token:
            error = (f"sees no run directory {path} of rank 0's: the run directory must be on a filesystem "
                     "every rank shares")
        world.agree(error, "opening the run directory")
        yield leader if world.leader else FollowerRun(path)
    finally:
        if leader is not None:
            leader.__exit__(None, None, None)


def _read_token(path: Path, expected: str, wait: float = 5.0) -> str | None:
    """The token in ``path``, polled for up to ``wait`` seconds until it is ``expected`` (a network filesystem
    may show another machine's new file late); None when there is none."""
    deadline = time.monotonic() + wait
    while True:
        try:
            seen = path.read_text()
        except OSError:
            seen = None
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)
