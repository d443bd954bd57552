"""Thread policy: svdq computes on one CPU thread, whatever the machine, so its results do not depend on it.

torch's CPU kernels round differently with different thread counts: reductions and convolutions split
their work by thread, and LAPACK does too. Measured on tiny-flux, two threads instead of one moved the
16-bit model's images by up to 3e-7, an SVD by 1e-13, and the α/β search's choice on a near-tie — enough to
change an export's bytes. So the CLI sets torch to one intra-op thread before anything runs, and the
weight side (smoothing search, SVD, rounding, GPTQ) runs single-threaded under the Python API too. It costs
little where svdq runs: on a GPU the host threads barely matter, and on a shared or loaded CPU one thread is
faster than torch's default of one spinning thread per core (measured: ``make demo`` 5 min with the
default on a loaded 2-core machine, 42 s with one thread). A test quantizes tiny-flux with OMP_NUM_THREADS
at 1 and 2 and compares the exports byte for byte.

The weight side still uses every core: :func:`parallel_map` computes independent layers (or input groups) on
several Python threads at once, each single-threaded, so a result never depends on how many there were.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

THREADS = 1
MAX_WORKERS = 8  # each worker holds one layer's temporaries (up to ~1 GB at FLUX size)
Item, Result = TypeVar("Item"), TypeVar("Result")


def configure_threads() -> None:
    """Pin torch's CPU work to :data:`THREADS` threads (the CLI does this first)."""
    torch.set_num_threads(THREADS)


@contextmanager
def single_threaded():
    """Run the block on one thread (the weight side's numerics: results independent of the machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def workers() -> int:
    """Layers computed at once: the CPUs this process may run on (``SVDQ_WORKERS`` overrides), at most
    :data:`MAX_WORKERS`."""
    configured = os.environ.get("SVDQ_WORKERS", "")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = int(configured) if configured.isdigit() and int(configured) > 0 else available
    return max(1, min(count, MAX_WORKERS))


def parallel_map(function: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
    """``function(item)`` for each item, yielded in order as soon as it and those before it are done, computed
    on :func:`workers` threads each on one torch thread: the same results as a serial loop (functions must not
    share mutable state or the global random generator)."""
    items = list(items)
    count = min(workers(), len(items))
    with single_threaded():
        if count <= 1:
            yield from (function(item) for item in items)
            return
        # Thread counts are per thread for OpenMP and MKL (LAPACK's QR would otherwise split its work anew).
        with ThreadPoolExecutor(count, thread_name_prefix="svdq-worker", initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            yield from pool.map(function, items)
