"""errors.gist: a library's error as one line that keeps its cause."""

import random
import string

from svdq_cli.errors import gist


def test_long_literals_are_cut_before_the_words_around_them():
    components = ", ".join(f"'component_{i}'" for i in range(30))
    error = ValueError(f"Pipeline <class 'X'> expected {{{components}}}, but only {{'vae'}} were passed.")
    line = gist(error)
    assert len(line) <= 300 and line.endswith("but only {'vae'} were passed.")
    assert line.startswith("Pipeline <class 'X'> expected {'component_0'")


def test_a_plain_long_text_is_cut_at_a_word():
    words = ["".join(random.choices(string.ascii_lowercase, k=random.randint(1, 12))) for _ in range(200)]
    text = " ".join(words)
    line = gist(RuntimeError(text + "\nsecond line"), limit=120)
    assert len(line) <= 120 and line.endswith(" …")
    kept = line.removesuffix(" …").split(" ")
    assert kept == words[:len(kept)]  # whole words only, in order


def test_short_and_empty_errors():
    assert gist(KeyError("x")) == "'x'"
    assert gist(RuntimeError("")) == "RuntimeError"
    assert gist("  several   spaces\n  and a second line") == "several spaces"



def test_literals_that_cannot_shrink_further_end_in_a_cut_at_a_word():
    """Once each long literal is cut to its start, cutting again gains nothing: gist then cuts at a word (it
    looped forever on this diffusers message, found by the pipeline-class sweep)."""
    pairs = ", ".join(f"('{key}', {value})" for key, value in [
        ("sample_size", 32), ("in_channels", 4), ("out_channels", 4), ("center_input_sample", False),
        ("flip_sin_to_cos", True), ("freq_shift", 0), ("down_block_types", "('DownBlock2D', 'CrossAttnDownBlock2D')")])
    text = (f"Incorrect configuration settings! The config of `pipeline.unet`: FrozenDict([{pairs}]) expects 8 but "
            "received `num_channels_latents`: 4 + `num_channels_image`: 4 = 8.")
    line = gist(ValueError(text), limit=160)
    assert len(line) <= 160 and line.startswith("Incorrect configuration settings!") and line.endswith("…")
