"""Generation sizes: a square's side or width × height, kept as written, refused in one line when not a size."""

import pytest

from svdq_cli.errors import BadInputError
from svdq_cli.models import resolution
from svdq_cli.run.recipe import load_recipe
from tests.conftest import svdq


@pytest.mark.parametrize("written,kept,sides", [
    (1024, 1024, (1024, 1024)), ("1024", 1024, (1024, 1024)), ("512x512", 512, (512, 512)),
    ("832x480", "832x480", (832, 480)), (" 832 X 480 ", "832x480", (832, 480)), ("832×480", "832x480", (832, 480)),
    ("480*832", "480x832", (480, 832)),
])
def test_a_size_is_kept_as_an_int_for_a_square_and_as_wxh_for_a_rectangle(written, kept, sides):
    assert resolution.parse(written, "x") == kept
    assert resolution.dimensions(written) == sides
    assert resolution.label(kept) == (f"{sides[0]} px" if sides[0] == sides[1] else f"{sides[0]}×{sides[1]} px")


@pytest.mark.parametrize("written", ["abc", "64x", "x64", "64x64x3", "-64", "6.4", "9" * 5000, True, 64.0, None])
def test_what_is_not_a_size_is_refused_in_one_line(written):
    with pytest.raises(BadInputError, match=r"^--resolution: .* is not a size; give pixels"):
        resolution.parse(written, "--resolution")


def test_scaling_keeps_the_aspect_and_the_multiple():
    assert resolution.scaled(1024, 0.25, 16) == 512
    assert resolution.scaled("832x480", 0.25, 16) == "416x240"
    assert resolution.scaled("832x480", 1e-6, 16) == 16  # never below one multiple a side


def test_recipes_and_flags_take_a_rectangle_and_bound_each_side():
    config = load_recipe("tiny-flux", {"calibration.resolution": "96X64", "validation.resolution": "64"})
    assert (config.calibration.resolution, config.validation.resolution) == ("96x64", 64)
    assert load_recipe("wan2.1-t2v-1.3b").validation.resolution == "832x480"  # its model card's frames
    with pytest.raises(BadInputError, match="calibration.resolution=64x99999 .* exceeds 16,384"):
        load_recipe("tiny-flux", {"calibration.resolution": "64x99999"})
    code, _, stderr = svdq("quantize", "tiny-flux", "--resolution", "64by64")
    assert code == 2
    assert stderr.strip().splitlines()[-1] == ("Error: calibration.resolution (--resolution): '64by64' is not a "
                                               "size; give pixels (1024) or width x height (832x480)")
