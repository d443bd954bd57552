import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from svdq_cli.quant.packing import pack_nibbles, unpack_nibbles
from tests.reference import unpack_reference


def even_shapes():
    return st.tuples(st.integers(1, 5), st.integers(1, 16).map(lambda n: 2 * n))


@given(arrays(np.int8, even_shapes(), elements=st.integers(-8, 7)))
def test_signed_pack_unpack_is_identity(codes):
    packed = pack_nibbles(torch.from_numpy(codes))
    assert packed.dtype == torch.uint8 and packed.shape[-1] == codes.shape[-1] // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, signed=True).numpy(), codes)


@given(arrays(np.int8, even_shapes(), elements=st.integers(0, 15)))
def test_unsigned_pack_unpack_is_identity(codes):
    np.testing.assert_array_equal(unpack_nibbles(pack_nibbles(torch.from_numpy(codes)), signed=False).numpy(), codes)


def test_layout_is_low_nibble_even_k(gen):
    codes = torch.randint(-8, 8, (7, 64), generator=gen, dtype=torch.int8)
    packed = pack_nibbles(codes).numpy()
    expected = (codes[:, 0::2].numpy().astype(np.int64) & 0xF) | ((codes[:, 1::2].numpy().astype(np.int64) & 0xF) << 4)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(unpack_reference(packed, signed=True), codes.numpy())


def test_rejects_odd_length_and_out_of_range():
    with pytest.raises(ValueError, match="odd"):
        pack_nibbles(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="-8..15"):
        pack_nibbles(torch.tensor([16, 0]))
    with pytest.raises(ValueError, match="uint8"):
        unpack_nibbles(torch.zeros(2, dtype=torch.int8), signed=True)
