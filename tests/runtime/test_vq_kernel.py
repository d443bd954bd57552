"""kernels/vq_gemm.cu executed on the CPU emulator through the glue a GPU uses (kernels.vq_forward), against a
float64 reference of the VQLinear's decoded weight, on fresh random inputs at shapes that are not tile
multiples, outputs poisoned first; and what the checked build counts (MMAs, bytes) against the tiling."""

import importlib.util

import pytest
import torch

from svdq_cli.runtime import kernels
from svdq_cli.runtime.emulator.backend import EmulatedBackend, EmulatorUnavailable, toolchain
from svdq_cli.runtime.vq_linear import VQLinear

try:
    toolchain()
except EmulatorUnavailable as missing:
    pytest.skip(str(missing), allow_module_level=True)

UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp of the output dtype, relative
SHAPES = ((1, 72, 64), (77, 136, 96), (130, 40, 256))  # M, N, K


@pytest.fixture(scope="module")
def backend():
    return EmulatedBackend((8, 9), checked=True, threads=2)


def make_vq_layer(n, k, bits, dtype, gen, bias=True, dim=4):
    codewords = 1 << (dim * bits)
    codebook = torch.randn(codewords, dim, generator=gen) * 0.1
    assignments = torch.randint(0, codewords, (n, k // dim), generator=gen)
    return VQLinear.from_parts(codebook, assignments, torch.randn(n, generator=gen) if bias else None, bits=bits,
                               dtype=dtype)


def reference(layer, x):
    weight = layer.codebook.double()[layer.assignments().to(layer.codebook.device)]
    weight = weight.reshape(layer.out_features, layer.in_features)
    x = x.to(weight.device)
    y = x.double() @ weight.T
    magnitude = x.double().abs() @ weight.abs().T
    return (y + layer.bias.double() if layer.bias is not None else y), magnitude


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "dim"), [(2, 4), (3, 4), (3, 2)])  # 8-, 12- and 6-bit indices
def test_vq_gemm_matches_a_float64_reference(backend, gen, dtype, bits, dim):
    for m, n, k in SHAPES:
        layer = make_vq_layer(n, k, bits, dtype, gen, bias=m != 1, dim=dim)
        x = torch.randn(m, k, generator=gen).to(dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype)
        y = kernels.vq_forward(layer, x, out=out, backend=backend)
        expected, magnitude = reference(layer, x)
        # products of 16-bit values are exact in float32; the sum rounds in float32, the output once in dtype
        bound = UNIT[dtype] * expected.abs() + 1e-6 * magnitude + 1e-30
        assert torch.isfinite(y).all(), f"{m}×{n}×{k}: unwritten outputs"
        assert ((y.double() - expected).abs() <= bound).all(), f"{m}×{n}×{k}: {(y.double() - expected).abs().max()}"


def test_vq_gemm_counts_its_mmas_and_its_traffic_against_the_tiling(backend, gen):
    m, n, k = 77, 136, 96
    layer = make_vq_layer(n, k, 2, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    backend.launches.clear()
    kernels.vq_forward(layer, x, backend=backend)
    record = backend.launches[-1]
    tiles_m, tiles_n = -(-m // 64), -(-n // 64)
    assert record.grid[:2] == (tiles_n, tiles_m)
    # 4 warps × 8 n8 tiles × K/16 k-steps per block, all of them m16n8k16
    assert sum(record.mma.values()) == tiles_m * tiles_n * 4 * 8 * (k // 16)
    arguments = record.arguments
    assert arguments["codes"]["unique_load"] == layer.codes.numel()  # every packed index byte is needed…
    assert arguments["codes"]["load"] == tiles_m * layer.codes.numel()  # …once per row tile (8-bit indices)
    assert arguments["x"]["load"] == tiles_n * x.numel() * 2  # x once per column tile
    assert arguments["codebook"]["load"] == tiles_m * tiles_n * layer.codebook.numel() * 2  # staged once per block
    assert arguments["y"]["store"] == arguments["y"]["unique_store"] == m * n * 2  # y written once


def test_the_layer_dispatches_to_the_kernel_under_the_emulator_and_explains_fallbacks(gen):
    layer = make_vq_layer(40, 64, 2, torch.bfloat16, gen)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    with kernels.emulated(EmulatedBackend((8, 9), threads=2)) as tally:
        fused = layer(x)
        layer.float()(x.float())  # float32: no 16-bit kernel
    assert tally["fused"] == 1
    assert any("dtype" in reason for reason in tally if reason != "fused")
    assert torch.allclose(fused.float(), layer.reference_forward(x.float()).float(), rtol=2e-2, atol=2e-2)
    odd = make_vq_layer(8, 40, 2, torch.bfloat16, gen)  # K = 40: not a multiple of the kernel's step of 32
    assert "steps K" in kernels.vq_unsupported(odd, torch.randn(2, 40).to(torch.bfloat16), EmulatedBackend((8, 9)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None,
                    reason="no CUDA device or CuPy")
@pytest.mark.parametrize(("m", "k", "n"), [(77, 3072, 3072), (4608, 3072, 12288), (333, 12288, 3072)])
def test_vq_gemm_on_a_gpu_matches_the_reference_and_the_emulator(gen, m, k, n):
    layer = make_vq_layer(n, k, 2, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    layer.cuda()
    hardware = kernels.vq_forward(layer, x.cuda(), out=torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda"))
    expected, magnitude = reference(layer, x)  # float64 on the GPU
    assert ((hardware.double() - expected).abs() <= UNIT[torch.bfloat16] * expected.abs() + 1e-6 * magnitude).all()
    hardware = hardware.cpu()
    if m <= 333:  # the emulator at FLUX widths takes a while on a CPU
        emulated = kernels.vq_forward(layer.cpu(), x, backend=EmulatedBackend(torch.cuda.get_device_capability()))
        differing = (emulated.view(torch.int16) != hardware.view(torch.int16)).float().mean().item()
        assert differing < 1e-3  # summation order inside the hardware mma may move a few last bits
