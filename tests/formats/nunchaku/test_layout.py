"""Nunchaku's packed layouts, checked element by element against the independent readers."""

from __future__ import annotations

import pytest
import torch

from svdq_cli.formats.nunchaku import layout
from tests.formats.nunchaku import reference


@pytest.mark.parametrize(("n", "k"), [(128, 128), (256, 384), (384, 256)])
@pytest.mark.parametrize("signed", [True, False])
def test_w4a4_codes_land_where_the_fragment_map_says(gen, n, k, signed):
    low, high = (-8, 8) if signed else (0, 16)
    codes = torch.randint(low, high, (n, k), generator=gen, dtype=torch.int8)
    packed = layout.pack_w4a4_codes(codes)
    assert packed.dtype == torch.int8 and packed.shape == (n, k // 2)
    assert torch.equal(reference.read_w4a4_codes(packed, signed), codes)


def test_w4a4_codes_refuse_unpadded_shapes():
    with pytest.raises(ValueError, match="multiple of 128"):
        layout.pack_w4a4_codes(torch.zeros(128, 64, dtype=torch.int8))


@pytest.mark.parametrize("groups", [2, 6])
def test_group_scales_and_vectors(gen, groups):
    scales = torch.randn(256, groups, generator=gen).to(torch.bfloat16)
    packed = layout.pack_group_scales(scales)
    assert packed.shape == (groups, 256)
    assert torch.equal(reference.read_group_scales(packed), scales)
    vector = torch.randn(384, generator=gen).to(torch.bfloat16)
    assert torch.equal(reference.read_vector(layout.pack_vector(vector)), vector)


def test_micro_scales(gen):
    scales = (torch.rand(256, 16, generator=gen) * 400).to(torch.float8_e4m3fn)
    packed = layout.pack_micro_scales(scales)
    assert packed.dtype == torch.float8_e4m3fn and packed.shape == (16, 256)
    assert torch.equal(reference.read_micro_scales(packed).view(torch.uint8), scales.view(torch.uint8))


@pytest.mark.parametrize(("rank", "rank_padded"), [(16, 16), (24, 32), (48, 96)])
def test_lowrank_factors_pad_and_tile(gen, rank, rank_padded):
    down = torch.randn(rank, 200, generator=gen).to(torch.bfloat16)
    up = torch.randn(136, rank, generator=gen).to(torch.bfloat16)
    packed_down = layout.pack_lora_down(down, 256, rank_padded)
    packed_up = layout.pack_lora_up(up, 256, rank_padded)
    assert packed_down.shape == (256, rank_padded) and packed_up.shape == (256, rank_padded)
    read_down, read_up = reference.read_lora_down(packed_down), reference.read_lora_up(packed_up)
    assert torch.equal(read_down[:rank, :200], down) and not read_down[rank:].any() and not read_down[:, 200:].any()
    assert torch.equal(read_up[:136, :rank], up) and not read_up[136:].any() and not read_up[:, rank:].any()


def test_awq_codes(gen):
    codes = torch.randint(0, 16, (12, 192), generator=gen, dtype=torch.int32)
    packed = layout.pack_awq_codes(codes)
    assert packed.dtype == torch.int32 and packed.shape == (3, 96)
    assert torch.equal(reference.read_awq_codes(packed), codes)


def test_pad_to_keeps_fp8_and_fills(gen):
    scales = torch.rand(3, 2, generator=gen).to(torch.float8_e4m3fn)
    padded = layout.pad_to(scales, (4, 4), 1.0)
    assert padded.dtype == torch.float8_e4m3fn and padded.shape == (4, 4)
    assert torch.equal(padded[:3, :2].view(torch.uint8), scales.view(torch.uint8))
    assert padded[3].float().eq(1).all() and padded[:, 2:].float().eq(1).all()
