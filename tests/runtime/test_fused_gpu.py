"""The fused kernels on a real GPU (skipped without one): the same checks as on the CPU emulator, at FLUX
shapes, and the hardware's output against the emulator's for the same layer and input."""

import pytest
import torch

from svdq_cli.runtime import kernels
from tests.runtime.kernel_checks import check_activations, check_gemm, make_input, make_layer

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

SHAPES = [(77, 3072, 3072), (4608, 3072, 12288), (1, 12288, 3072), (4096, 3072, 9216), (333, 15360, 3072)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("rank", [0, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["signed", "unsigned"])
def test_fused_matches_reference(gen, m, k, n, rank, dtype, act):
    layer = make_layer(k, n, rank, dtype, act, gen).cuda()
    x = make_input(m, k, act, dtype, gen).cuda()
    assert kernels.fused_unsupported(layer, x) is None
    check_activations(layer, x, kernels.cuda_backend())
    check_gemm(layer, x, kernels.cuda_backend())
    torch.cuda.synchronize()


def test_hardware_agrees_with_the_emulator(gen):
    from svdq_cli.runtime.emulator.backend import EmulatedBackend

    layer = make_layer(3072, 3072, 32, torch.bfloat16, "signed", gen)
    x = make_input(77, 3072, "signed", torch.bfloat16, gen)
    emulated = kernels.fused_forward(layer, x, backend=EmulatedBackend(torch.cuda.get_device_capability()))
    hardware = kernels.fused_forward(layer.cuda(), x.cuda()).cpu()
    differing = (emulated.view(torch.int16) != hardware.view(torch.int16)).float().mean().item()
    print(f"elements differing between the GPU and the emulator: {differing:.2e}")
    assert differing < 1e-3  # fma contraction by nvcc may move a few roundings; codes and sums are exact
