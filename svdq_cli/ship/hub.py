"""Publishing a run on the Hugging Face Hub: the export, a generated model card, the resolved recipe and the
validation picture, in one commit through huggingface_hub. The token comes from huggingface_hub's usual
sources (``--token``, ``HF_TOKEN``, the cached login) and is never printed or written into any file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import BadInputError, SvdqError, gist
from ..evaluation.report import card_section
from ..formats.nunchaku import lite_card, lite_export
from ..formats.svdq_file import read_metadata
from ..methods.registry import get_method
from ..models.registry import ADAPTERS
from ..run.directory import Run
from ..run.gates import failed_gates
from ..system import online

# Licenses of the base models we ship recipes for, so the card can inherit them.
BASE_LICENSES = {
    "black-forest-labs/FLUX.1-dev": {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                                     "license_link": "LICENSE.md"},
    "black-forest-labs/FLUX.1-schnell": {"license": "apache-2.0"},
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": {"license": "openrail++"},
    "stabilityai/stable-diffusion-3-medium-diffusers": {"license": "other",
                                                        "license_name": "stabilityai-ai-community"},
}


TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")  # the shape of a Hugging Face user access token


@dataclass
class Upload:
    """What push-to-hub sends: repo path → local file (or generated text)."""

    files: dict[str, Path]
    card: str
    recipe: str


def plan_upload(run_dir: Path, repo_id: str, force: bool = False, format: str = "svdq") -> Upload:
    """Check the run can be published and build the card and file list (nothing is sent). ``format``:
    ``svdq`` publishes the single-file export, ``diffusers`` the pipeline directory of ``svdq export
    --format diffusers`` (a repo ``DiffusionPipeline.from_pretrained`` opens).

    Raises:
        BadInputError: no export, a validation that failed or never ran (unless ``force``), a bad repo id or
            one that looks like a token, a diffusers directory that was not written or fails its checksums.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if any(TOKEN.fullmatch(part) for part in repo_id.split("/")):  # never echo it: not here, not in the card
        raise BadInputError("the repo id looks like a Hugging Face token (hf_…), which is never printed; pass "
                            "namespace/name as REPO_ID and the token with --token or HF_TOKEN")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BadInputError(f"invalid repo id {repo_id!r}: {str(error).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise BadInputError(f"invalid repo id {repo_id!r}: use namespace/name")
    stages = Run.existing(run_dir).manifest["stages"]
    export = stages.get("export", {})
    if export.get("status") != "done":
        raise BadInputError(f"{run_dir} has no export yet; run `svdq export {run_dir}` first")
    validate = stages.get("validate", {})
    if not force and validate.get("status") != "done":
        raise BadInputError(f"{run_dir} was never validated; run `svdq validate {run_dir}` or pass --force")
    if not force and not validate.get("passed", False):
        report = json.loads((Path(run_dir) / "validate" / "report.json").read_text())
        raise BadInputError(f"{run_dir} failed its validation gates ({failed_gates(report)}); fix the run or pass "
                            "--force")
    export_path = run_dir / export["file"]
    metadata = read_metadata(export_path)
    comparison = run_dir / "validate" / "comparison.png"
    picture = {"comparison.png": comparison} if comparison.is_file() else {}
    recipe = yaml.safe_dump(metadata["recipe"], sort_keys=False)
    evaluation, evaluation_files = _evaluation(run_dir)
    if format == "diffusers":
        files, summary = _lite_directory(run_dir)
        card = lite_card.card(metadata, summary, repo_id)
    else:
        files = {export_path.name: export_path}
        card = model_card(metadata, export_path.name, repo_id, bool(picture))
    return Upload({**files, **picture, **evaluation_files}, _with_section(card, evaluation), recipe)


def _evaluation(run_dir: Path) -> tuple[list[str], dict[str, Path]]:
    """The card section and files of the run's `svdq eval` report, when it has one that verifies."""
    run = Run.existing(run_dir)
    relatives = [r for r in ("eval/report.json", "eval/report.md", "eval/grid.png") if run.artifact_ok("eval", r)]
    if "eval/report.json" not in relatives:
        return [], {}
    document = json.loads((Path(run_dir) / "eval" / "report.json").read_text())
    return card_section(document), {relative: Path(run_dir) / relative for relative in relatives}


def _with_section(card: str, section: list[str]) -> str:
    """The card with the evaluation section before its usage notes (at the end when it has none)."""
    if not section:
        return card
    marker = "\n## Use\n"
    head, found, tail = card.partition(marker)
    return f"{head}\n" + "\n".join(section) + f"{found}{tail}" if found else card + "\n" + "\n".join(section)


def _lite_directory(run_dir: Path) -> tuple[dict[str, Path], dict]:
    """The files of the run's diffusers directory (repo path → local file), each verified against the
    manifest, and what its export did; the card is made anew for the repo."""
    run = Run.existing(run_dir)
    prefix = f"{lite_export.ROOT}/"
    recorded = sorted(relative for relative in run.stage("export")["artifacts"] if relative.startswith(prefix))
    if f"{prefix}{lite_export.SUMMARY}" not in recorded:
        raise BadInputError(f"{run_dir} has no diffusers export; run `svdq export {run_dir} --format diffusers` "
                            "first")
    broken = [relative for relative in recorded if not run.artifact_ok("export", relative)]
    if broken:
        raise BadInputError(f"{run_dir / broken[0]} does not match its checksum ({len(broken)} file(s)); run "
                            f"`svdq export {run_dir} --format diffusers` again")
    summary = json.loads((run_dir / prefix / lite_export.SUMMARY).read_text())
    files = {relative[len(prefix):]: run_dir / relative for relative in recorded if relative != f"{prefix}README.md"}
    return files, summary


def _description(quant: dict) -> tuple[str, str]:
    """What the model card says the quantization is, and how it stores the weights (from the method's traits:
    an RTN or SmoothQuant run is not described as having a low-rank branch)."""
    method = get_method(quant["method"])
    if method.vector:
        return (f"{method.title} {quant['bits']}-bit vector quantization",
                f"sub-vectors of {quant['vq_dim']} weights index one codebook of "
                f"{2 ** (quant['bits'] * quant['vq_dim'])} codewords per layer; activations stay 16-bit")
    bits = "8" if quant["precision"] == "int8" else "4"
    parts = (["smoothing"] if method.smooths else []) + \
        ([f"a rank-{quant['rank']} 16-bit low-rank branch"] if method.low_rank else [])
    weights = f"{bits}-bit weights" + ("" if quant["weight_only"] else " and activations")
    return (f"{method.title} {quant['precision']} quantization",
            f"{', '.join(parts) + ' and ' if parts else ''}{weights} (group {quant['group_size']}"
            f"{', GPTQ' if quant['gptq'] else ''})")


def model_card(metadata: dict, filename: str, repo_id: str, with_picture: bool) -> str:
    """README.md for the Hub: YAML front matter, config summary, validation table, loading snippet."""
    recipe, quant = metadata["recipe"], metadata["quantization_config"]
    base = recipe["model"]
    vector = get_method(quant["method"]).vector
    family = metadata.get("model_config", {}).get("family")
    text = family not in ADAPTERS or ADAPTERS[family].text_conditioned  # DiT takes class labels; the generic, text
    tags = [quant["method"], "svdq", f"vq{quant['bits']}" if vector else quant["precision"]]
    front = {"library_name": "diffusers", **({"pipeline_tag": "text-to-image"} if text else {}),
             "tags": [*tags, "diffusers", *(["text-to-image"] if text else []), "quantized"]}
    if "/" in base and not Path(base).exists():
        front.update(base_model=base, base_model_relation="quantized")
        front.update(BASE_LICENSES.get(base, {}))
    validate = metadata.get("validate", {})
    title, details = _description(quant)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"{title} of `{base}` made with svdq {metadata.get('svdq_version', '')}: {details}.", "",
             "| setting | value |", "|---|---|"]
    keys = ("method", "bits", "vq_dim", "vq_candidates", "vq_steps") if vector else \
        ("method", "precision", "rank", "group_size", "gptq", "weight_only")
    for key in keys:
        lines.append(f"| {key} | {quant[key]} |")
    lines.append(f"| layers quantized | {len(metadata['layers'])} |")
    lines.append("")
    if validate.get("ran"):
        lines += ["## Validation against the 16-bit model", "",
                  "Held-out prompts, same seeds; higher PSNR/SSIM and lower latent error are closer to 16-bit.", "",
                  "| method | PSNR (dB) | SSIM | latent rel. error |", "|---|---:|---:|---:|"]
        for method, values in validate["methods"].items():
            lines.append(f"| {method} | {values['psnr']:.2f} | {values['ssim']:.4f} | {values['latent_error']:.4f} |")
        lines.append("")
    else:
        lines += ["This model was published without validation.", ""]
    if with_picture:
        lines += ["![16-bit | quantized | difference](comparison.png)", ""]
    lines += ["## Use", "", "```python", "from huggingface_hub import hf_hub_download",
              "from svdq_cli import load_quantized_pipeline", "",
              f'path = hf_hub_download("{repo_id}", "{filename}")',
              'pipe = load_quantized_pipeline(path, device="cuda")',
              'image = pipe("a red fox in fresh snow").images[0]' if text else
              "image = pipe(class_labels=[207]).images[0]  # ImageNet class 207, golden retriever", "```", "",
              "The resolved recipe is in `recipe.yaml`.", ""]
    return "\n".join(lines)


def push(upload: Upload, repo_id: str, token: str | None, private: bool, revision: str | None,
         create_pr: bool) -> str:
    """Create the repo if needed and upload everything in one commit; returns the commit URL.

    Raises:
        BadInputError: no token.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = token or get_token()
    if not token:
        raise BadInputError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token")
    if not online.hub_reachable():
        raise SvdqError("cannot reach the Hugging Face Hub (offline?); nothing was uploaded — `--dry-run` shows "
                        "what would be")
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in upload.files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=upload.card.encode()))
    operations.append(CommitOperationAdd(path_in_repo="recipe.yaml", path_or_fileobj=upload.recipe.encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message="Upload svdq quantized model",
                                 revision=revision, create_pr=create_pr, repo_type="model")
    except Exception as error:  # huggingface_hub and its HTTP client raise many types: say which, in one line
        raise SvdqError(f"upload to {repo_id} failed ({type(error).__name__}: {gist(error, 200)}); nothing partial is "
                        "left on the Hub: a commit is all or nothing") from None
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", str(info))


def describe(upload: Upload) -> dict[str, object]:
    return {"files": [*upload.files, "README.md", "recipe.yaml"],
            "bytes": {name: path.stat().st_size for name, path in upload.files.items()},
            "card": upload.card}
