"""A cost model of the fused kernels from what the CPU emulator counts — a model, never a measurement.

The checked emulator counts, per launch, the global bytes the kernel's instructions request (per argument),
the distinct 32-byte sectors they touch, and the mma instructions. This module sets them against

- the *ideal* traffic: every operand read once and every output written once (what no kernel beats);
- published peak figures of two GPUs (dense tensor-core throughput, CUDA-core fp32, DRAM bandwidth),
  giving a roofline bracket ``max(compute time, DRAM time)``: optimistic with DRAM traffic taken as the
  distinct sectors touched (the L2 cache serving every re-read, plausible while a launch's operands fit in
  L2: checked and reported), pessimistic with every requested byte from DRAM (no reuse at all). Requested
  bytes ÷ ideal is the tiling figure: what the caches must serve. Vendors publish no L2 bandwidth, so the
  bracket is as far as published figures go.

Real kernels reach a fraction of these peaks (mma.sync on Hopper well under its wgmma peak; clocks,
occupancy, latency): the estimates are floors to compare kernel versions by, not predictions of speed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """Published dense peaks (vendor datasheets)."""

    name: str
    capability: tuple[int, int]
    dram_bytes_per_second: float
    l2_bytes: int
    tensor_ops: dict[str, float]  # per second, by mma kind (as the emulator names them)
    fp32_flops: float


GPUS = {
    "H100 SXM": Gpu("H100 SXM", (9, 0), 3.35e12, 50 << 20,
                    {"m16n8k32.s8": 1979e12, "m16n8k16.f16": 989e12}, 67e12),
    "RTX 4090": Gpu("RTX 4090", (8, 9), 1.008e12, 72 << 20,
                    {"m16n8k64.s4": 1321e12, "m16n8k32.s8": 660.6e12, "m16n8k16.f16": 165.2e12}, 82.6e12),
}

# The low-rank branch's share of each kernel's traffic: the arguments that exist only because of it.
BRANCH_ARGUMENTS = {"lora_down", "down", "lora_up"}


def ideal_bytes(m: int, n: int, k: int, rank: int, element: int = 2) -> dict[str, dict[str, int]]:
    """Each operand once, each output once, per kernel and argument (16-bit activations and branch)."""
    groups = k // 64
    quantize = {"x": m * k * element, "smooth": k * element, "lora_down": rank * k * element,
                "packed": m * k // 2, "scales": m * groups * 4, "down": m * rank * 4}
    gemm = {"act_packed": m * k // 2, "act_scales": m * groups * 4, "w_frag": n * k // 2, "w_scales": n * groups * 4,
            "down": m * rank * 4, "lora_up": n * rank * element, "bias": n * element, "out": m * n * element}
    return {"quantize": quantize, "gemm": gemm}


def kernel_figures(record, ideal: dict[str, int], gpu: Gpu, branch_flops: int = 0) -> dict[str, float]:
    """Traffic ratios and the roofline estimate of one counted launch on ``gpu``."""
    requested = record.load_bytes + record.store_bytes
    unique = sum(a["unique_load"] + a["unique_store"] for a in record.arguments.values())
    footprint = sum(a["bytes"] for a in record.arguments.values() if a["load"])  # what re-reads could hit
    branch = sum(a["load"] + a["store"] for name, a in record.arguments.items() if name in BRANCH_ARGUMENTS)
    ideal_total = sum(ideal.values())
    compute = sum(count * _flops(kind) / gpu.tensor_ops[kind] for kind, count in record.mma.items()
                  if kind in gpu.tensor_ops)
    compute += branch_flops / gpu.fp32_flops
    dram = unique / gpu.dram_bytes_per_second
    no_reuse = requested / gpu.dram_bytes_per_second
    return {
        "requested_bytes": requested, "unique_bytes": unique, "ideal_bytes": ideal_total,
        "requested_over_ideal": requested / ideal_total, "unique_over_ideal": unique / ideal_total,
        "branch_bytes": branch, "fits_l2": footprint <= gpu.l2_bytes,
        "compute_us": compute * 1e6, "dram_us": dram * 1e6, "estimate_us": max(compute, dram) * 1e6,
        "bound": "compute" if compute >= dram else "memory", "no_reuse_us": max(compute, no_reuse) * 1e6,
    }


def _flops(kind: str) -> int:
    m, n, k = (int(part) for part in kind.split(".")[0].lstrip("m").replace("n", " ").replace("k", " ").split())
    return 2 * m * n * k
