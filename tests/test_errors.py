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
