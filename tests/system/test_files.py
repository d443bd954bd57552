"""The safetensors writers: one canonical serialization, written whole or tensor by tensor."""

import pytest
import torch
from safetensors.torch import load

from svdq_cli.system.files import TensorFileWriter, layout_of, safetensors_bytes, sha256_file


def tensors(gen) -> dict[str, torch.Tensor]:
    return {
        "b.weight": torch.randn(7, 5, generator=gen).bfloat16(),
        "a.count": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "codes": torch.randint(0, 255, (9,), generator=gen, dtype=torch.uint8),
        "scales": torch.rand(6, generator=gen).to(torch.float8_e4m3fn),
        "flags": torch.tensor([True, False]),
        "transposed": torch.randn(4, 6, generator=gen).T,  # not contiguous
    }


def test_bytes_round_trip_through_safetensors(gen):
    original = tensors(gen)
    loaded = load(safetensors_bytes(original, {"note": "x"}))
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name].reshape(-1).view(torch.uint8),
                                                                  tensor.contiguous().reshape(-1).view(torch.uint8))


def test_the_incremental_writer_gives_the_same_bytes(gen, tmp_path):
    original = tensors(gen)
    ordered = {name: original[name] for name in sorted(original)}
    path = tmp_path / "file.safetensors"
    with TensorFileWriter(path, layout_of(ordered), {"note": "x"}) as writer:
        for name, tensor in ordered.items():
            writer.write(name, tensor)
        digest = writer.close()
    assert path.read_bytes() == safetensors_bytes(original, {"note": "x"})
    assert digest == sha256_file(path)


def test_out_of_layout_writes_and_early_exits_leave_the_target_untouched(gen, tmp_path):
    original = tensors(gen)
    path = tmp_path / "file.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="declares"), TensorFileWriter(path, layout_of(original)) as writer:
        writer.write("a.count", original["a.count"])  # the layout starts with b.weight
    with pytest.raises(ValueError, match="never written"), TensorFileWriter(path, layout_of(original)) as writer:
        writer.write("b.weight", original["b.weight"])
        writer.close()
    with pytest.raises(KeyboardInterrupt), TensorFileWriter(path, layout_of(original)) as writer:
        raise KeyboardInterrupt
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["file.safetensors"]  # no temporary file left
