"""``svdq eval`` end to end on the tiny model: the report's figures are the ones its PNGs give, an interrupted
evaluation resumes image by image, damaged images are generated again, every metric runs (stand-in networks),
and bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from svdq_cli.evaluation import metrics
from svdq_cli.evaluation.images import ImageStore, read_png
from svdq_cli.run.directory import FAULT_VARIABLE
from svdq_cli.ship.hub import plan_upload
from tests.conftest import svdq

from . import fakes
from .stand_ins import PooledLinearFeatures, inject_image_reward, inject_lpips, tiny_clip

BUILTIN = ("--benchmark", "builtin:validation")


def evaluation(run) -> dict:
    return next(iter(json.loads((run / "eval" / "report.json").read_text())["evaluations"].values()))


def pngs(run) -> dict:
    """Every evaluation image: relative path → (inode, modification time)."""
    return {str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((run / "eval" / "images").rglob("*.png"))}


def test_eval_reports_what_its_images_give_and_a_rerun_generates_nothing(run_copy):
    code, stdout, stderr = svdq("eval", run_copy, *BUILTIN, "--num-samples", 2, "--baselines", "rtn", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert list(result["methods"]) == ["16-bit", "svdquant", "rtn"] and result["samples"] == 2
    assert result["metrics"] == ["psnr", "ssim"]  # the others need downloads, which this machine cannot make
    assert "no real images" in result["skipped"]["fid"] and "svdq[eval]" in result["skipped"]["image-reward"]
    assert result["methods"]["16-bit"]["psnr"] is None
    entry = evaluation(run_copy)
    for method in ("svdquant", "rtn"):  # recompute PSNR from the files, in float64
        values = []
        for ours, reference in zip(entry["files"][method], entry["files"]["16-bit"], strict=True):
            a = read_png(run_copy / entry["folders"][method] / ours).double() / 255
            b = read_png(run_copy / entry["folders"]["16-bit"] / reference).double() / 255
            values.append(float(10 * torch.log10(1 / (a - b).pow(2).mean())))
        assert result["methods"][method]["psnr"] == pytest.approx(sum(values) / 2, rel=1e-6)
        assert 20 < result["methods"][method]["psnr"] < 100 and 0 < result["methods"][method]["ssim"] <= 1
    report = (run_copy / "eval" / "report.md").read_text()
    assert "| model | PSNR vs 16-bit (dB) ↑ | SSIM vs 16-bit ↑ |" in report and "| 16-bit | — | — |" in report
    with Image.open(run_copy / "eval" / "grid.png") as grid:
        assert grid.width == 3 * 64  # 16-bit | svdquant | rtn
    before = pngs(run_copy)
    assert len(before) == 6
    code, stdout, stderr = svdq("eval", run_copy, *BUILTIN, "--num-samples", 2, "--baselines", "rtn", "--json")
    assert code == 0, stderr
    assert pngs(run_copy) == before and json.loads(stdout)["methods"] == result["methods"]
    assert "generating" not in stderr
    code, stdout, _ = svdq("status", run_copy, "--json")
    row = next(row for row in json.loads(stdout)["stages"] if row["stage"] == "eval")
    assert (row["status"], row["artifacts"], row["broken"]) == ("done", 3, [])  # report.json, report.md, grid.png


@pytest.mark.slow
def test_a_killed_evaluation_resumes_at_the_next_image_and_a_damaged_one_is_made_again(run_copy):
    args = [sys.executable, "-m", "svdq_cli", "eval", str(run_copy), *BUILTIN, "--num-samples", "3"]
    # No timeout: on a loaded machine a slow run is not a failure (the work is bounded by the tiny model).
    killed = subprocess.run(args, capture_output=True, text=True, env={**os.environ, FAULT_VARIABLE: "eval-images:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = pngs(run_copy)
    assert len(first) == 2 and not (run_copy / "eval" / "report.json").exists()
    code, _, stderr = svdq("eval", run_copy, *BUILTIN, "--num-samples", 3)
    assert code == 0, stderr
    after = pngs(run_copy)
    assert len(after) == 6 and all(after[path] == first[path] for path in first)  # kept, not rewritten
    damaged = run_copy / sorted(after)[0]
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[: len(intact) // 2])
    code, _, stderr = svdq("eval", run_copy, *BUILTIN, "--num-samples", 3)
    assert code == 0 and "is damaged" in stderr
    assert damaged.read_bytes() == intact  # the same seed gives the same image


def test_every_metric_runs_on_a_benchmark_with_real_images(run_copy, tmp_path, gen, monkeypatch):
    monkeypatch.setattr(metrics, "inception", lambda: PooledLinearFeatures(gen))
    inject_lpips(monkeypatch)
    inject_image_reward(monkeypatch)
    clip = tiny_clip(tmp_path / "clip")
    benchmark = fakes.mjhq(tmp_path / "mjhq")
    reads = []
    original = ImageStore.read
    monkeypatch.setattr(ImageStore, "read", lambda store, method, key: reads.append(method) or original(
        store, method, key))
    code, stdout, stderr = svdq("eval", run_copy, "--benchmark", f"mjhq:{benchmark}", "--num-samples", 3,
                                "--metrics", ",".join(metrics.ALL), "--clip-model", clip, "--json")
    assert code == 0, stderr
    # each image once for the scores of every method, once more for the grid's 3 rows
    assert reads.count("16-bit") == 3 + 3 and reads.count("svdquant") == 3 + 3
    result = json.loads(stdout)
    assert result["metrics"] == list(metrics.ALL) and not result["skipped"]
    quantized, reference = result["methods"]["svdquant"], result["methods"]["16-bit"]
    assert all(isinstance(quantized[name], float) for name in metrics.ALL)
    assert all(reference[name] is None for name in metrics.AGAINST_16BIT)
    assert reference["fid"] >= 0 and reference["image-reward"] > 0 and 0 <= reference["clip"] <= 100
    with Image.open(run_copy / "eval" / "grid.png") as grid:
        assert grid.width == 3 * 64  # real | 16-bit | svdquant
    upload = plan_upload(run_copy, "me/tiny-flux-svdq")
    assert "## Evaluation" in upload.card and "| svdquant |" in upload.card
    assert upload.card.index("## Evaluation") < upload.card.index("## Use")
    assert {"eval/report.md", "eval/report.json", "eval/grid.png"} <= set(upload.files)


def test_eval_bad_input_is_one_line(run_copy, monkeypatch):
    def fails(*args, code=2):
        result, _, stderr = svdq("eval", run_copy, *args)
        assert result == code and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
        return stderr

    assert "choose from fid" in fails(*BUILTIN, "--metrics", "psnr,fdi")
    assert "has no real images" in fails(*BUILTIN, "--metrics", "fid")
    assert "does not hold MJHQ-30K" in fails("--benchmark", f"mjhq:{run_copy}")
    benchmark = fakes.mjhq(run_copy.parent / "mjhq")
    assert "at least 2 samples" in fails("--benchmark", f"mjhq:{benchmark}", "--num-samples", 1, "--metrics", "fid")
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    assert "image-reward package" in fails(*BUILTIN, "--metrics", "image-reward", code=1)
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["stages"]["quantize"]["status"] = "running"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "not quantized yet (quantize" in fails(*BUILTIN)
