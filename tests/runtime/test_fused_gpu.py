"""The fused kernels against SVDQLinear's reference forward on a GPU (skipped without one).

Fresh random inputs at FLUX-like shapes, M not a multiple of the tile, r in {0, 16, 32, 64}; outputs are
poisoned before each run and checked fully written; activation codes must equal the reference's.
"""

import pytest
import torch
from torch import nn

from svdq_cli import QuantConfig, SVDQLinear
from svdq_cli.quant.formats import FORMATS, quantize
from svdq_cli.quant.packing import pack_nibbles

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

SHAPES = [(77, 3072, 3072), (4608, 3072, 12288), (1, 12288, 3072), (4096, 3072, 9216), (333, 15360, 3072)]


def layer_for(k, n, rank, dtype, act, gen):
    linear = nn.Linear(k, n, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        linear.bias.copy_(torch.randn(n, generator=gen))
    smooth = torch.rand(k, generator=gen) + 0.5
    layer = SVDQLinear.from_linear(linear.to(dtype), QuantConfig(rank=rank), smooth=smooth, act=act,
                                   shift=0.17 if act == "unsigned" else 0.0)
    return layer.cuda()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("rank", [0, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_reference(gen, m, k, n, rank, dtype):
    from svdq_cli.runtime import kernels

    layer = layer_for(k, n, rank, dtype, "signed", gen)
    x = (torch.randn(m, k, generator=gen) * (1 + 20 * (torch.rand(k, generator=gen) > 0.99))).to(dtype).cuda()
    assert kernels.fused_unsupported(layer, x) is None
    poisoned = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    fused = kernels.fused_forward(layer, x, out=poisoned)
    torch.cuda.synchronize()
    reference = layer.reference_forward(x)
    assert torch.isfinite(fused).all(), "unwritten or non-finite outputs"
    error = (torch.linalg.vector_norm((fused - reference).float()) / torch.linalg.vector_norm(reference.float())).item()
    assert error <= 1e-2, error


def test_activation_codes_equal_the_reference(gen):
    from svdq_cli.runtime import kernels

    layer = layer_for(3072, 3072, 32, torch.bfloat16, "signed", gen)
    x = torch.randn(97, 3072, generator=gen).to(torch.bfloat16).cuda()
    capability = torch.cuda.get_device_capability()
    functions = kernels._kernels(capability[0] * 10 + capability[1], torch.bfloat16, 32, False,
                                 kernels.uses_s4(capability))
    packed = torch.full((97, 1536), 0xAB, dtype=torch.uint8, device="cuda")  # poisoned
    scales = torch.full((97, 48), float("nan"), device="cuda")
    down = torch.full((97, 32), float("nan"), device="cuda")
    functions["quantize_lora_down"]((97,), (256,), (cupy.from_dlpack(x), cupy.from_dlpack(layer.smooth),
                                                   cupy.from_dlpack(layer.lora_down), cupy.from_dlpack(packed),
                                                   cupy.from_dlpack(scales), cupy.from_dlpack(down),
                                                   cupy.int32(3072), cupy.float32(0.0)))
    torch.cuda.synchronize()
    smoothed = x.float() / layer.smooth.float()
    expected = quantize(smoothed, FORMATS["int4"], per_row_tensor_scale=True)
    assert torch.equal(packed, pack_nibbles(expected.codes))
    assert torch.equal(scales, expected.scales)
    assert torch.isfinite(down).all()
