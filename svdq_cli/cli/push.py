"""``svdq push-to-hub RUN REPO_ID``: publish a run's export with a generated model card."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import BadInputError
from .common import (
    JsonOpt,
    RunDirArg,
    out,
)


def push_to_hub(
    run_dir: RunDirArg,
    repo_id: Annotated[str, typer.Argument(help="namespace/name on the Hugging Face Hub.")],
    private: Annotated[bool, typer.Option(metavar="", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (default: main).")] = None,
    create_pr: Annotated[bool, typer.Option(metavar="", help="Open a pull request instead of committing.")] = False,
    dry_run: Annotated[bool, typer.Option(metavar="", help="Print the files and the card; upload nothing.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN or the cached login); "
                                                   "never printed or stored.")] = None,
    force: Annotated[bool, typer.Option(metavar="", help="Publish even if validation failed or never ran.")] = False,
    format: Annotated[str, typer.Option(help="svdq (the single-file export) or diffusers (the pipeline directory "
                                             "of `svdq export --format diffusers`: a repo "
                                             "DiffusionPipeline.from_pretrained opens).")] = "svdq",
    as_json: JsonOpt = False,
) -> None:
    """Upload the export, a generated model card and the resolved recipe in one commit."""
    from ..ship.hub import describe, plan_upload, push

    if format not in ("svdq", "diffusers"):
        raise BadInputError(f"--format {format!r} is unknown (available: svdq, diffusers)")
    upload = plan_upload(run_dir, repo_id, force, format)
    summary = {"repo_id": repo_id, "dry_run": dry_run, **describe(upload)}
    if not dry_run:
        summary["url"] = push(upload, repo_id, token, private, revision, create_pr)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print("files: " + ", ".join(summary["files"]))
    if dry_run:
        print(upload.card)
        out.print("dry run: nothing was uploaded")
    else:
        out.print(f"uploaded: {summary['url']}")
