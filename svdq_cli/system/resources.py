"""Files svdq ships beside its code: recipes, prompt sets, CUDA kernels.

In a checkout they are the top-level folders; in an installed wheel they are packaged under
``svdq_cli/_data`` (pyproject's force-include), read through importlib.resources.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_dir(name: str) -> Path:
    """The shipped folder ``name`` (``recipes``, ``calibration_prompts``, ``kernels``)."""
    packaged = Path(str(resources.files("svdq_cli"))) / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / name  # svdq_cli/system/resources.py → the checkout
