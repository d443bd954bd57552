"""Shared fixtures. Numeric tests draw fresh random inputs every run; the seed is printed (shown by pytest
on failure) and can be pinned with SVDQ_TEST_SEED=<n> to replay a failure. Pipeline tests share a small
tiny-flux recipe and one finished run per session (per xdist worker), built on first use."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import torch

from svdq_cli.cli.main import main


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("SVDQ_TEST_SEED", secrets.randbits(31)))
    print(f"SVDQ_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


RECIPE = """
model: tiny-flux
family: tiny-flux
dtype: float32
device: cpu
quant: {method: svdquant, precision: int4, rank: 16, calib_rows: 128, search_rows: 64}
calibration: {num_prompts: 2, steps: 2, resolution: 64}
validation: {num_prompts: 1, steps: 2, resolution: 64}
"""


def svdq(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process through main() (the user's error mapping); returns code, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["svdq", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = argv
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="session")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny-test.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, recipe_file) -> Path:
    """One complete tiny-flux run (every stage), made once per session; copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "finished"
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run)
    assert code == 0, stderr
    return run


def failed_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` whose manifest says its validation failed (what gates the export and the upload)."""
    target = tmp_path / "run"
    shutil.copytree(run, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["stages"]["validate"]["passed"] = False
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


@pytest.fixture(scope="session")
def bf16_run(tmp_path_factory) -> Path:
    """A complete tiny-flux run in bfloat16, the dtype Nunchaku runs in."""
    recipe = tmp_path_factory.mktemp("recipe-bf16") / "tiny-bf16.yaml"
    recipe.write_text(RECIPE.replace("dtype: float32", "dtype: bfloat16"))
    run = tmp_path_factory.mktemp("runs") / "bf16"
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe, "--out", run)
    assert code == 0, stderr
    return run
