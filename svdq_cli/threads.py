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
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

THREADS = 1


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
