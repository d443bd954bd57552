"""Every CUDA source compiles with nvcc for sm_80, sm_86, sm_89 and sm_90, and its kernels do not spill.

CuPy compiles through NVRTC at run time and needs a device; nvcc needs none, so this runs everywhere nvcc
is installed (the project's machines have it) and skips cleanly elsewhere.
"""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from svdq_cli.system.resources import data_dir

ARCHES = ("80", "86", "89", "90")
SOURCES = sorted(data_dir("kernels").glob("*.cu"))
NVCC = shutil.which("nvcc")


def compile_source(source, arch, out_dir):
    command = [NVCC, "-std=c++17", "-cubin", f"-arch=sm_{arch}", "-DSVDQ_INSTANTIATE", "-Xptxas", "-v",
               "-o", str(out_dir / f"{source.stem}.sm_{arch}.cubin"), str(source)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_kernel_compiles_for_every_arch_without_spills(tmp_path):
    assert {s.name for s in SOURCES} >= {"quantize_lora_down.cu", "w4a4_gemm.cu"}
    jobs = [(source, arch) for source in SOURCES for arch in ARCHES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: compile_source(*job, tmp_path), jobs))
    for (source, arch), result in zip(jobs, results, strict=True):
        assert result.returncode == 0, f"{source.name} sm_{arch}:\n{result.stderr[-3000:]}"
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
        assert spills, f"{source.name} sm_{arch}: no ptxas report\n{result.stderr[-2000:]}"
        assert all(s == ("0", "0") for s in spills), f"{source.name} sm_{arch} spills: {spills}"
