"""`make gpu-check`: everything only a GPU can show, in one call and one JSON report.

On a CUDA machine (a bare, offline one is fine: see ``--fetch-wheels``) it runs, each part in a child process
under its own time budget, so that a part that fails, hangs or crashes the driver costs only its own figures:

  install         the carried wheels (``.whl/``: svdq's Python dependencies the machine lacks), if any
  tests           ``pytest -m gpu``: the kernels against the reference path and against the CPU emulator
  kernels         CUDA-event timings at FLUX.1 shapes (warm-up, median of ≥ 20): fused W4A4 + low-rank, W4A4
                  alone, the naive unfused branch, torch bf16 matmul, the W4A16 path, the VQ GEMM; µs,
                  TFLOP/s, GB/s, ratio to bf16 and the low-rank overhead in %
  end_to_end      ``svdq quantize tiny-flux`` on the GPU (quantize + validate through the kernels), peak memory
  streamed_block  one FLUX.1-width double block (real widths, random weights) quantized streamed, peak memory

and writes one JSON document (machine, versions, every figure, every failure with its message) to
``$OUT/gpu-check.json`` (else ``./gpu-check.json``), rewritten after every part, and a short table on stdout.
Without a GPU it says so in one line and exits 0. ``--emulate`` runs the same parts against the CPU emulator
at small shapes (timings then time the emulator, not a GPU: they test the script, not the hardware), which
is how CI runs this script. Exit status: 0 when every part that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "svdq-gpu-check-site"
SCHEMA = 1
# Seconds per part: together under 8 minutes with the machine's own start outside them.
BUDGETS = {"install": 60, "tests": 120, "kernels": 150, "end_to_end": 90, "streamed_block": 60}
# What svdq needs that a GPU image may lack, or hold in older versions than svdq's tests ran on: these and
# what they require, less what the image already provides in a version svdq takes (KINDS.md's package list).
CARRIED_ROOTS = ("diffusers", "transformers", "huggingface_hub", "typer", "rich")
IMAGE_PROVIDES = {"torch", "numpy", "safetensors", "tokenizers", "accelerate", "torchmetrics", "pillow", "pyyaml",
                  "requests", "tqdm", "packaging", "filelock", "fsspec", "regex", "typing-extensions", "pygments",
                  "markdown-it-py", "mdurl", "zipp", "certifi", "idna", "urllib3", "charset-normalizer", "hf-xet",
                  "shellingham", "annotated-doc", "anyio", "h11", "httpcore", "httpx", "jinja2", "markupsafe",
                  "sympy", "networkx", "mpmath", "psutil", "colorama", "tomli"}
FLUX_SHAPES = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072))  # (K, N)
EMULATED_SHAPES = ((128, 128), (256, 128))


# ---------------------------------------------------------------- the parts (each runs in a child process)
def part_tests(emulate: bool, result: dict, save) -> None:
    """``pytest -m gpu`` (under --emulate the same selection, which skips without CUDA). Stopped short of the
    part's budget so that the outcomes of the tests that ran are still counted."""
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "-m", "gpu", "-p", "no:cacheprovider", "tests/runtime"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BUDGETS["tests"] - 15)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as stopped:
        partial = stopped.stdout or ""  # bytes on some Pythons even with text=True
        output, code = partial.decode() if isinstance(partial, bytes) else partial, None
    result.update(read_outcomes(output), exit_code=code, output_tail=output[-2000:])
    if code is None:
        raise RuntimeError(f"pytest -m gpu was stopped at the budget after {sum(result['outcomes'].values())} tests")
    if code not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited {code}: {result['failures'][:3] or output[-300:]}")


def read_outcomes(output: str) -> dict:
    """Counts per outcome and each failure's message, from pytest's ``-v -rfE`` output (partial output too)."""
    outcomes: dict[str, int] = {}
    for match in re.finditer(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.MULTILINE):
        outcomes[match.group(1).lower()] = outcomes.get(match.group(1).lower(), 0) + 1
    failures = [{"test": test, "message": message[:300]}
                for test, message in re.findall(r"^(?:FAILED|ERROR) (\S+) - (.*)$", output, re.MULTILINE)]
    return {"outcomes": outcomes, "failures": failures}


def part_kernels(emulate: bool, result: dict, save) -> None:
    """Every variant at every shape, figures saved after each shape (a budget cut keeps what was done)."""
    from svdq_cli.runtime.emulator.backend import EmulatedBackend

    backend = EmulatedBackend((9, 0), threads=2) if emulate else None
    device = "cpu" if emulate else "cuda"
    m, rank = (16, 32) if emulate else (4608, 32)  # 4096 image + 512 text tokens of FLUX.1 at 1024 px
    repeats = 3 if emulate else 25
    result.update(m=m, rank=rank, repeats=repeats, timer="perf_counter" if emulate else "CUDA events", rows=[])
    for k, n in EMULATED_SHAPES if emulate else FLUX_SHAPES:
        result["rows"].append(shape_row(k, n, m, rank, device, backend, repeats))
        save()


def shape_row(k: int, n: int, m: int, rank: int, device: str, backend, repeats: int) -> dict:
    import torch

    from svdq_cli.runtime import kernels
    from svdq_cli.ship.bench import median_seconds, random_layer

    dtype = torch.bfloat16
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    with_branch = random_layer(k, n, rank, dtype, device)
    without = random_layer(k, n, 0, dtype, device)
    weight_only = weight_only_layer(k, n, dtype, device)
    vq = vq_layer(k, n, dtype, device)
    weight = torch.randn(n, k).to(dtype).to(device)
    for name, layer in (("w4a4_lowrank", with_branch), ("w4a4", without)):
        reason = kernels.fused_unsupported(layer, x, backend)
        if reason:
            raise RuntimeError(f"{k}x{n} {name}: the fused kernels do not take it ({reason})")

    def naive():  # the unfused sequence: quantize + GEMM kernels, then the branch as two torch matmuls
        y = kernels.fused_forward(without, x, backend=backend)
        smoothed = x.float() / with_branch.smooth.float()
        return y + ((smoothed @ with_branch.lora_down.float().T) @ with_branch.lora_up.float().T).to(dtype)

    variants = {
        "w4a4_lowrank": lambda: kernels.fused_forward(with_branch, x, backend=backend),
        "w4a4": lambda: kernels.fused_forward(without, x, backend=backend),
        "naive_unfused": naive,
        "matmul_bf16": lambda: x @ weight.T,
        "w4a16": lambda: weight_only(x),
        "vq_gemm": lambda: kernels.vq_forward(vq, x, backend=backend),
    }
    cuda = device == "cuda"
    seconds = {name: median_seconds(function, cuda, 3 if cuda else 1, repeats) for name, function in variants.items()}
    bf16 = seconds["matmul_bf16"]
    activations, outputs = m * k * 2, m * n * 2
    moved = {"w4a4_lowrank": activations + n * k // 2 + outputs, "w4a4": activations + n * k // 2 + outputs,
             "naive_unfused": activations + n * k // 2 + outputs, "matmul_bf16": activations + n * k * 2 + outputs,
             "w4a16": activations + n * k // 2 + outputs, "vq_gemm": activations + n * k // 4 + outputs}
    variants_out = {name: {"us": value * 1e6, "tflops": 2.0 * m * n * k / value / 1e12,
                           "gbps": moved[name] / value / 1e9, "vs_bf16": bf16 / value}
                    for name, value in seconds.items()}
    return {"K": k, "N": n, "variants": variants_out,
            "lowrank_overhead_percent": 100.0 * (seconds["w4a4_lowrank"] / seconds["w4a4"] - 1.0),
            "naive_overhead_percent": 100.0 * (seconds["naive_unfused"] / seconds["w4a4"] - 1.0)}


def weight_only_layer(k: int, n: int, dtype, device: str):
    """svdq's W4A16 path (AdaLN linears and weight-only runs): 4-bit weights, 16-bit activations."""
    import torch
    from torch import nn

    from svdq_cli.methods.config import QuantConfig
    from svdq_cli.runtime.linear import SVDQLinear

    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(2)) / k**0.5)
    config = QuantConfig(rank=0, weight_only=True, exact_svd_max_elements=0)
    return SVDQLinear.from_linear(linear.to(dtype), config).to(device)


def vq_layer(k: int, n: int, dtype, device: str):
    """A 2-bit VQ layer (d = 4, 256 codewords) with random codebook and assignments: timing only."""
    import torch

    from svdq_cli.runtime.vq_linear import VQLinear

    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(256, 4, generator=generator) * 0.1
    assignments = torch.randint(0, 256, (n, k // 4), generator=generator)
    return VQLinear.from_parts(codebook, assignments, None, bits=2, dtype=dtype).to(device)


def part_end_to_end(emulate: bool, result: dict, save) -> None:
    """tiny-flux, every stage, validation through the kernels (the emulator's, with --emulate)."""
    work = Path(tempfile.mkdtemp())
    device = ["--device", "cpu", "--runtime", "emulated"] if emulate else ["--device", "cuda"]
    sizes = ["--dtype", "bfloat16", "--num-prompts", "2", "--steps", "2", "--resolution", "32", "--val-prompts", "1",
             "--val-steps", "2", "--val-resolution", "32"]
    result.update(quantize_run(["tiny-flux", *sizes, *device], work / "run", emulate))
    report = json.loads((work / "run" / "validate" / "report.json").read_text())
    result["runtime"] = report["runtime"]
    result["psnr_vs_16bit"] = {name: method["psnr"] for name, method in report["methods"].items()}
    result["kernels_vs_reference_path"] = report.get("kernels_vs_reference_path")
    fused = (report["kernels_vs_reference_path"] or {}).get("fused_calls", 0)
    if not report["runtime"].startswith("fused") or (emulate and not fused):
        raise RuntimeError(f"validation did not run the fused kernels: {report['runtime']}")


def part_streamed_block(emulate: bool, result: dict, save) -> None:
    """One FLUX.1-width double block written on disk and quantized streamed (tiny-flux's widths with
    --emulate: a FLUX width on a CPU is `make test-scale`'s business)."""
    import torch

    work = Path(tempfile.mkdtemp())
    model = work / "model"
    if emulate:
        from svdq_cli.models.registry import ADAPTERS

        ADAPTERS["tiny-flux"].build_tiny(0, torch.bfloat16).save_pretrained(model)
    else:
        from svdq_cli.models.shaped import write_flux_shaped

        result["checkpoint_bytes"] = write_flux_shaped(model, double=1, single=0)
    device = ["--device", "cpu"] if emulate else ["--device", "cuda"]
    sizes = ["--dtype", "bfloat16", "--num-prompts", "1", "--steps", "1", "--resolution", "64" if emulate else "256"]
    result.update(quantize_run([str(model), "--stream", "--until", "quantize", *sizes, *device], work / "run",
                               emulate))


def quantize_run(arguments: list[str], run: Path, emulate: bool) -> dict:
    """``svdq quantize`` in this process (so that its peak GPU memory can be read); stage seconds and peaks."""
    import torch

    from svdq_cli.cli.main import main

    cuda = not emulate and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    argv, sys.argv = sys.argv, ["svdq", "quantize", *arguments, "--out", str(run), "--json"]
    begin = time.perf_counter()
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = argv
    if code:
        raise RuntimeError(f"svdq quantize {' '.join(arguments)} exited {code}")
    manifest = json.loads((run / "manifest.json").read_text())
    figures = {"wall_seconds": time.perf_counter() - begin,
               "stage_seconds": {name: stage.get("seconds") for name, stage in manifest["stages"].items()}}
    if cuda:
        figures["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    figures["peak_host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this part's process
    return figures


PARTS = {"tests": part_tests, "kernels": part_kernels, "end_to_end": part_end_to_end,
         "streamed_block": part_streamed_block}


def run_child(part: str, emulate: bool, result_file: Path) -> int:
    """The child's side: run one part, writing its figures (and its failure, if it fails) to ``result_file``."""
    result: dict = {}

    def save() -> None:
        write_json(result_file, result)

    try:
        PARTS[part](emulate, result, save)
        result["status"] = "passed"
    except BaseException as error:  # the report says what failed; the parent goes on with the next part
        from svdq_cli.errors import gist

        result.update(status="failed", error=f"{type(error).__name__}: {gist(error, 500)}")
    save()
    return 0


# ---------------------------------------------------------------- the parent: budgets and the report
def run_part(command: list[str], budget: float, result_file: Path, env: dict | None = None) -> dict:
    """Run a child command under ``budget`` seconds; what it wrote to ``result_file`` survives a timeout or a
    crash, with the reason added."""
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget, env=env)
        outcome = None if done.returncode == 0 else f"exited {done.returncode}: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        outcome = f"over its budget of {budget:.0f} s: stopped"
    result = read_json(result_file) or {}
    if outcome is not None:
        result.update(status="failed", error=outcome if "error" not in result else f"{result['error']}; {outcome}")
    result.setdefault("status", "failed")
    if result["status"] == "failed" and not result.get("error"):
        result["error"] = "the part wrote no result"
    result["seconds"] = round(time.perf_counter() - begin, 1)
    result["budget_seconds"] = budget
    return result


def install(budget: float) -> dict:
    """The carried wheels into a private site directory put first on the path (no index: offline machine)."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"status": "passed", "wheels": [], "note": "no .whl/ carried: the machine's own packages are used"}
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
        status = "passed" if done.returncode == 0 else "failed"
        error = None if done.returncode == 0 else done.stderr.strip()[-300:]
    except subprocess.TimeoutExpired:
        status, error = "failed", f"over its budget of {budget} s"
    return {"status": status, "error": error, "wheels": [w.name for w in wheels],
            "seconds": round(time.perf_counter() - begin, 1)}


def machine() -> dict:
    sys.path.insert(0, str(ROOT))
    from svdq_cli.version import __version__

    info = {"svdq": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "cupy-cuda13x", "cupy-cuda12x", "diffusers", "transformers"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
        line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
        info["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in line.split(",")), strict=False))
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return info


def cuda_device() -> str | None:
    """The GPU's name and capability, or None (asked in a child: the parent never initializes CUDA)."""
    probe = ("import torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
             "print(f'{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs' if p else '')")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


def check_report(report: dict) -> list[str]:
    """What the report lacks of its schema (CI runs --emulate to keep the schema honest)."""
    problems = [f"missing {key}" for key in ("schema", "mode", "machine", "parts", "seconds") if key not in report]
    for name, part in report.get("parts", {}).items():
        if part.get("status") not in ("passed", "failed", "skipped"):
            problems.append(f"{name}: status {part.get('status')!r}")
        if part.get("status") == "failed" and not part.get("error"):
            problems.append(f"{name}: failed without a message")
    for row in report.get("parts", {}).get("kernels", {}).get("rows", []):
        for variant, figures in row["variants"].items():
            if not all(isinstance(figures.get(key), float) and figures[key] > 0 for key in ("us", "tflops", "gbps")):
                problems.append(f"kernels {row['K']}x{row['N']} {variant}: figures missing")
    return problems


def print_table(report: dict) -> None:
    print(f"gpu-check ({report['mode']}): {report.get('device') or 'no GPU'}, {report['seconds']:.0f} s")
    for name, part in report["parts"].items():
        line = f"  {name:<15} {part['status']:<7} {part.get('seconds', 0):>6.1f} s"
        print(line + (f"  {part['error']}" if part.get("error") else ""))
    if report["mode"] == "emulated":
        print("  (emulated: the timings below time the CPU emulator and torch on this CPU, not a GPU)")
    for row in report["parts"].get("kernels", {}).get("rows", []):
        variants = row["variants"]
        print(f"  {row['K']:>5}x{row['N']:<5} " + "  ".join(f"{name} {figures['us']:.1f} µs"
                                                           for name, figures in variants.items())
              + f"  low-rank +{row['lowrank_overhead_percent']:.0f}% (naive +{row['naive_overhead_percent']:.0f}%)")


def write_json(path: Path, document: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str))
    os.replace(temporary, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def carried_requirements() -> list[str]:
    """``name==version`` for :data:`CARRIED_ROOTS` and everything they require on Python 3.12 / Linux x86-64,
    at the versions installed here (the ones the test suite ran on), less :data:`IMAGE_PROVIDES`."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    skip = {canonicalize_name(name) for name in IMAGE_PROVIDES}
    pending, found = list(CARRIED_ROOTS), {}
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found or name in skip:
            continue
        found[name] = importlib.metadata.version(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(requirement.name)
    return sorted(f"{name}=={version}" for name, version in found.items())


def fetch_wheels() -> int:
    """Download, here, the wheels to carry (see :func:`carried_requirements`) for the GPU image's Python 3.12
    on x86-64 Linux, into .whl/ (git-ignored; name it in the device call's ``carry``)."""
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *carried_requirements()]
    done = subprocess.run(command)
    size = sum(path.stat().st_size for path in WHEELS.glob("*.whl"))
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {WHEELS}")
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulate", action="store_true", help="run the parts on the CPU emulator at small shapes")
    parser.add_argument("--parts", default=",".join(["install", *PARTS]), help="comma-separated parts to run")
    parser.add_argument("--out", type=Path, help="the report's path (default: $OUT/gpu-check.json, else ./)")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels to carry, then stop")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch_wheels:
        return fetch_wheels()
    if args.part:
        return run_child(args.part, args.emulate, args.result)
    return run_all(args)


def run_all(args) -> int:
    begin = time.perf_counter()
    out = args.out or Path(os.environ.get("OUT") or ".") / "gpu-check.json"
    parts = [part for part in args.parts.split(",") if part]
    unknown = [part for part in parts if part != "install" and part not in PARTS]
    if unknown:
        print(f"Error: unknown part(s) {', '.join(unknown)} (known: install, {', '.join(PARTS)})", file=sys.stderr)
        return 2
    report = {"schema": SCHEMA, "mode": "emulated" if args.emulate else "gpu", "machine": machine(), "parts": {},
              "seconds": 0.0}
    if "install" in parts:
        report["parts"]["install"] = {"status": "skipped", "note": "emulated: this environment's packages"} \
            if args.emulate else install(BUDGETS["install"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    report["device"] = None if args.emulate else cuda_device()
    if not args.emulate and report["device"] is None:
        print("gpu-check: no CUDA device here, nothing measured (`--emulate` runs the script on the CPU emulator)")
        return 0
    write_json(out, report)
    for part in parts:
        if part == "install":
            continue
        result_file = Path(tempfile.mkdtemp()) / f"{part}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--result", str(result_file),
                   *(["--emulate"] if args.emulate else [])]
        report["parts"][part] = run_part(command, BUDGETS[part], result_file, env)
        report["seconds"] = round(time.perf_counter() - begin, 1)
        write_json(out, report)
    problems = check_report(report)
    report["schema_problems"] = problems
    write_json(out, report)
    print_table(report)
    print(f"report: {out}")
    failed = [name for name, part in report["parts"].items() if part["status"] == "failed"]
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
