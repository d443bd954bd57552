"""Whether the Hugging Face Hub can be reached, asked once and quickly.

huggingface_hub retries a failed connection five times with back-off (about 25 s of "Retrying in 8s"
lines) before giving up; svdq asks first, with one short connection attempt, and without the Hub uses the
local cache only (``local_files_only``) or says at once what to do instead.
"""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub's endpoint (none at all under ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
