"""One run spread over processes and machines with torch.distributed, as ``torchrun`` starts them.

``torchrun --nproc-per-node N -m svdq_cli quantize MODEL …`` starts N copies of the command. Each learns its
rank from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
and joins one process group: NCCL when the run computes on CUDA (rank r on ``cuda:LOCAL_RANK``), gloo on
CPUs. The work is divided so that the result does not depend on N:

- collect: the calibration prompts go in rounds, prompt i to rank i mod N; after each round the ranks
  exchange that round's per-prompt statistics and every rank merges them in prompt order, which gives the
  same bits one process computes (``quant/statistics.py`` explains why the order is fixed);
- smooth, svd, quantize: block i on rank i mod N, each rank writing its blocks' artifacts through the same
  atomic, sealed path as one process (the run directory must be on a filesystem every rank sees);
- validate: validation prompt i is generated on rank i mod N (the 16-bit reference, the quantized model and
  each baseline), and rank 0 gathers the images, measures and writes the report (a validation through the
  emulated kernels runs on rank 0 alone);
- export: rank 0 alone, which also alone writes the manifest.

Nothing waits forever: a collective that waits longer than ``SVDQ_DIST_TIMEOUT`` seconds (default 1800), or a
rank that dies, ends every rank with a one-line error, and running the same command again resumes.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from ..errors import BadInputError, SvdqError, gist
from .device import resolve_device

TIMEOUT_VARIABLE = "SVDQ_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


class LostRankError(SvdqError):
    """A collective failed: another rank died, or did not answer within the timeout (exit 1; a re-run resumes)."""


@dataclass
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sent: Counter = field(default_factory=Counter)  # pickled bytes this rank contributed, by exchange

    @property
    def leader(self) -> bool:
        """Rank 0: holds the lock, writes the manifest and the report, exports."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether block (or prompt) ``index`` is this rank's: round-robin, which balances blocks of mixed
        kinds (FLUX's double and single blocks)."""
        return index % self.size == self.rank

    def rounds(self, count: int) -> list[range]:
        """Items ``0..count-1`` in rounds of one per rank: in round k, rank r takes item ``k·size + r``."""
        return [range(start, min(start + self.size, count)) for start in range(0, count, self.size)]

    def device(self, resolved: str) -> str:
        """The device this rank computes on: its own GPU (``cuda:LOCAL_RANK``) when the run is on CUDA."""
        return f"cuda:{self.local_rank}" if self.size > 1 and resolved.startswith("cuda") else resolved

    def exchange(self, value: object, what: str = "an exchange") -> list:
        """Every rank's ``value`` (any picklable object), in rank order."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self.sent[what] += len(payload)
        received: list = [None] * self.size
        self._collective(what, lambda: dist.all_gather_object(received, payload))
        return [pickle.loads(item) for item in received]

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here."""
        if self.size > 1:
            import torch.distributed as dist

            self._collective(what, dist.barrier)

    def agree(self, error: str | None, what: str) -> None:
        """Every rank learns whether any rank failed a check (``error`` is this rank's one-line reason, or None).

        Raises:
            BadInputError: on every rank, naming the first rank that failed and why.
        """
        for rank, reason in enumerate(self.exchange(error, what)):
            if reason:
                raise BadInputError(reason if rank == self.rank or self.size == 1 else f"rank {rank}: {reason}")

    def check_same(self, value: object, what: str) -> None:
        """``value`` (a config, the stages to run…) is the same on every rank.

        Raises:
            BadInputError: on every rank, naming the first rank whose ``what`` differs from rank 0's.
        """
        values = self.exchange(value, what)
        for rank, other in enumerate(values):
            if other != values[0]:
                raise BadInputError(f"rank {rank}'s {what} differs from rank 0's; start every rank with the same "
                                    "command, recipe, prompts and svdq version")

    def _collective(self, what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except RuntimeError as error:  # gloo and NCCL failures (DistBackendError, timeouts) are RuntimeErrors
            raise LostRankError(f"rank {self.rank}: {what} failed, another rank died or did not answer "
                                f"({_first_sentence(error)}); re-run the same command to resume") from None


def _first_sentence(error: Exception) -> str:
    """The gist of a backend's error: its first sentence, without the source location gloo puts first."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return gist(text.split(". ")[0], 160)


_joined = [False]  # whether this process ever joined a process group (see leave)


def leave(code: object) -> None:
    """End this process now, its output flushed, if it ever joined a process group; else return. At
    interpreter exit torch.distributed's C++ teardown can abort ("terminate called without an active
    exception", about 1 exit in 12 measured) when the process that hosted the rendezvous store — rank 0, when
    ranks are started without torchrun's agent — has gone."""
    if not _joined[0]:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def world_size() -> int:
    """The number of processes torchrun started for this run (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def timeout_seconds() -> float:
    """The collective timeout, from ``SVDQ_DIST_TIMEOUT``.

    Raises:
        BadInputError: a value that is not a positive number of seconds.
    """
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise BadInputError(f"{TIMEOUT_VARIABLE}={value!r} is not a positive number of seconds")
    return seconds


@contextmanager
def joined(device: str) -> Iterator[World]:
    """This process's :class:`World`: a process group joined for the duration when torchrun started several
    processes (NCCL for a CUDA ``device``, gloo otherwise), a single-process world otherwise.

    Raises:
        BadInputError: an explicit ``cuda:N`` device with several processes, a bad timeout.
        SvdqError: the process group cannot be joined.
    """
    size = world_size()
    if size == 1:
        yield World()
        return
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if ":" in device:
        raise BadInputError(f"--device {device}: with torchrun each rank takes its own GPU; pass --device cuda "
                            "(rank r uses cuda:LOCAL_RANK) or --device cpu")
    cuda = resolve_device(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    try:  # device_id binds NCCL to this rank's GPU (barriers and object collectives then use it)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_seconds()),
                                device_id=torch.device("cuda", local_rank) if cuda else None)
    except (RuntimeError, ValueError) as error:
        raise SvdqError(f"rank {rank}: cannot join the torch.distributed group of {size} "
                        f"({gist(error, 160)})") from None
    _joined[0] = True
    try:
        yield World(rank, size, local_rank)
    finally:
        try:  # leave together: a rank tearing down its connections while another still uses them aborts it
            dist.barrier()
        except RuntimeError:
            pass  # a rank is gone already
        dist.destroy_process_group()
