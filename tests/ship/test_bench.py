import json

import torch

from svdq_cli.ship.bench import kernel_bench
from tests.conftest import svdq


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


def test_emulated_bench_counts_what_the_kernels_move_and_compute(monkeypatch):
    from svdq_cli.runtime.cost_model import GPUS, ideal_bytes
    from svdq_cli.ship import bench

    m, k, n, rank = 37, 256, 200, 16
    result = bench.emulated_kernel_bench(m, rank, torch.bfloat16, shapes=((k, n),))
    assert result["note"].startswith("MODEL, not a measurement")
    row = result["rows"][0]
    ideal = ideal_bytes(m, n, k, rank)
    for name, gpu in GPUS.items():
        figures = row["gpus"][name]
        gemm, quantize = figures["gemm"], figures["quantize"]
        # Exact counts: one mma per (m16, n8) tile and group of 64 on sm_89, two on Hopper's int8 path.
        tiles = (128 // 16) * (256 // 8) * (k // 64)  # M padded to 128, N to 256
        assert gemm["mma"] == ({"m16n8k64.s4": tiles} if gpu.capability == (8, 9) else {"m16n8k32.s8": 2 * tiles})
        assert gemm["ideal_bytes"] == sum(ideal["gemm"].values())
        assert quantize["unique_bytes"] >= sum(ideal["quantize"].values()) - ideal["quantize"]["lora_down"]
        assert gemm["requested_bytes"] >= gemm["unique_bytes"] > 0
        assert gemm["estimate_us"] <= gemm["no_reuse_us"]
        assert 0 < figures["branch_bytes_over_gemm_bytes"] < 1
    monkeypatch.setattr(bench, "FLUX_SHAPES", ((k, n),))
    code, stdout, stderr = svdq("bench", "--emulate", "--m", str(m), "--rank", str(rank))
    assert code == 0, stderr
    assert "MODEL, not a measurement" in stdout and "RTX 4090" in stdout and "H100 SXM" in stdout
    assert stdout.count("256×200") == 6  # two kernels and a summary line per GPU
