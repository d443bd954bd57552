"""benchmarks/gpu_check.py's own machinery: budgets, failures that never lose other parts' figures, the
report's schema. (`make gpu-check-emulate`, run by CI, drives every part end to end on the CPU emulator.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_part_over_its_budget_keeps_what_it_wrote(gpu_check, tmp_path):
    result = tmp_path / "part.json"
    result.write_text(json.dumps({"rows": [1, 2]}))  # what the part saved before it was stopped
    blocked = child("import threading; threading.Event().wait()")  # never ends: the budget stops it, however slow
    outcome = gpu_check.run_part(blocked, 2, result)
    assert outcome["status"] == "failed" and "over its budget of 2 s" in outcome["error"]
    assert outcome["rows"] == [1, 2] and outcome["budget_seconds"] == 2


def test_a_crashed_part_is_a_failure_with_its_message(gpu_check, tmp_path):
    outcome = gpu_check.run_part(child("import os; os.abort()"), 600, tmp_path / "none.json")
    assert outcome["status"] == "failed" and "exited" in outcome["error"]
    outcome = gpu_check.run_part(child("pass"), 600, tmp_path / "none.json")  # exit 0, but no result written
    assert outcome["status"] == "failed" and outcome["error"] == "the part wrote no result"


def test_a_failing_part_records_its_error(gpu_check, tmp_path, monkeypatch):
    def broken(emulate, result, save):
        result["partial"] = 7
        raise ValueError("the kernel disagreed")

    monkeypatch.setitem(gpu_check.PARTS, "tests", broken)
    gpu_check.run_child("tests", True, tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == {"partial": 7, "status": "failed", "error": "ValueError: the kernel disagreed"}


def test_the_schema_check_can_fail(gpu_check):
    good = {"schema": 1, "mode": "gpu", "machine": {}, "seconds": 1.0, "parts": {
        "kernels": {"status": "passed", "rows": [{"K": 1, "N": 2, "variants": {
            "w4a4": {"us": 3.0, "tflops": 1.0, "gbps": 2.0}}}]}}}
    assert gpu_check.check_report(good) == []
    bad = json.loads(json.dumps(good))
    bad["parts"]["kernels"]["rows"][0]["variants"]["w4a4"]["us"] = None
    bad["parts"]["tests"] = {"status": "failed"}
    del bad["machine"]
    problems = gpu_check.check_report(bad)
    assert "missing machine" in problems and "tests: failed without a message" in problems
    assert "kernels 1x2 w4a4: figures missing" in problems


def test_without_a_gpu_it_says_so_and_exits_0(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--parts", "kernels", "--out", str(tmp_path / "r.json")])
    assert gpu_check.main() == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_the_carried_wheels_cover_what_svdq_imports(gpu_check):
    carried = {line.split("==")[0] for line in gpu_check.carried_requirements()}
    assert {"diffusers", "transformers", "huggingface-hub", "typer", "rich"} <= carried
    assert "torch" not in carried and "numpy" not in carried  # the GPU image's own builds stay


def test_outcomes_are_read_from_partial_output(gpu_check):
    output = ("tests/runtime/test_fused_gpu.py::test_fused_matches_reference[a] PASSED [  1%]\n"
              "tests/runtime/test_fused_gpu.py::test_fused_matches_reference[b] FAILED [  2%]\n"
              "tests/runtime/test_vq_kernel.py::test_vq[c] SKIPPED (no CUDA) [  3%]\n"
              "tests/runtime/test_fused_gpu.py::test_hardware_agrees")  # cut mid-line by the budget
    assert gpu_check.read_outcomes(output)["outcomes"] == {"passed": 1, "failed": 1, "skipped": 1}
    summary = "FAILED tests/runtime/test_fused_gpu.py::test_fused_matches_reference[b] - AssertionError: 3 ulps\n"
    failure = {"test": "tests/runtime/test_fused_gpu.py::test_fused_matches_reference[b]",
               "message": "AssertionError: 3 ulps"}
    assert gpu_check.read_outcomes(summary)["failures"] == [failure]
