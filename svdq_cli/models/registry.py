"""Model families: a preset adapter module each, registered by name, and the generic one (DESIGN.md §6)."""

from __future__ import annotations

from ..errors import BadInputError
from . import dit, flux, generic, pixart, sana, sd3
from .base import Adapter, Protocol

ADAPTERS: dict[str, Adapter] = {
    adapter.family: adapter
    for adapter in (
        flux.FLUX_DEV, flux.FLUX_SCHNELL, flux.TINY, flux.TINY_DEEP,
        pixart.PIXART_SIGMA, pixart.TINY,
        sana.SANA, sana.TINY,
        sd3.SD3, sd3.TINY,
        dit.DIT, dit.TINY,
    )
}
TINY_MODELS = tuple(name for name in ADAPTERS if name.startswith("tiny-"))

__all__ = ["ADAPTERS", "TINY_MODELS", "Adapter", "Protocol", "get_adapter"]


def get_adapter(family: str) -> Adapter:
    """The preset adapter of ``family`` (the generic one depends on its model: :func:`.loading.adapter_of`).

    Raises:
        BadInputError: not a preset family.
    """
    try:
        return ADAPTERS[family]
    except KeyError:
        known = ", ".join([*ADAPTERS, generic.FAMILY])
        raise BadInputError(f"unknown model family {family!r} (known: {known})") from None
