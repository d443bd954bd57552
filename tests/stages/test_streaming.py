"""Block streaming, text first, cached references and the incremental export (a model larger than memory)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from svdq_cli.models.discovery import block_paths
from svdq_cli.models.registry import ADAPTERS
from svdq_cli.models.streaming import BlockStreamer, component_checkpoint, component_config, empty_model
from svdq_cli.run.directory import FAULT_VARIABLE
from tests.conftest import RECIPE, svdq

STREAM_RECIPE = RECIPE.replace("dtype: float32", "dtype: bfloat16")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """tiny-flux in bfloat16 saved as a diffusers directory (a model on disk can be streamed)."""
    path = tmp_path_factory.mktemp("models") / "tiny-flux-dir"
    ADAPTERS["tiny-flux"].build_tiny(0, torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stream_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "stream.yaml"
    path.write_text(STREAM_RECIPE)  # its model is replaced by the directory given on the command line
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, flux_dir, stream_recipe):
    """The same model and recipe quantized streamed and whole."""
    root = tmp_path_factory.mktemp("runs")
    for mode in ("stream", "no-stream"):
        code, _, stderr = svdq("quantize", flux_dir, "--recipe", stream_recipe, "--out", root / mode, f"--{mode}",
                               "--baselines", "rtn")
        assert code == 0, stderr
        assert ("streaming" in stderr) == (mode == "stream")
    return root


def export_bytes(run) -> bytes:
    (path,) = (run / "export").glob("*.safetensors")
    return path.read_bytes()


def test_a_streamed_run_exports_the_same_bytes_and_reports(runs):
    assert export_bytes(runs / "stream") == export_bytes(runs / "no-stream")
    reports = [json.loads((runs / mode / "validate" / "report.json").read_text()) for mode in ("stream", "no-stream")]
    assert reports[0]["methods"] == reports[1]["methods"]  # svdquant and the rtn baseline, image for image


def test_the_streamed_transformer_computes_what_the_whole_one_does_one_block_at_a_time(flux_dir):
    from diffusers import FluxTransformer2DModel

    whole = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer", dtype=torch.bfloat16).eval()
    model = empty_model(FluxTransformer2DModel, component_config(flux_dir, "transformer"), torch.bfloat16)
    paths = block_paths(model)
    streamer = BlockStreamer(model, component_checkpoint(flux_dir, "transformer"), paths)
    resident = []

    def count(*_):
        resident.append(sum(any(t.device.type != "meta" for t in model.get_submodule(p).parameters()) for p in paths))

    hooks = [model.get_submodule(p).register_forward_pre_hook(count) for p in paths]
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 16, generator=generator).bfloat16(),
              "encoder_hidden_states": torch.randn(1, 8, 64, generator=generator).bfloat16(),
              "pooled_projections": torch.randn(1, 32, generator=generator).bfloat16(),
              "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)}
    with torch.no_grad():
        expected, got = whole(**inputs).sample, model(**inputs).sample
    for hook in hooks:
        hook.remove()
    assert torch.equal(expected, got)
    assert resident == [1] * len(paths)  # hooks registered after the streamer's: the block itself, no other
    assert all(t.device.type == "meta" for p in paths for t in model.get_submodule(p).parameters())
    with streamer.resident(2):
        assert all(t.device.type != "meta" for t in model.get_submodule(paths[2]).parameters())
    assert all(t.device.type == "meta" for t in model.get_submodule(paths[2]).parameters())


def test_revalidating_generates_only_the_quantized_side(runs, monkeypatch, tmp_path):
    import shutil

    from svdq_cli.stages import validate

    run = tmp_path / "run"
    shutil.copytree(runs / "stream", run)
    calls = []
    original = validate.generate
    monkeypatch.setattr(validate, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    code, _, stderr = svdq("validate", run, "--min-psnr", "1", "--baselines", "")
    assert code == 0, stderr
    assert len(calls) == 1  # the 16-bit reference came from the run's cache
    references = list((run / "cache" / "reference").glob("*.safetensors"))
    references[0].write_bytes(references[0].read_bytes()[:-8] + b"\0" * 8)  # damaged: recomputed, not trusted
    code, _, stderr = svdq("validate", run, "--min-psnr", "2", "--baselines", "")
    assert code == 0, stderr
    assert len(calls) == 3


def test_prompts_are_encoded_once_and_a_damaged_encoding_is_recomputed(runs, tmp_path, flux_dir, stream_recipe):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "stream", run)
    encodings = sorted((run / "cache" / "text").glob("*.safetensors"))
    assert len(encodings) == 3  # two calibration prompts and one validation prompt, each encoded once
    originals = {path: path.read_bytes() for path in encodings}
    collect = {path: path.read_bytes() for path in (run / "collect").glob("*.safetensors")}
    for path in encodings:
        path.write_bytes(b"garbage")
    code, _, stderr = svdq("quantize", flux_dir, "--recipe", stream_recipe, "--out", run, "--stream", "--redo",
                           "collect", "--baselines", "rtn")
    assert code == 0, stderr
    assert {path: path.read_bytes() for path in encodings} == originals
    assert {path: path.read_bytes() for path in collect} == collect
    assert export_bytes(run) == export_bytes(runs / "no-stream")


def _peak_anonymous_rss(command: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """Run ``command``; its exit code, peak anonymous RSS (bytes, sampled every 20 ms) and stderr."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(child.stderr.read()))
    reader.start()
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    reader.join()
    return child.returncode, peak, stderr[0]


@pytest.mark.slow
@pytest.mark.scale  # FLUX width on disk, two minutes: `make test-scale` (CI runs it after `make test`)
def test_a_flux_width_model_quantizes_streamed_in_less_memory_than_its_weights(tmp_path):
    """Three double and three single FLUX.1 blocks at full width (2.8 GiB in bf16): every stage, streamed,
    peaks below the size of the 16-bit transformer alone. (Fewer blocks cannot show it: a double block is 0.65
    GiB, and the current block, the next one read ahead and the interpreter are resident at once.)"""
    from svdq_cli.models.shaped import write_flux_shaped

    model = tmp_path / "flux-width"
    size = write_flux_shaped(model, double=3, single=3)
    env = {**os.environ, "SVDQ_WORKERS": "2"}  # the layer temporaries in flight: as on this 2-core machine
    command = [sys.executable, "-m", "svdq_cli", "quantize", str(model), "--out", str(tmp_path / "run"),
               "--stream", "--num-prompts", "1", "--steps", "1", "--resolution", "256", "--val-prompts", "1",
               "--val-steps", "1", "--val-resolution", "256"]
    code, peak, stderr = _peak_anonymous_rss(command, env)
    assert code == 0, stderr[-3000:]
    assert "streaming" in stderr
    assert peak < size, f"peak anonymous RSS {peak / 2**20:.0f} MiB, transformer {size / 2**20:.0f} MiB"
    (export,) = (tmp_path / "run" / "export").glob("*.safetensors")
    loader = [sys.executable, "-c", "import sys; from svdq_cli.formats.svdq_file import load_quantized; "
              "load_quantized(sys.argv[1])", str(export)]
    code, peak, stderr = _peak_anonymous_rss(loader, env)
    assert code == 0, stderr[-3000:]
    assert peak < export.stat().st_size + (400 << 20)  # the file once, plus the interpreter and libraries


@pytest.mark.parametrize("stage,after", [("collect", 1), ("quantize", 2), ("validate", 1), ("export", 1)])
def test_a_killed_streamed_run_resumes_to_the_same_export(runs, flux_dir, stream_recipe, tmp_path, stage, after):
    """SIGKILL after ``after`` artifacts of ``stage`` (text encodings cached, a block half-way, the
    reference cached): the re-run resumes and exports what an uninterrupted streamed run does."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "svdq_cli", "quantize", str(flux_dir), "--recipe", str(stream_recipe),
               "--out", str(run), "--stream", "--baselines", "rtn"]
    fault = {**os.environ, FAULT_VARIABLE: f"{stage}:{after}"}
    killed = subprocess.run(command, capture_output=True, text=True, env=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "streaming" in resumed.stderr
    assert export_bytes(run) == export_bytes(runs / "stream")
