"""Every quantization method svdq knows, by name: one line per method module."""

from __future__ import annotations

from . import kmeans, rtn, smoothquant, svdquant, vq4dit
from .base import Method

METHODS: dict[str, Method] = {module.METHOD.name: module.METHOD for module in (
    svdquant, smoothquant, rtn, vq4dit, kmeans,
)}


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: an unknown name (QuantConfig turns it into its field error).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None


def names(engine: str | None = None) -> tuple[str, ...]:
    """The methods' names, those of one engine only when ``engine`` is given."""
    return tuple(name for name, method in METHODS.items() if engine is None or method.engine == engine)
