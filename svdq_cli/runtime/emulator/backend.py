"""The CUDA-on-CPU emulator: svdq's real ``kernels/*.cu`` executed on the CPU through the same Python glue.

No machine this project runs on can be counted on to have a GPU, so the kernels run here instead: the
unmodified CUDA source is translated (``translate.py``: inline PTX and ``__shared__`` only), compiled as host
C++ against ``svdq_emu.h``, and run by ``runtime.cpp`` with one fiber per CUDA thread. :class:`EmulatedBackend`
stands in for CuPy (``RawModule``/``RawKernel``/DLPack arrays), so :func:`svdq_cli.runtime.kernels.fused_forward`
runs end to end on CPU tensors through the code path a GPU uses: name expressions, template arguments,
argument lists (count and C types checked against the kernel's signature), grid and block geometry.

It is a runtime users can select (``svdq validate RUN --runtime emulated``, ``svdq bench --emulate``), not
test support: it is what lets anyone check a kernel change, or see a quantized model through the kernels,
without a GPU. A *checked* build adds memory checks and counters (global bytes per argument, mma
instructions, shared memory per block); see runtime.cpp.

What it cannot show: speed (it measures nothing but counts), and the hardware's own floating-point details
(half-precision mma sums exactly then rounds once; nvcc may contract a·b+c into an fma where the host does
not). Integer mma, and every operation the kernels spell with explicit rounding (``__fdiv_rn``…), are exact.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import SvdqError
from ...system.files import user_cache
from .translate import kernel_parameters, translate

HERE = Path(__file__).resolve().parent
MAX_BUFFERS = 16
MMA_KINDS = {0: ("m16n8k32.s8", 16 * 8 * 32), 1: ("m16n8k64.s4", 16 * 8 * 64), 2: ("m16n8k16.f16", 16 * 8 * 16)}


class EmulatorError(SvdqError):
    """The emulator cannot build or run a kernel (toolchain missing, compile error, kernel fault)."""


class EmulatorUnavailable(EmulatorError):
    """No host compiler or no CUDA headers on this machine."""


class KernelFault(EmulatorError):
    """The kernel misbehaved: deadlock, divergence, out-of-bounds access, race, unsupported instruction."""


@dataclass(frozen=True)
class Device:
    """What the emulated GPU is: its compute capability and shared memory per block."""

    name: str
    capability: tuple[int, int]
    shared_limit: int  # bytes per block with the opt-in attribute
    static_shared_limit: int = 48 * 1024


DEVICES = {
    (8, 0): Device("A100 (sm_80)", (8, 0), 163 * 1024),
    (8, 6): Device("RTX 3090 (sm_86)", (8, 6), 99 * 1024),
    (8, 9): Device("RTX 4090 (sm_89)", (8, 9), 99 * 1024),
    (9, 0): Device("H100 (sm_90)", (9, 0), 227 * 1024),
}


# ---------------------------------------------------------------- the C ABI of runtime.cpp
class _Buffer(ctypes.Structure):
    _fields_ = [("address", ctypes.c_void_p), ("bytes", ctypes.c_uint64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("dynamic_shared", ctypes.c_uint),
        ("static_shared_limit", ctypes.c_uint), ("shared_limit", ctypes.c_uint), ("threads", ctypes.c_int),
        ("reverse", ctypes.c_int), ("checked", ctypes.c_int), ("count_only", ctypes.c_int),
        ("buffers", ctypes.POINTER(_Buffer)),
        ("buffer_count", ctypes.c_int),
    ]


class _LaunchStats(ctypes.Structure):
    _fields_ = [
        ("load_bytes", ctypes.c_uint64 * MAX_BUFFERS), ("store_bytes", ctypes.c_uint64 * MAX_BUFFERS),
        ("unique_load_bytes", ctypes.c_uint64 * MAX_BUFFERS), ("unique_store_bytes", ctypes.c_uint64 * MAX_BUFFERS),
        ("mma", ctypes.c_uint64 * 8), ("shared_bytes", ctypes.c_uint64), ("barriers", ctypes.c_uint64),
        ("collectives", ctypes.c_uint64),
    ]


_SCALARS = {"i32": np.int32, "u32": np.uint32, "i64": np.int64, "u64": np.uint64, "f32": np.float32,
            "f64": np.float64, "b8": np.bool_}


# ---------------------------------------------------------------- toolchain and build cache
@dataclass(frozen=True)
class Toolchain:
    compiler: str
    cuda_include: Path
    version: str


def _cuda_include() -> Path | None:
    candidates = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return Path(root) / "include"
    return None


_toolchain: Toolchain | None = None


def toolchain() -> Toolchain:
    """The host C++ compiler and the CUDA headers (cuda_bf16.h, cuda_fp16.h) the emulator builds with.

    Raises:
        EmulatorUnavailable: either is missing.
    """
    global _toolchain
    if _toolchain is None:
        compiler = os.environ.get("CXX") or shutil.which("g++")
        if not compiler:
            raise EmulatorUnavailable("the kernel emulator needs g++ (apt-get install g++)")
        include = _cuda_include()
        if include is None:
            raise EmulatorUnavailable("the kernel emulator needs the CUDA headers (cuda_bf16.h): install the CUDA "
                                      "toolkit or set CUDA_HOME")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        _toolchain = Toolchain(compiler, include, version)
    return _toolchain


def cache_dir() -> Path:
    return user_cache() / "emulator"


def _flags(checked: bool = False) -> list[str]:
    tools = toolchain()
    flags = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-fvisibility=hidden",
             "-w", f"-I{HERE}", f"-I{tools.cuda_include}"]
    flags += os.environ.get("SVDQ_EMU_CXXFLAGS", "").split()  # e.g. the sanitizer build (make kernels-asan)
    return flags


def _compile(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise EmulatorError(f"compiling {what} for the emulator failed: {' | '.join(errors[:3])[:1500]}")


def _atomic_output(target: Path, build) -> Path:
    """Build into a temporary name beside ``target`` and rename it into place (safe for concurrent builds)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=target.suffix)
    os.close(handle)
    try:
        build(Path(temporary))
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _runtime_object() -> Path:
    source = (HERE / "runtime.cpp").read_text() + (HERE / "svdq_emu.h").read_text()
    flags = _flags(False)
    key = hashlib.sha256("\0".join([source, toolchain().version, *flags]).encode()).hexdigest()[:20]
    return _atomic_output(cache_dir() / f"runtime-{key}.o", lambda out: _compile(
        [toolchain().compiler, *flags, "-c", str(HERE / "runtime.cpp"), "-o", str(out)], "runtime.cpp"))


def _unit(source: str, filename: str, names: list[str], arch: int) -> str:
    # Per name expression: a launcher taking CUDA-style parameters (an array of pointers to each argument)
    # and the kernel's signature, derived from its type, for checking arguments.
    launchers = "".join(
        f"\nSVDQ_EMU_EXPORT int svdq_emu_launch_{i}(const svdq_emu::LaunchConfig* c, void** p, "
        f"svdq_emu::LaunchStats* s, char* e, int n) {{ return svdq_emu::launch(&{name}, c, p, s, e, n); }}"
        f"\nSVDQ_EMU_EXPORT const char* svdq_emu_signature_{i}() {{ return svdq_emu::signature_of(&{name}); }}"
        for i, name in enumerate(names))
    return (f'#include "svdq_emu.h"\n#define __CUDA_ARCH__ {arch}\n#line 1 "{filename}"\n{translate(source)}\n'
            f"#undef __CUDA_ARCH__\n{launchers}\n")


def build_library(source: str, filename: str, names: list[str], arch: int, checked: bool) -> Path:
    """A shared library holding ``names`` (kernel name expressions) of ``source``, built or taken from cache."""
    unit = _unit(source, filename, names, arch)
    flags = _flags(checked)
    if checked and any(flag.startswith("-fsanitize=") for flag in flags):
        raise EmulatorUnavailable("checked builds instrument with -fsanitize=thread hooks, which cannot combine with "
                                  "the sanitizers in SVDQ_EMU_CXXFLAGS")
    kernel_flags = flags + (["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"] if checked else [])
    runtime = _runtime_object()
    key = hashlib.sha256("\0".join([unit, runtime.name, toolchain().version, *kernel_flags]).encode()).hexdigest()[:20]
    stem = re.sub(r"\W", "_", Path(filename).stem)

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            unit_path, objects = Path(scratch) / f"{stem}.cpp", Path(scratch) / f"{stem}.o"
            unit_path.write_text(unit)
            _compile([toolchain().compiler, *kernel_flags, "-c", str(unit_path), "-o", str(objects)], filename)
            _compile([toolchain().compiler, *flags, "-shared", "-Wl,-Bsymbolic", str(objects), str(runtime),
                      "-o", str(out), "-lpthread", "-ldl"], f"{filename} (link)")

    return _atomic_output(cache_dir() / f"{stem}-{key}.so", build)


# ---------------------------------------------------------------- device arrays, kernels, launches
class EmulatedArray:
    """A CPU tensor standing where CuPy's device array would: its address and extent (kept alive)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            raise EmulatorError(f"the emulator runs on CPU tensors, got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise EmulatorError("the emulator takes contiguous tensors, as the kernels index them densely")
        self.tensor = tensor
        self.address = tensor.data_ptr()
        self.nbytes = tensor.numel() * tensor.element_size()


@dataclass
class LaunchRecord:
    """What one launch did, from a checked build: bytes per argument, mma instructions, shared memory."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    arguments: dict[str, dict[str, int]] = field(default_factory=dict)  # name → load/store/unique bytes, size
    mma: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    shared_bytes: int = 0

    @property
    def load_bytes(self) -> int:
        return sum(a["load"] for a in self.arguments.values())

    @property
    def store_bytes(self) -> int:
        return sum(a["store"] for a in self.arguments.values())


def _dims(value) -> tuple[int, int, int]:
    dims = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise EmulatorError(f"launch dimensions {value!r} must be 1 to 3 positive integers")
    return dims + (1,) * (3 - len(dims))


class EmulatedKernel:
    """One kernel of a built library, called like CuPy's ``RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, backend: EmulatedBackend, library: ctypes.CDLL, index: int, name: str, parameters: list[str]):
        self.backend, self.name = backend, name
        self._launch = getattr(library, f"svdq_emu_launch_{index}")
        self._launch.restype = ctypes.c_int
        signature = getattr(library, f"svdq_emu_signature_{index}")
        signature.restype = ctypes.c_char_p
        text = signature().decode()
        self.signature = [] if text == "-" else text.split(",")
        if "unsupported" in self.signature:
            raise EmulatorError(f"{name}: a parameter type the emulator cannot pass ({text})")
        self.parameters = parameters if len(parameters) == len(self.signature) else [
            f"argument {i}" for i in range(len(self.signature))]

    def __call__(self, grid, block, args, shared_mem: int = 0) -> LaunchRecord | None:
        grid, block = _dims(grid), _dims(block)
        threads = block[0] * block[1] * block[2]
        if threads > 1024 or block[2] > 64:
            raise EmulatorError(f"{self.name}: block {block} exceeds CUDA's 1024 threads (z ≤ 64)")
        if grid[0] >= 2**31 or grid[1] > 65535 or grid[2] > 65535:
            raise EmulatorError(f"{self.name}: grid {grid} exceeds CUDA's limits (x < 2^31, y and z ≤ 65535)")
        if len(args) != len(self.signature):
            raise EmulatorError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        holders, params, buffers, names = [], (ctypes.c_void_p * max(len(args), 1))(), [], []
        for i, (kind, value) in enumerate(zip(self.signature, args, strict=True)):
            label = f"argument {i} ({self.parameters[i]})"
            if kind == "ptr":
                if not isinstance(value, EmulatedArray):
                    raise EmulatorError(f"{self.name}: {label} must be a device array, got {type(value).__name__}")
                holder = ctypes.c_void_p(value.address)
                buffers.append(_Buffer(value.address, value.nbytes))
                names.append(self.parameters[i])
            else:
                expected = _SCALARS[kind]
                if type(value) is not expected:
                    raise EmulatorError(f"{self.name}: {label} must be a numpy {expected.__name__}, got "
                                        f"{type(value).__name__} (a kernel argument's C type must match exactly)")
                holder = np.ctypeslib.as_ctypes(np.array(value, dtype=expected))
            holders.append(holder)
            params[i] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)
        device = self.backend.device
        config = _LaunchConfig(
            (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, device.static_shared_limit,
            device.shared_limit, self.backend.threads, int(self.backend.reverse), int(self.backend.checked),
            int(self.backend.count_only), (_Buffer * max(len(buffers), 1))(*buffers), len(buffers))
        stats, error = _LaunchStats(), ctypes.create_string_buffer(4096)
        failed = self._launch(ctypes.byref(config), params, ctypes.byref(stats), error, len(error))
        if failed:
            message = re.sub(r"buffer #(\d+)", lambda m: f"argument '{names[int(m[1])]}'",
                             error.value.decode(errors="replace"))
            raise KernelFault(f"{self.name}: {message}")
        if not self.backend.checked:
            return None
        record = LaunchRecord(self.name, grid, block, shared_bytes=int(stats.shared_bytes))
        for i, name in enumerate(names):
            record.arguments[name] = {
                "bytes": buffers[i].bytes, "load": stats.load_bytes[i], "store": stats.store_bytes[i],
                "unique_load": stats.unique_load_bytes[i], "unique_store": stats.unique_store_bytes[i]}
        for index, (label, flops) in MMA_KINDS.items():
            if stats.mma[index]:
                record.mma[label] = int(stats.mma[index])
                record.flops += 2 * flops * int(stats.mma[index])
        self.backend.launches.append(record)
        return record


class EmulatedModule:
    """CuPy's ``RawModule`` stand-in: a source compiled for some name expressions."""

    def __init__(self, backend: EmulatedBackend, source: str, name_expressions: list[str], filename: str):
        self.backend = backend
        arch = backend.device.capability[0] * 100 + backend.device.capability[1] * 10
        path = build_library(source, filename, list(name_expressions), arch, backend.checked)
        library = ctypes.CDLL(str(path))
        self._kernels = {}
        for index, name in enumerate(name_expressions):
            base = re.sub(r"<.*", "", name).rsplit("::", 1)[-1].strip()
            self._kernels[name] = EmulatedKernel(backend, library, index, name, kernel_parameters(source, base))

    def get_function(self, name: str) -> EmulatedKernel:
        try:
            return self._kernels[name]
        except KeyError:
            raise EmulatorError(f"{name} was not among the module's name expressions") from None


class EmulatedBackend:
    """Runs kernels on the CPU as an emulated GPU of ``capability``.

    Args:
        capability: the compute capability to emulate, (8, 9) by default (sm_89: native 4-bit mma); (9, 0)
            makes the glue choose the Hopper code path.
        checked: build with memory checks and counters (slower); fills :attr:`launches`.
        threads: OS threads running blocks (default: every core).
        reverse: resume a block's threads in reverse order (exposes order-dependent kernels).
        count_only: with ``checked``, skip the mma arithmetic (its results are zeros) to count the traffic of
            full-size launches quickly; outputs are then meaningless.
    """

    name = "emulated"

    def __init__(self, capability: tuple[int, int] = (8, 9), checked: bool = False, threads: int | None = None,
                 reverse: bool = False, count_only: bool = False) -> None:
        if tuple(capability) not in DEVICES:
            raise EmulatorError(f"capability {capability} is not emulated (choose from {sorted(DEVICES)})")
        toolchain()
        self.device = DEVICES[tuple(capability)]
        if count_only and not checked:
            raise EmulatorError("count_only counts, so it needs checked=True")
        self.checked, self.reverse, self.count_only = checked, reverse, count_only
        self.threads = threads or 0
        self.launches: list[LaunchRecord] = []
        self._modules: dict[tuple[str, tuple[str, ...]], EmulatedModule] = {}
        self._lock = threading.Lock()

    def capability(self, device: torch.device | str | None = None) -> tuple[int, int]:
        return self.device.capability

    def module(self, source: str, name_expressions: list[str], filename: str = "kernel.cu") -> EmulatedModule:
        """Compile (or take from cache) ``source`` for ``name_expressions``, like ``cupy.RawModule``."""
        key = (hashlib.sha256(source.encode()).hexdigest(), tuple(name_expressions))
        with self._lock:
            if key not in self._modules:
                self._modules[key] = EmulatedModule(self, source, list(name_expressions), filename)
                for name in name_expressions:  # later single-name requests find the name here
                    self._modules.setdefault((key[0], (name,)), self._modules[key])
            return self._modules[key]

    def array(self, tensor: torch.Tensor) -> EmulatedArray:
        return EmulatedArray(tensor)

    def launching(self, device) -> nullcontext:
        return nullcontext()

    def describe(self) -> str:
        return f"emulated {self.device.name} on the CPU ({'checked' if self.checked else 'plain'} build)"
