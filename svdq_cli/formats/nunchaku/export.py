"""``svdq export RUN --format nunchaku``: a run's export rewritten as the checkpoint Nunchaku loads.

:mod:`.layout` packs tensors into Nunchaku's fragment orders; :mod:`.flux` maps, fuses and splits the Flux
layers. This module reads the run's verified svdq export and records the result as an export artifact, so a
later change that re-runs the export stage also removes a stale Nunchaku file.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ...errors import BadInputError
from ...system.files import CorruptArtifactError, safetensors_bytes
from ...system.progress import warn
from ..svdq_file import read_metadata
from .flux import check_supported, convert

__all__ = ["check_run", "export_run"]


def check_run(config: dict) -> None:
    """Refuse, before any stage runs, a run whose export Nunchaku could not load (config: the resolved recipe)."""
    try:
        check_supported(config)
    except ValueError as error:
        raise BadInputError(str(error)) from None


def verified_export(run) -> Path:
    """The run's svdq export, which the other formats are written from, checked against its checksum."""
    record = run.stage("export")
    relative = record.get("file")
    if record.get("status") != "done" or relative is None:
        raise BadInputError(f"{run.path} has no finished export; run `svdq export {run.path}` first")
    if not run.artifact_ok("export", relative):
        raise CorruptArtifactError(f"{run.path / relative} does not match its checksum; run `svdq export` again")
    return run.path / relative


def export_run(run, uniform_rank: bool = True) -> dict[str, object]:
    """Convert the run's svdq export into ``export/nunchaku/<same name>``; returns what was written."""
    source = verified_export(run)
    try:
        conversion = convert(load_file(str(source)), read_metadata(source), uniform_rank)
    except ValueError as error:
        raise BadInputError(f"{source.name}: {error}") from None
    target = f"export/nunchaku/{source.name}"
    data = safetensors_bytes(conversion.tensors, conversion.metadata)
    run.write_file("export", target, data)
    for line in conversion.summary["engine_warnings"]:
        warn(f"nunchaku: {line}")
    return {"file": target, "bytes": len(data), **conversion.summary}
