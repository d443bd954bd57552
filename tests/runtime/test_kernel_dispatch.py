import torch

from svdq_cli import QuantConfig, SVDQLinear
from svdq_cli.runtime import kernels


def test_cpu_inputs_take_the_reference_path_silently(recwarn):
    layer = SVDQLinear.from_linear(torch.nn.Linear(128, 64).to(torch.bfloat16), QuantConfig(rank=16))
    x = torch.randn(3, 128).to(torch.bfloat16)
    assert kernels.fused_unsupported(layer, x) == "input is not on a CUDA device"
    assert kernels.try_fused(layer, x) is None and not recwarn.list
    assert torch.equal(layer(x), layer.reference_forward(x))
    assert kernels.describe("cpu").startswith("reference path")


def test_variant_follows_the_compute_capability():
    assert kernels.uses_s4((8, 0)) and kernels.uses_s4((8, 6)) and kernels.uses_s4((8, 9))
    assert not kernels.uses_s4((9, 0))
