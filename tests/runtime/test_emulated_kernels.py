"""The real kernels/*.cu, executed on the CPU emulator through the glue a GPU uses (kernels.fused_forward).

Every instantiated variant — bf16/fp16, rank 0/16/32/64, signed/unsigned activations, the sm_80–89 S4 path
and the Hopper int8 path — on fresh random inputs at shapes that are not tile multiples, outputs poisoned
first: activation codes and scales must equal the reference quantizer's bit for bit, the GEMM must be within
two roundings of SVDQLinear.reference_forward, and the two MMA paths must agree bit for bit.
"""

import itertools

import pytest
import torch

from svdq_cli.runtime import kernels
from svdq_cli.runtime.emulator.backend import EmulatedBackend, EmulatorUnavailable, toolchain
from tests.runtime.kernel_checks import check_activations, check_gemm, make_input, make_layer

try:
    toolchain()
except EmulatorUnavailable as missing:
    pytest.skip(str(missing), allow_module_level=True)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RANKS = (0, 16, 32, 64)
SHAPES = list(itertools.product((1, 37, 77), (64, 136, 200), (128, 256, 512)))  # M, N, K
VARIANTS = list(itertools.product(DTYPES, RANKS, ("signed", "unsigned")))
SM89, SM90 = (8, 9), (9, 0)  # native 4-bit mma, and Hopper's int8 mma on widened codes


@pytest.fixture(scope="module")
def backends():
    """One emulated sm_89 and one sm_90, with every variant compiled in one go per source."""
    pair = {capability: EmulatedBackend(capability, threads=2) for capability in (SM89, SM90)}
    for capability, backend in pair.items():
        s4 = kernels.uses_s4(capability)
        for stem in ("quantize_lora_down", "w4a4_gemm"):
            names = sorted({kernels.kernel_names(DTYPES[d], r, a == "unsigned", s4)[stem] for d, r, a in VARIANTS})
            backend.module(kernels.kernel_source(stem), names, f"{stem}.cu")
    return pair


@pytest.mark.parametrize("dtype,rank,act", VARIANTS)
def test_every_variant_matches_the_reference(backends, gen, dtype, rank, act):
    variant = VARIANTS.index((dtype, rank, act))
    for step in range(2):  # two of the 27 shapes per variant: every shape runs at least twice overall
        m, n, k = SHAPES[(2 * variant + step * 13) % len(SHAPES)]
        layer = make_layer(k, n, rank, DTYPES[dtype], act, gen)
        x = make_input(m, k, act, DTYPES[dtype], gen)
        check_activations(layer, x, backends[SM89])
        s4 = check_gemm(layer, x, backends[SM89])
        int8 = check_gemm(layer, x, backends[SM90])
        assert torch.equal(s4.view(torch.int16), int8.view(torch.int16)), "S4 and int8 paths differ"


def test_the_glue_names_every_template_argument(backends):
    # The name expression is what NVRTC (and the emulator) instantiate: all four template arguments.
    for s4 in (False, True):
        names = kernels.kernel_names(torch.bfloat16, 32, False, s4)
        assert names["w4a4_gemm"] == f"svdq::w4a4_gemm<__nv_bfloat16, 32, false, {'true' if s4 else 'false'}>"
    layer = make_layer(256, 72, 32, torch.bfloat16, "signed", torch.Generator().manual_seed(0))
    x = make_input(3, 256, "signed", torch.bfloat16, torch.Generator().manual_seed(1))
    for backend in backends.values():  # fused_forward end to end, as SVDQLinear.forward calls it
        assert kernels.fused_unsupported(layer, x, backend) is None
        check_gemm(layer, x, backend)


def test_svdqlinear_takes_the_kernels_inside_emulated(backends, gen):
    layer = make_layer(128, 64, 16, torch.bfloat16, "signed", gen)
    full = make_layer(128, 64, 16, torch.float32, "signed", gen)
    x = make_input(5, 128, "signed", torch.bfloat16, gen)
    with kernels.emulated(backends[SM89]) as tally:
        fused = layer(x)
        assert torch.equal(full(x.float()), full.reference_forward(x.float()))  # float32: no kernel
    assert tally == {"fused": 1, "input dtype torch.float32 (layer torch.float32); fused kernels take bf16/fp16 "
                                 "matching the layer": 1}
    assert torch.equal(fused, kernels.fused_forward(layer, x, backend=backends[SM89]))
    assert kernels.try_fused(layer, x) is None and torch.equal(layer(x), layer.reference_forward(x))


@pytest.mark.slow
@pytest.mark.parametrize("act", ["signed", "unsigned"])
def test_a_flux_like_shape(backends, gen, act):
    layer = make_layer(3072, 3072, 32, torch.bfloat16, act, gen)
    x = make_input(77, 3072, act, torch.bfloat16, gen)
    check_activations(layer, x, backends[SM89])
    s4 = check_gemm(layer, x, backends[SM89])
    assert torch.equal(s4.view(torch.int16), check_gemm(layer, x, backends[SM90]).view(torch.int16))


def test_symmetric_activations_of_version_1_exports(backends, gen):
    # Exports made before full-range scales quantize activations with max|x|/7: the kernel's divisor follows.
    from svdq_cli import QuantConfig, SVDQLinear

    linear = torch.nn.Linear(256, 136).to(torch.bfloat16)
    layer = SVDQLinear.from_linear(linear, QuantConfig(rank=16, version=1))
    assert layer.act_range == "symmetric"
    x = make_input(37, 256, "signed", torch.bfloat16, gen)
    check_activations(layer, x, backends[SM89])
    check_gemm(layer, x, backends[SM89])
