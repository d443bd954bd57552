"""Generation sizes: a square's side (``1024``) or a rectangle, width × height (``832x480``: Wan's protocol).

A resolution is kept as it is written down: an int for a square — so every run, cache key and export made
before rectangles keeps its bytes — and ``"WxH"`` for a rectangle. Whatever computes with one takes its
:func:`dimensions`.
"""

from __future__ import annotations

import re

from ..errors import BadInputError

Resolution = int | str
_SIZE = re.compile(r"\s*(\d{1,100})\s*(?:[x×*]\s*(\d{1,100})\s*)?")  # past any limit (refused by it), within int()'s


def parse(value: object, what: str) -> Resolution:
    """``value`` (1024, "1024", "832x480", "832×480") in its kept form: an int for a square, else "WxH".

    Raises:
        BadInputError: not a size; ``what`` names where it was given.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(value.lower()) if isinstance(value, str) else None
    if match is None:
        raise BadInputError(f"{what}: {value!r} is not a size; give pixels (1024) or width x height (832x480)")
    return of(int(match[1]), int(match[2] or match[1]))


def dimensions(resolution: Resolution) -> tuple[int, int]:
    """Width and height in pixels."""
    kept = parse(resolution, "resolution")
    if isinstance(kept, int):
        return kept, kept
    width, height = kept.split("x")
    return int(width), int(height)


def of(width: int, height: int) -> Resolution:
    """The kept form of a width and a height."""
    return width if width == height else f"{width}x{height}"


def scaled(resolution: Resolution, factor: float, multiple: int) -> Resolution:
    """``resolution`` with its area scaled by ``factor`` (its aspect kept), each side a multiple of ``multiple``."""
    return of(*(max(multiple, int(side * factor**0.5) // multiple * multiple) for side in dimensions(resolution)))


def label(resolution: Resolution) -> str:
    """As people read it: "1024 px", "832×480 px"."""
    width, height = dimensions(resolution)
    return f"{width} px" if width == height else f"{width}×{height} px"
