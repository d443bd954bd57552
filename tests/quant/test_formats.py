import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from svdq_cli.quant.formats import (
    FORMATS,
    GRAM_RANK,
    SHRINK_FACTORS,
    code_values,
    dequantize,
    engine_activation_codes,
    engine_fake_quantize,
    get_format,
    nvfp4_tensor_scale,
    quantize,
    searched_scales,
)
from tests.reference import (
    e2m1_reference,
    int_reference,
    int_scales_reference,
    low_rank_gram_reference,
    weighted_error_reference,
)

INT_CASES = [("int4", True, 7), ("int4", False, 15), ("int8", True, 127), ("int2", True, 1), ("int3", True, 3)]


def heavy_tailed(gen, rows, cols):
    """Gaussian rows with some channels 30× larger and an all-zero group, like real activations."""
    x = torch.randn(rows, cols, generator=gen)
    x[:, torch.randperm(cols, generator=gen)[:3]] *= 30
    x[0, :64] = 0
    return x


@pytest.mark.parametrize("name,signed,qmax", INT_CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("full_range", [True, False])
def test_int_matches_float64_reference(gen, name, signed, qmax, scale_dtype, full_range):
    fmt = FORMATS[name]
    x = heavy_tailed(gen, 9, 256)
    if not signed:
        x = x.abs() - 0.01  # a few slightly negative values clamp to code 0
    q = quantize(x, fmt, signed=signed, scale_dtype=scale_dtype, full_range=full_range)
    assert q.scales.dtype == scale_dtype and q.scales.shape == (9, 256 // fmt.group_size)
    reference_scales = int_scales_reference(x.numpy(), fmt.group_size, qmax, signed, full_range and signed)
    expected_stored = torch.from_numpy(reference_scales).to(scale_dtype)
    # The float64 and float32 divisions by qmax may round to neighbouring storage values.
    np.testing.assert_allclose(
        q.scales.double().numpy(), expected_stored.double().numpy(), rtol=2e-2 if scale_dtype != torch.float32 else 1e-6
    )
    codes, near_tie = int_reference(x.numpy(), fmt.group_size, qmax, signed, q.scales.float().numpy())
    mismatch = (q.codes.numpy() != codes) & ~near_tie
    assert not mismatch.any(), f"{mismatch.sum()} codes differ from the float64 reference"
    assert (q.codes[0, :64] == 0).all() and (q.scales[0, 0] == 0)
    expected = (codes.reshape(9, -1, fmt.group_size) * q.scales.double().numpy()[..., None]).reshape(9, 256)
    agree = np.isclose(q.dequantize().double().numpy(), expected, rtol=1e-6, atol=0)
    assert (agree | near_tie).all()


def test_round_half_to_even_on_exact_ties():
    fmt = FORMATS["int4"]
    # Group absmax 7 → scale 1 exactly; ±0.5, ±1.5, 2.5 are ties.
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 56])
    assert quantize(x, fmt).codes[0, :8].tolist() == [7, 0, 2, 2, 0, -2, -2, 4]


def test_nvfp4_ties_go_to_even_code():
    fmt = FORMATS["nvfp4"]
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 0, 0, 0, 0, 0]])
    codes = quantize(x, fmt).codes[0].tolist()
    assert codes[:11] == [7, 0, 2, 2, 4, 4, 6, 6, 0, 8 | 2, 8 | 6]


@pytest.mark.parametrize("per_row", [False, True])
def test_nvfp4_matches_float64_reference(gen, per_row):
    fmt = FORMATS["nvfp4"]
    x = heavy_tailed(gen, 6, 128)
    q = quantize(x, fmt, per_row_tensor_scale=per_row)
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    np.testing.assert_allclose(q.tensor_scale.double().numpy(), (amax.double() / (6 * 448)).numpy(), rtol=1e-6)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (6, 128 // 16)
    group_amax = x.double().reshape(6, -1, 16).abs().amax(-1)
    ideal = (group_amax / 6 / q.tensor_scale.double()).numpy()
    stored = q.scales.double().numpy()
    # fp8 e4m3 keeps 3 mantissa bits: round-to-nearest is within 1/16 relative (subnormals: absolute 2^-10).
    assert np.all(np.abs(stored - ideal) <= np.maximum(ideal / 16, 2.0**-10) + 1e-9)
    step = (q.scales.double() * q.tensor_scale.double()).numpy()[..., None]
    ratio = np.where(step > 0, x.double().numpy().reshape(6, -1, 16) / np.where(step > 0, step, 1), 0).reshape(6, 128)
    codes, near_tie = e2m1_reference(ratio)
    mismatch = (q.codes.numpy() != codes) & ~near_tie
    assert not mismatch.any(), f"{mismatch.sum()} NVFP4 codes differ from the float64 reference"
    decoded = np.where(codes >= 8, -1, 1) * np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7]
    expected = (decoded.reshape(6, -1, 16) * step).reshape(6, 128)
    close = np.isclose(q.dequantize().double().numpy(), expected, rtol=1e-6, atol=1e-12)
    assert (close | near_tie).all()


def test_zero_groups_have_zero_scale_and_codes():
    for fmt in FORMATS.values():
        x = torch.zeros(2, 128)
        x[1, -1] = 3.0
        q = quantize(x, fmt)
        assert (q.codes[0] == 0).all() and (q.scales[0].float() == 0).all()
        assert (q.scales[1, :-1].float() == 0).all() and q.dequantize()[0].abs().max() == 0


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.sampled_from([64, 128])),
        elements=st.floats(-1e4, 1e4, allow_nan=False, width=32),
    ),
    st.sampled_from([("int4", True), ("int4", False), ("int8", True)]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_int_error_is_at_most_half_a_step(values, case, scale_dtype):
    name, signed = case
    fmt = FORMATS[name]
    x = torch.from_numpy(values if signed else np.abs(values))
    q = quantize(x, fmt, signed=signed, scale_dtype=scale_dtype)
    step = q.scales.float().repeat_interleave(fmt.group_size, dim=-1)
    error = (x - q.dequantize()).abs()
    # Half a step, plus float32 rounding of the product codes × scale.
    assert torch.all(error <= step / 2 + 1e-6 * x.abs() + 1e-30), (error - step / 2).max()


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.sampled_from([16, 64])),
        elements=st.floats(-100, 100, allow_nan=False, width=32),
    )
)
def test_nvfp4_error_is_within_half_the_local_spacing(values):
    fmt = FORMATS["nvfp4"]
    x = torch.from_numpy(values)
    q = quantize(x, fmt)
    step = (q.scales.float() * q.tensor_scale).repeat_interleave(16, dim=-1)
    normal = q.scales.float().repeat_interleave(16, dim=-1) >= 2.0**-6  # subnormal fp8 scales lose bits
    # E2M1 spacing is 0.5 below 2, 1 below 4 and 2 up to 6: half the spacing is at most one step.
    error = (x - q.dequantize()).abs()
    assert torch.all((error <= step * 1.0 + 1e-5 * x.abs()) | ~normal)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="unknown precision 'int5'"):
        get_format("int5")
    with pytest.raises(ValueError, match="not divisible by the group size 64"):
        quantize(torch.ones(2, 96), FORMATS["int4"])
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[float("nan")] * 64]), FORMATS["int4"])
    with pytest.raises(ValueError, match="overflows"):
        quantize(torch.full((1, 64), 1e6), FORMATS["int4"], scale_dtype=torch.float16)
    for name in ("nvfp4", "int8"):
        with pytest.raises(ValueError, match="int4 only"):
            quantize(torch.ones(1, 64), FORMATS[name], signed=False)


def test_dequantize_accepts_any_leading_shape(gen):
    x = torch.randn(2, 3, 128, generator=gen)
    q = quantize(x, FORMATS["int4"])
    assert dequantize(q.codes, q.scales, q.fmt).shape == x.shape


def test_full_range_reaches_code_minus_8_and_never_clips(gen):
    x = torch.randn(64, 128, generator=gen)
    x[0, 5] = -50.0  # a group whose extreme is negative: its step is 50/8, not 50/7
    q = quantize(x, FORMATS["int4"])
    assert q.codes[0, 5] == -8 and q.scales[0, 0] == torch.tensor(50.0 / 8)
    assert (q.codes.min(dim=-1).values == -8).any() and q.codes.max() <= 7
    assert ((x - q.dequantize()).abs() <= q.scales.repeat_interleave(64, dim=-1) / 2 + 1e-6).all()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_scale_search_picks_the_least_output_error_of_its_candidates(gen, scale_dtype, weighted):
    fmt = FORMATS["int4"]
    x = torch.randn(48, 256, generator=gen) * (1 + 5 * (torch.rand(48, 256, generator=gen) > 0.98))
    gram = None
    if weighted:  # inputs with a shared positive mean, like those after a GELU
        rows = torch.randn(300, 256, generator=gen).abs() + torch.rand(256, generator=gen)
        grouped = rows.reshape(300, 4, 64).transpose(0, 1)
        gram = torch.bmm(grouped.transpose(1, 2), grouped) / 300
    chosen = searched_scales(x, fmt, gram, scale_dtype)
    assert chosen.dtype == scale_dtype and chosen.shape == (48, 4)
    xs = x.numpy()
    gs = None if gram is None else low_rank_gram_reference(gram.double().numpy(), GRAM_RANK)  # what it minimises

    def store(values):  # a scale as its storage dtype holds it
        return torch.from_numpy(values).float().to(scale_dtype).double().numpy()

    # The candidates, from DESIGN.md §2's definitions: symmetric, full range, full range shrunk.
    symmetric = store(int_scales_reference(xs, 64, 7, True, False))
    full = store(int_scales_reference(xs, 64, 7, True, True))
    stored = [symmetric, full] + [store(full * f) for f in SHRINK_FACTORS[1:]]  # shrinking the stored scale
    errors = np.stack([weighted_error_reference(xs, 64, 7, c, gs) for c in stored])  # [candidate, N, G]
    got = weighted_error_reference(xs, 64, 7, chosen.double().numpy(), gs)
    assert (got <= errors.min(0) * (1 + 1e-4) + 1e-9).all(), "a group did not get its least-error candidate"
    assert got.sum() < errors[0].sum() and got.sum() <= errors[1].sum(), "the search gained nothing"


def test_the_low_rank_gram_keeps_a_shared_mean(gen):
    # After a GELU a group's inputs share a large mean: G = diag(v) + μμᵀ. The search's form of G must keep
    # the error of same-signed deviations (which the mean adds up) and of zero-mean ones.
    from svdq_cli.quant.formats import gram_factors

    mean, variance = torch.rand(3, 64, generator=gen) + 1, torch.rand(3, 64, generator=gen)
    gram = torch.diag_embed(variance) + mean.unsqueeze(-1) * mean.unsqueeze(-2)
    diagonal, factors = gram_factors(gram)
    approximate = torch.diag_embed(diagonal) + factors @ factors.transpose(-1, -2)
    for delta in (torch.rand(200, 3, 64, generator=gen), torch.randn(200, 3, 64, generator=gen)):
        exact = torch.einsum("ngi,gij,ngj->ng", delta, gram, delta)
        kept = torch.einsum("ngi,gij,ngj->ng", delta, approximate, delta)
        assert ((kept - exact).abs() / exact).max() < 0.25
        assert ((kept - exact).abs() / exact).mean() < 0.08


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_stored_tensor_scale_is_the_least_representable_one_at_or_above_amax(gen, dtype):
    """Nunchaku's modules keep the NVFP4 tensor scale in 16 bits: svdq then picks one that dtype holds, never
    below amax/(6·448) (the group scales must stay within fp8)."""
    x = torch.randn(64, 128, generator=gen) * torch.rand(1, generator=gen) * 10
    exact = x.abs().double().max() / (6 * 448)
    stored = nvfp4_tensor_scale(x, storage=dtype)
    assert stored.to(dtype).float() == stored  # representable
    assert stored.double() >= exact * (1 - 1e-7)  # float32 amax/(6·448) may round below the float64 value
    below = torch.nextafter(stored.to(dtype), torch.tensor(0.0, dtype=dtype)).double()
    assert below < exact  # the least such value
    qtensor = quantize(x, get_format("nvfp4"), tensor_scale_dtype=dtype)
    assert torch.equal(qtensor.tensor_scale, stored)
    assert qtensor.scales.float().max() <= 448


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_group_of_negative_zeros_and_a_subnormal_gets_a_positive_scale(scale_dtype):
    """max(−0, +0) may be −0; stepping it up must give the smallest positive scale, not a negative one (found
    by the property test above: values −1e−45, −0, …)."""
    x = torch.full((1, 64), -0.0)
    x[0, 0] = -1.4e-45
    q = quantize(x, FORMATS["int4"], scale_dtype=scale_dtype)
    assert (q.scales.float() > 0).all()
    step = q.scales.float().repeat_interleave(64, dim=-1)
    assert torch.all((x - q.dequantize()).abs() <= step / 2)


@pytest.mark.parametrize("name", ["int4", "nvfp4"])
def test_the_validated_engine_rule_is_what_the_kernel_stand_in_quantizes(gen, name):
    """svdq's reference path under --act-range nunchaku (engine_fake_quantize) sees exactly the codes × stored
    scales the Lite stand-in computes (engine_activation_codes), zero groups included."""
    fmt = get_format(name)
    x = torch.randn(8, 256, generator=gen) * 5
    x[3, :64] = 0
    codes, stored = engine_activation_codes(x.to(torch.bfloat16), fmt, torch.bfloat16)
    values = code_values(codes, fmt).reshape(8, -1, fmt.group_size) * stored.float().unsqueeze(-1)
    assert torch.equal(engine_fake_quantize(x, fmt, torch.bfloat16), values.reshape(8, 256))
    assert not engine_fake_quantize(x, fmt, torch.bfloat16)[3, :64].any()
