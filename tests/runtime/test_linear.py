import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from svdq_cli import QuantConfig, SVDQLinear
from svdq_cli.quant.smoothing import smooth_factors, weight_absmax
from tests.reference import e2m1_reference, int_reference, int_scales_reference, unpack_reference


def gaussian_linear(gen, k, n, dtype=torch.bfloat16):
    layer = nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        layer.bias.copy_(torch.randn(n, generator=gen))
    return layer


def reference_forward(layer: SVDQLinear, x: torch.Tensor) -> np.ndarray:
    """DESIGN.md §1 step 4 in float64 numpy from the stored tensors alone (returns output and tie mask)."""
    sd = {
        k: v.float().double().numpy() if v.dtype != torch.uint8 and v.dtype != torch.int8 else v.numpy()
        for k, v in layer.state_dict().items()
    }
    group = layer.fmt.group_size
    rows = x.reshape(-1, layer.in_features).float().double().numpy()
    rows = rows + (sd["shift"] if "shift" in sd else 0.0)
    smoothed = rows / sd["smooth"]
    # Residual weight.
    if layer.precision == "nvfp4":
        codes = unpack_reference(sd["qweight"], signed=False)
        values = np.where(codes >= 8, -1, 1) * np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7]
        step = sd["wscales"] * sd["wtscale"]
    else:
        packed = layer.fmt.packs_nibbles
        values = unpack_reference(sd["qweight"], signed=True) if packed else sd["qweight"].astype(np.int64)
        step = sd["wscales"]
    residual = (values.reshape(layer.out_features, -1, group) * step[..., None]).reshape(layer.out_features, -1)
    # Dynamic per-token activation quantization.
    ties = np.zeros(rows.shape[0], dtype=bool)
    if layer.act == "none":
        activations = smoothed
    elif layer.precision == "nvfp4":
        token_scale = np.abs(smoothed).max(-1, keepdims=True) / (6 * 448)
        g = smoothed.reshape(len(smoothed), -1, group)
        fp8 = (
            torch.from_numpy(np.minimum(np.abs(g).max(-1) / 6 / np.where(token_scale > 0, token_scale, 1), 448))
            .to(torch.float8_e4m3fn)
            .double()
            .numpy()
        )
        st = fp8 * token_scale
        ratio = np.where(st[..., None] > 0, g / np.where(st[..., None] > 0, st[..., None], 1), 0)
        codes, near = e2m1_reference(ratio)
        ties |= near.reshape(len(smoothed), -1).any(-1)
        decoded = np.where(codes >= 8, -1, 1) * np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7]
        activations = (decoded * st[..., None]).reshape(smoothed.shape)
    else:
        signed = layer.act == "signed"
        qmax = 7 if (signed and layer.precision == "int4") else (15 if not signed else 127)
        g = smoothed.reshape(len(smoothed), -1, group)
        full = signed and layer.act_range == "full"  # the whole code range: negative extremes reach -(qmax+1)
        scales = int_scales_reference(smoothed, group, qmax, signed, full)
        scales = torch.from_numpy(scales).float().double().numpy()  # float32 activation scales
        codes, near = int_reference(smoothed, group, qmax, signed, scales)
        ties |= near.any(-1)
        activations = (codes.reshape(g.shape) * scales[..., None]).reshape(smoothed.shape)
    y = activations @ residual.T
    if layer.rank:
        y += (smoothed @ sd["lora_down"].T) @ sd["lora_up"].T
    if "bias" in sd:
        y += sd["bias"]
    return y, ties


CASES = [
    ("int4", "signed", 32, torch.bfloat16),
    ("int4", "signed", 0, torch.float16),
    ("int4", "unsigned", 16, torch.bfloat16),
    ("int4", "none", 32, torch.float32),
    ("nvfp4", "signed", 32, torch.bfloat16),
    ("int8", "signed", 16, torch.bfloat16),
]


@pytest.mark.parametrize("precision,act,rank,dtype", CASES)
def test_forward_matches_float64_reference(gen, precision, act, rank, dtype):
    k, n = 256, 96
    linear = gaussian_linear(gen, k, n, dtype)
    x = torch.randn(3, 11, k, generator=gen) * (1 + 20 * (torch.rand(k, generator=gen) > 0.97))
    if act == "unsigned":
        x = nn.functional.gelu(x)
    x = x.to(dtype)
    smooth = smooth_factors(x.reshape(-1, k).abs().amax(0).float(), weight_absmax([linear.weight]), 0.5, 0.5, dtype)
    config = QuantConfig(precision=precision, rank=rank, weight_only=act == "none")
    layer = SVDQLinear.from_linear(linear, config, smooth=smooth, act=act, shift=0.17 if act == "unsigned" else 0.0)
    y = layer(x)
    assert y.shape == (3, 11, n) and y.dtype == dtype
    expected, ties = reference_forward(layer, x)
    got = y.reshape(-1, n).double().numpy()
    scale = np.abs(expected).max()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype] * scale
    bad = (np.abs(got - expected) > tolerance).any(-1) & ~ties
    assert not bad.any(), f"{bad.sum()} rows differ from the float64 reference"


@pytest.mark.parametrize("precision,act,rank,dtype", CASES)
def test_quantized_layer_approximates_the_original(gen, precision, act, rank, dtype):
    linear = gaussian_linear(gen, 256, 128, dtype)
    x = (
        nn.functional.gelu(torch.randn(64, 256, generator=gen))
        if act == "unsigned"
        else torch.randn(64, 256, generator=gen)
    )
    x = x.to(dtype)
    layer = SVDQLinear.from_linear(
        linear,
        QuantConfig(precision=precision, rank=rank, weight_only=act == "none"),
        act=act,
        shift=0.17 if act == "unsigned" else 0.0,
    )
    reference = linear(x).float()
    error = (torch.linalg.vector_norm(layer(x).float() - reference) / torch.linalg.vector_norm(reference)).item()
    assert error < {"int8": 0.02, "int4": 0.15, "nvfp4": 0.15}[precision]


def test_effective_weight_is_within_half_a_step_of_the_smoothed_weight(gen):
    # Without the scale search no scale clips, so every weight is within half a step; the search trades a
    # few clipped extremes for a finer step and must lower the importance-weighted error it minimises.
    linear = gaussian_linear(gen, 128, 64, torch.float32)
    smooth = torch.rand(128, generator=gen) + 0.5
    smoothed = linear.weight.detach() * smooth
    plain = SVDQLinear.from_linear(linear, QuantConfig(rank=16, scale_search=False), smooth=smooth)
    step = plain.wscales.float().repeat_interleave(64, dim=1)
    error = (plain.effective_weight() * smooth - smoothed).abs()
    assert torch.all(error <= step / 2 + 1e-5)
    rows = torch.randn(200, 128, generator=gen).abs()  # smoothed inputs sharing a positive mean
    grouped = rows.reshape(200, 2, 64).transpose(0, 1)
    gram = torch.bmm(grouped.transpose(1, 2), grouped) / 200
    searched = SVDQLinear.from_linear(linear, QuantConfig(rank=16), smooth=smooth, gram=gram)
    output_error = [(rows @ (layer.effective_weight() * smooth - smoothed).T).square().sum() for layer in (plain,
                                                                                                           searched)]
    assert output_error[1] <= output_error[0]


@pytest.mark.parametrize("precision,act,rank,dtype", CASES)
def test_state_dict_round_trips_through_safetensors(gen, tmp_path, precision, act, rank, dtype):
    linear = gaussian_linear(gen, 128, 64, dtype)
    layer = SVDQLinear.from_linear(
        linear,
        QuantConfig(precision=precision, rank=rank, weight_only=act == "none"),
        act=act,
        shift=0.1 if act == "unsigned" else 0.0,
    )
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), path, metadata=layer.layer_metadata())
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    loaded = SVDQLinear.from_state_dict(load_file(path), metadata)
    for key, value in layer.state_dict().items():
        assert torch.equal(
            value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value,
            loaded.state_dict()[key].view(torch.uint8)
            if value.dtype == torch.float8_e4m3fn
            else loaded.state_dict()[key],
        )
    x = torch.randn(5, 128, generator=gen).to(dtype)
    assert torch.equal(layer(x), loaded(x))


def test_canonical_tensor_shapes_and_dtypes(gen):
    layer = SVDQLinear.from_linear(gaussian_linear(gen, 256, 64), QuantConfig(rank=32))
    sd = layer.state_dict()
    assert sd["qweight"].shape == (64, 128) and sd["qweight"].dtype == torch.uint8
    assert sd["wscales"].shape == (64, 4) and sd["wscales"].dtype == torch.bfloat16
    assert sd["smooth"].shape == (256,) and sd["lora_down"].shape == (32, 256) and sd["lora_up"].shape == (64, 32)
    fp4 = SVDQLinear.from_linear(gaussian_linear(gen, 256, 64), QuantConfig(precision="nvfp4", rank=0))
    assert fp4.wscales.shape == (64, 16) and fp4.wscales.dtype == torch.float8_e4m3fn and fp4.wtscale.dim() == 0


def test_int4_r32_flux_layer_is_over_3_4x_smaller_than_bf16():
    layer = SVDQLinear(3072, 3072, precision="int4", rank=32, dtype=torch.bfloat16)
    bf16_bytes = 3072 * 3072 * 2 + 3072 * 2
    assert bf16_bytes / layer.nbytes() >= 3.4, bf16_bytes / layer.nbytes()


def test_bad_inputs_raise_value_errors(gen):
    linear = gaussian_linear(gen, 128, 64)
    with pytest.raises(ValueError, match="not divisible"):
        SVDQLinear(96, 64)
    with pytest.raises(ValueError, match="rank"):
        SVDQLinear.from_linear(gaussian_linear(gen, 64, 16), QuantConfig(rank=32))
    with pytest.raises(ValueError, match="unknown precision"):
        SVDQLinear(128, 64, precision="int5")
    with pytest.raises(ValueError, match="int2 is a weight-only format"):
        SVDQLinear(128, 64, precision="int2")
    with pytest.raises(ValueError, match="unknown activation mode"):
        SVDQLinear(128, 64, act="maybe")
    broken = gaussian_linear(gen, 128, 64)
    with torch.no_grad():
        broken.weight[3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        SVDQLinear.from_linear(broken)
    layer = SVDQLinear.from_linear(linear, QuantConfig(rank=16))
    with pytest.raises(ValueError, match="expects 128"):
        layer(torch.randn(2, 64))
    tensors = layer.state_dict()
    tensors.pop("lora_up")
    with pytest.raises(ValueError, match="do not match"):
        SVDQLinear.from_state_dict(tensors, layer.layer_metadata())
    tensors = layer.state_dict()
    tensors["qweight"] = tensors["qweight"][:, :10]
    with pytest.raises(ValueError, match="qweight"):
        SVDQLinear.from_state_dict(tensors, layer.layer_metadata())
