"""The kernel tests can fail: bugs planted in copies of kernels/*.cu must each be caught by them.

Each mutant is compiled for a checked emulator (memory and race checks on) and run through the same checks
as test_emulated_kernels.py; the unmutated sources must pass the same harness, so a catch is the bug's doing.
"""

import pytest
import torch

from svdq_cli.runtime import kernels
from svdq_cli.runtime.emulator.backend import EmulatedBackend, EmulatorUnavailable, KernelFault, toolchain
from tests.runtime.kernel_checks import check_activations, check_gemm, make_input, make_layer

try:
    toolchain()
except EmulatorUnavailable as missing:
    pytest.skip(str(missing), allow_module_level=True)

# name: (file, [(original text, planted text)], activation mode, emulated capability)
BUGS = {
    "none": ("w4a4_gemm.cu", [], "signed", (8, 9)),
    "a_fragment_registers_swapped": ("w4a4_gemm.cu", [  # ldmatrix rows and halves trade places: a1 <-> a2
        ("(row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16",
         "(row0 + (lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16")], "signed", (8, 9)),
    "asm_type_u4_for_signed": ("w4a4_gemm.cu", [
        ("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32", "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32")],
        "signed", (8, 9)),
    "int8_b_halves_swapped": ("w4a4_gemm.cu", [
        ("widen4<true>(b[ni].x & 0xFFFFu), widen4<true>(b[ni].x >> 16)",
         "widen4<true>(b[ni].x >> 16), widen4<true>(b[ni].x & 0xFFFFu)")], "unsigned", (9, 0)),
    "epilogue_column_off_by_one": ("w4a4_gemm.cu", [
        ("if (row >= M || col >= N) continue;", "if (row >= M || col > N) continue;")], "signed", (8, 9)),
    "pipeline_reads_a_stage_before_it_lands": ("w4a4_gemm.cu", [
        ("wait_pending<kStages - 2>();", "wait_pending<kStages - 1>();")], "signed", (8, 9)),
    "pipeline_missing_barrier": ("w4a4_gemm.cu", [
        ("        __syncthreads();  // group g has landed", "        // group g has landed")], "signed", (9, 0)),
    "half_warp_reduction": ("quantize_lora_down.cu", [
        ("for (int offset = 16; offset > 0; offset >>= 1)", "for (int offset = 8; offset > 0; offset >>= 1)")],
        "unsigned", (8, 9)),
    "missing_barrier": ("quantize_lora_down.cu", [
        ("            __syncthreads();  // x̂ of every row is staged", "")], "signed", (8, 9)),
}


def planted(file: str, edits: list[tuple[str, str]]):
    def source(stem: str) -> str:
        text = (kernels.data_dir("kernels") / f"{stem}.cu").read_text()
        if f"{stem}.cu" != file:
            return text
        for original, bug in edits:
            assert text.count(original) == 1, f"{file} no longer holds {original!r}: update this mutant"
            text = text.replace(original, bug)
        return text

    return source


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_is_caught(monkeypatch, gen, bug):
    file, edits, act, capability = BUGS[bug]
    monkeypatch.setattr(kernels, "kernel_source", planted(file, edits))
    backend = EmulatedBackend(capability, checked=True, threads=2)  # a fresh backend: its own compiled kernels
    layer = make_layer(256, 136, 32, torch.bfloat16, act, gen)
    x = make_input(37, 256, act, torch.bfloat16, gen)

    def checks():
        check_activations(layer, x, backend)
        check_gemm(layer, x, backend)

    if bug == "none":
        checks()
        return
    with pytest.raises((AssertionError, KernelFault)):
        checks()
