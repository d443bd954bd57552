"""`svdq quantize` across processes with torch.distributed (gloo on the CPU): two ranks give the one-process
artifacts, validation report and export byte for byte, a dead rank ends the others with one line and the
re-run resumes, and ranks that disagree stop before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from svdq_cli.errors import SvdqError
from svdq_cli.run.directory import Run
from svdq_cli.stages import runner
from tests.conftest import svdq


def _env(**extra: str) -> dict[str, str]:
    """This environment without a torchrun's rank variables. No time limits: a dead rank is detected by its
    closed connections, and a hang ends at the collective timeout's default."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **extra}


def torchrun(*args, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m svdq_cli ARGS`` (torch.distributed.run is torchrun)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "svdq_cli", *map(str, args)]
    return subprocess.run(command, env=_env(**env), capture_output=True, text=True)


def ranks(per_rank: list[list], **env: str) -> list[subprocess.CompletedProcess]:
    """One process per rank started by hand, as torchrun would, each with its own arguments."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, "-m", "svdq_cli", *map(str, args)], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(per_rank)),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env))
                 for rank, args in enumerate(per_rank)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate()
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def artifacts(run: Path) -> dict[str, bytes]:
    """Every artifact the manifest lists, verified, by path."""
    manifest = Run.existing(run)
    files = {}
    for stage in ("collect", "smooth", "svd", "quantize", "validate", "export"):
        assert manifest.broken_artifacts(stage) == []
        files.update({name: (run / name).read_bytes() for name in manifest.stage(stage)["artifacts"]})
    return files


def test_two_ranks_write_the_one_process_run_byte_for_byte(run_copy, recipe_file, tmp_path):
    """Every artifact — collect to quantize, the validation report and images, the export — of a 2-rank run
    equals one process's. Two validation prompts, so that both ranks generate."""
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy, "--val-prompts", 2)
    assert code == 0, stderr
    run = tmp_path / "two"
    done = torchrun("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run, "--val-prompts", 2, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing on stdout
    assert summary["stages"]["collect"]["exchanged_bytes"] > 0
    assert "[rank 1/2] validate: 1/1" in done.stderr  # the ranks shared the validation prompts
    mine, reference = artifacts(run), artifacts(run_copy)
    assert sorted(mine) == sorted(reference)
    assert {"validate/report.json", "validate/comparison.png"} <= set(mine)
    assert any(name.startswith("export/") for name in mine)
    for name, data in reference.items():
        assert mine[name] == data, name


@pytest.mark.parametrize(("killed", "stage"), [(1, "quantize"), (0, "smooth")])
def test_a_dead_rank_ends_the_others_with_one_line_and_the_rerun_resumes(finished_run, recipe_file, tmp_path,
                                                                        killed, stage):
    """Rank 1 dies after its first quantize block, or rank 0 (which also hosts the rendezvous store) after its
    first smooth block: the survivor says so in one line, and torchrun again resumes to the same export."""
    run = tmp_path / "killed"
    args = ["quantize", "tiny-flux", "--recipe", recipe_file, "--out", run]
    results = ranks([args, args], SVDQ_FAULT_AFTER=f"{stage}:1", SVDQ_FAULT_RANK=str(killed))
    survivor = results[1 - killed]
    assert results[killed].returncode == -9
    assert survivor.returncode == 1, survivor.stderr
    errors = [line for line in survivor.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "another rank died" in errors[0] and "re-run" in errors[0], survivor.stderr
    assert "Traceback" not in survivor.stderr
    again = torchrun(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["stages"][stage]["status"] == "resumed"
    export = next((finished_run / "export").glob("*.safetensors"))
    assert (run / "export" / export.name).read_bytes() == export.read_bytes()


@pytest.mark.parametrize(("extra", "says"), [
    (["--num-prompts", "3"], "rank 1's config, library versions or view of the run differs from rank 0's"),
    (["--out", "elsewhere"], "the run directory must be on a filesystem every rank shares"),
])
def test_ranks_that_disagree_stop_before_any_work(recipe_file, tmp_path, extra, says):
    run = tmp_path / "run"
    args = ["quantize", "tiny-flux", "--recipe", recipe_file, "--out", run]
    other = [*args, *extra]
    if "--out" in extra:
        other[other.index("elsewhere")] = tmp_path / "elsewhere"
    results = ranks([args, other])
    for result in results:
        assert result.returncode == 2, result.stderr
        assert says in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr
    assert not (run / "collect").exists()


def test_only_quantize_runs_on_several_ranks(finished_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, stderr = svdq("status", finished_run)
    assert code == 2 and "only `svdq quantize`" in stderr
    code, _, stderr = svdq("quantize", "tiny-flux", "--device", "cuda:1")
    assert code == 2 and "each rank takes its own GPU" in stderr


def test_rank_0_adopts_the_other_ranks_blocks_and_refuses_missing_ones(run_copy, monkeypatch):
    """What rank 0 does at the end of a shared stage: record block files it did not write (sealed, verified),
    and stop with one line, not a half-finished stage, when one never appears."""
    monkeypatch.setattr(runner, "ADOPT_WAIT", 0.0)
    run = Run(run_copy)
    blocks = len(run.stage("svd")["artifacts"])
    del run.stage("svd")["artifacts"]["svd/block-002.safetensors"]  # written by another rank: not recorded yet
    runner._adopt_blocks(run, "svd", blocks)
    assert run.artifact_ok("svd", "svd/block-002.safetensors")
    (run_copy / "svd" / "block-001.safetensors").unlink()
    with pytest.raises(SvdqError, match="block-001.*filesystem every rank shares"):
        runner._adopt_blocks(run, "svd", blocks)


@pytest.mark.slow
def test_two_ranks_share_an_evaluation_and_make_the_one_process_images(run_copy, tmp_path):
    """`svdq eval` under torchrun: prompt i on rank i mod 2, each rank writing its own PNGs, rank 0 scoring —
    the same images, byte for byte, and the same report figures as one process."""
    import shutil

    alone = tmp_path / "alone"
    shutil.copytree(run_copy, alone)
    args = ("--benchmark", "builtin:validation", "--num-samples", 3, "--json")
    code, stdout, stderr = svdq("eval", alone, *args)
    assert code == 0, stderr
    done = torchrun("eval", run_copy, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout)  # one JSON document: rank 0's
    assert shared["methods"] == json.loads(stdout)["methods"]
    images = sorted((alone / "eval" / "images").rglob("*.png"))
    assert len(images) == 6
    for path in images:
        assert (run_copy / path.relative_to(alone)).read_bytes() == path.read_bytes()
