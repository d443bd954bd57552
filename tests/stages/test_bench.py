import json

import torch

from svdq_cli.bench import kernel_bench
from tests.stages.conftest import svdq


def test_kernel_bench_on_cpu_says_gpu_kernels_were_not_measured():
    result = kernel_bench(8, 16, torch.bfloat16, "cpu", 1, shapes=((128, 64), (192, 128)))
    assert "NOT measured" in result["note"]
    assert [(r["K"], r["N"]) for r in result["rows"]] == [(128, 64), (192, 128)]
    for row in result["rows"]:
        assert not row["fused"] and "naive_unfused" not in row["microseconds"]
        assert all(value > 0 for value in row["microseconds"].values()) and row["tflops"] > 0


def test_model_bench_compares_one_step_of_the_export(finished_run):
    code, stdout, stderr = svdq("bench", finished_run, "--json", "--repeats", "2")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["mode"] == "model" and "reference path" in result["note"]
    assert result["quantized"]["weight_bytes"] < result["16bit"]["weight_bytes"]
    assert result["quantized"]["step_milliseconds"] > 0 and result["16bit"]["step_milliseconds"] > 0


def test_bench_bad_input(tmp_path, finished_run):
    code, _, stderr = svdq("bench", "--dtype", "float32")
    assert code == 2 and "--dtype 'float32' is invalid" in stderr
    code, _, stderr = svdq("bench", "--device", "cuda")
    assert code == 2 and "no CUDA device" in stderr
