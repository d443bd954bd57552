"""Shared fixtures. Numeric tests draw fresh random inputs every run; the seed is printed (shown by pytest
on failure) and can be pinned with SVDQ_TEST_SEED=<n> to replay a failure."""

from __future__ import annotations

import os
import secrets

import pytest
import torch


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("SVDQ_TEST_SEED", secrets.randbits(31)))
    print(f"SVDQ_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
