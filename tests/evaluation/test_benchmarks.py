"""Benchmarks: MJHQ-30K and sDCI from local copies in their published layouts, prompt sets, and the one-line
errors for what is missing."""

from __future__ import annotations

import pytest
import torch

from svdq_cli.errors import BadInputError
from svdq_cli.evaluation import benchmarks

from . import fakes


@pytest.mark.parametrize("kind", ["mjhq", "dci"])
def test_a_benchmark_gives_its_prompts_and_square_real_images(kind, tmp_path):
    directory = getattr(fakes, kind)(tmp_path / kind)
    small = benchmarks.load(f"{kind}:{directory}", 2, tmp_path / "cache")
    large = benchmarks.load(f"{kind}:{directory}", 4, tmp_path / "cache")
    assert len(large.prompts) == 4 and set(large.prompts) <= set(fakes.PROMPTS)
    assert set(small.ids) <= set(large.ids)  # a larger --num-samples keeps the smaller one's samples
    real = list(large.real(range(4), 32))
    assert all(image.shape == (3, 32, 32) and image.dtype == torch.uint8 for image in real)
    for index, image in zip(range(4), real, strict=True):  # each sample's own picture: its colour
        number = fakes.PROMPTS.index(large.prompts[index])
        assert abs(int(image[0].float().mean()) - 40 * number % 256) <= 3


def test_a_prompt_set_has_no_real_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    benchmark = benchmarks.load(str(prompts), 2, tmp_path / "cache")
    assert benchmark.prompts == ["one", "two"] and not benchmark.has_real


def test_missing_files_and_counts_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="does not hold MJHQ-30K's meta_data.json and mjhq30k_imgs.zip"):
        benchmarks.load(f"mjhq:{tmp_path}", 2, tmp_path)
    with pytest.raises(BadInputError, match="at least 1"):
        benchmarks.load("mjhq", 0, tmp_path)
    monkeypatch.setattr(benchmarks.online, "hub_reachable", lambda: False)
    with pytest.raises(benchmarks.BenchmarkUnavailable, match=r"hf download mit-han-lab/svdquant-datasets sDCI.yaml "
                                                              r"sDCI.gz --repo-type dataset --local-dir DIR.*dci:DIR"):
        benchmarks.load("dci", 2, tmp_path)


def test_a_real_image_is_cropped_to_the_generated_aspect_then_resized():
    """A 120×60 picture: a green 60-px square between red margins. A square generation sees the green centre
    only; a 2:1 one sees the whole picture, margins included."""
    import io

    from PIL import Image

    picture = Image.new("RGB", (120, 60), (255, 0, 0))
    picture.paste((0, 255, 0), (30, 0, 90, 60))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    square = benchmarks.fitted(buffer.getvalue(), 32)
    wide = benchmarks.fitted(buffer.getvalue(), "64x32")
    assert square.shape == (3, 32, 32) and wide.shape == (3, 32, 64)
    assert square[1].min() > 200 and square[0].max() < 50  # green through and through
    assert wide[0, :, 2].min() > 200 and wide[1, :, 32].min() > 200  # red at the edge, green at the centre
