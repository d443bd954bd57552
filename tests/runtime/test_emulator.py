"""The CUDA-on-CPU emulator's own semantics, on small kernels written for the purpose.

Numeric collectives (shuffles, votes, every mma shape, ldmatrix) are checked against numpy statements of the
CUDA/PTX ISA rules on fresh random inputs; faults (deadlock, divergence, barriers, races, out-of-bounds
accesses, unsupported PTX, mistyped arguments) must be errors naming the problem.
"""

import numpy as np
import pytest
import torch

from svdq_cli.runtime.emulator.backend import (
    EmulatedBackend,
    EmulatorError,
    EmulatorUnavailable,
    KernelFault,
    toolchain,
)
from svdq_cli.runtime.emulator.translate import TranslationError, kernel_parameters, translate

try:
    toolchain()
except EmulatorUnavailable as missing:
    pytest.skip(str(missing), allow_module_level=True)

SOURCE = r"""
#include <stdint.h>

__global__ void block_sum(const float* x, float* out) {
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __shared__ float partial[32];
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < blockDim.x / 32; ++w) total += partial[w];
        out[blockIdx.x] = total;
    }
}

__global__ void shuffles(const int* x, int* out, int argument, int width) {
    const int v = x[threadIdx.x];
    out[threadIdx.x] = __shfl_sync(0xffffffffu, v, argument, width);
    out[32 + threadIdx.x] = __shfl_up_sync(0xffffffffu, v, argument, width);
    out[64 + threadIdx.x] = __shfl_down_sync(0xffffffffu, v, argument, width);
    out[96 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, argument, width);
    const int p = x[threadIdx.x] & 1;
    out[128 + threadIdx.x] = (int)__ballot_sync(0xffffffffu, p);
    out[160 + threadIdx.x] = __any_sync(0xffffffffu, p) + 2 * __all_sync(0xffffffffu, p);
}

// Each lane loads its own registers (a: 4, b: 2, c: 4 words) and stores d.
#define MMA_KERNEL(name, text)                                                                           \
__global__ void name(const uint32_t* a, const uint32_t* b, const uint32_t* c, uint32_t* d) {           \
    const int l = threadIdx.x;                                                                          \
    uint32_t r[4] = {c[l * 4], c[l * 4 + 1], c[l * 4 + 2], c[l * 4 + 3]};                               \
    asm volatile(text " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                       \
                 : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])                                       \
                 : "r"(a[l * 4]), "r"(a[l * 4 + 1]), "r"(a[l * 4 + 2]), "r"(a[l * 4 + 3]),              \
                   "r"(b[l * 2]), "r"(b[l * 2 + 1]));                                                   \
    for (int q = 0; q < 4; ++q) d[l * 4 + q] = r[q];                                                    \
}
MMA_KERNEL(mma_s8, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32")
MMA_KERNEL(mma_u8s8, "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32")
MMA_KERNEL(mma_s4, "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32")
MMA_KERNEL(mma_u4s4, "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32")
MMA_KERNEL(mma_bf16, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
MMA_KERNEL(mma_f16, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
MMA_KERNEL(mma_tf32, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")

// Four 8x8 matrices of 16-bit elements in shared memory, row r of matrix j at tile[j][r]; ldmatrix them.
__global__ void load_matrices(const uint16_t* tiles, uint32_t* out, int transpose) {
    __shared__ __align__(16) uint16_t tile[4][8][8];
    for (int i = threadIdx.x; i < 256; i += 32) (&tile[0][0][0])[i] = tiles[i];
    __syncwarp();
    const int l = threadIdx.x;
    const uint32_t row = (uint32_t)__cvta_generic_to_shared(&tile[l / 8][l % 8][0]);
    uint32_t r[4], t[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(t[0]), "=r"(t[1]), "=r"(t[2]), "=r"(t[3]) : "r"(row));
    for (int j = 0; j < 4; ++j) out[l * 4 + j] = transpose ? t[j] : r[j];
}

// cp.async into shared memory in two committed groups; read before the waits (poison) and after.
__global__ void async_copy(const uint32_t* src, uint32_t* before, uint32_t* after) {
    __shared__ __align__(16) uint32_t buffer[256];
    const int t = threadIdx.x;
    const uint32_t dst0 = (uint32_t)__cvta_generic_to_shared(&buffer[t * 4]);
    const uint32_t dst1 = (uint32_t)__cvta_generic_to_shared(&buffer[128 + t * 4]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst0), "l"(src + t * 4));
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst1), "l"(src + 128 + t * 4), "r"(8));
    asm volatile("cp.async.commit_group;\n" ::);
    before[t] = buffer[t * 4];
    asm volatile("cp.async.wait_group %0;\n" :: "n"(1));
    before[32 + t] = buffer[t * 4];        // the first group is done
    before[64 + t] = buffer[128 + t * 4];  // the second is not
    asm volatile("cp.async.wait_all;\n" ::);
    for (int j = 0; j < 4; ++j) after[t * 8 + j] = buffer[t * 4 + j], after[t * 8 + 4 + j] = buffer[128 + t * 4 + j];
}

__global__ void copy(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + x[(i + 1) % n];
}

// ---------------------------------------------------------------- kernels that must fail
__global__ void divergent_exit(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
__global__ void divergent_sites(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else v = __ballot_sync(0xffffffffu, v > 20.f);
    out[threadIdx.x] = v;
}
__global__ void partial_barrier(float* out) {
    if (threadIdx.x < 64) __syncthreads();
    out[threadIdx.x] = 1.f;
}
__global__ void partial_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1); }
__global__ void unsupported(float* out) {
    uint32_t r = 0;
    asm volatile("prmt.b32 %0, %0, %0, 0x3210;\n" : "+r"(r));
    out[threadIdx.x] = r;
}
__global__ void shared_race(float* out) {
    __shared__ float s[128];
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % 128];
}
__global__ void shared_out_of_bounds(float* out) {
    __shared__ float s[128];
    s[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x + 1];
}
__global__ void global_out_of_bounds(float* out, int n) { out[threadIdx.x + n] = 1.f; }
__global__ void two_writers(float* out) { out[threadIdx.x / 2] = threadIdx.x; }
__global__ void too_much_shared(float* out) {
    __shared__ float s[13 * 1024];
    s[threadIdx.x] = 1.f;
    out[threadIdx.x] = s[threadIdx.x];
}
__global__ void misaligned_copy(const uint32_t* src) {
    __shared__ __align__(16) uint32_t buffer[64];
    const uint32_t dst = (uint32_t)__cvta_generic_to_shared(&buffer[1]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(src));
    asm volatile("cp.async.wait_all;\n" ::);
}
"""

NAMES = ["block_sum", "shuffles", "mma_s8", "mma_u8s8", "mma_s4", "mma_u4s4", "mma_bf16", "mma_f16", "mma_tf32",
         "load_matrices", "async_copy", "copy", "divergent_exit", "divergent_sites", "partial_barrier",
         "partial_mask", "unsupported", "shared_race", "shared_out_of_bounds", "global_out_of_bounds",
         "two_writers", "too_much_shared", "misaligned_copy"]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "checked"])
def backend(request):
    return EmulatedBackend(checked=request.param, threads=2)


@pytest.fixture(scope="module")
def module(backend):
    return backend.module(SOURCE, NAMES, "emulator_test.cu")


def run(module, backend, name, grid, block, *args):
    converted = [backend.array(a) if isinstance(a, torch.Tensor) else a for a in args]
    return module.get_function(name)(grid, block, converted)


def test_block_reduction_through_shuffles_and_shared_memory(module, backend, gen):
    x = torch.randn(5, 256, generator=gen)
    out = torch.full((5,), float("nan"))
    run(module, backend, "block_sum", (5,), (256,), x, out)
    np.testing.assert_allclose(out.numpy(), x.double().sum(1).numpy(), rtol=1e-5, atol=1e-4)


def _cuda_shuffle(values, mode, argument, width):  # the CUDA programming guide's rules, lane by lane
    out = []
    for lane in range(32):
        base = lane - lane % width
        if mode == "idx":
            source = base + argument % width
        elif mode == "up":
            source = lane - argument if lane - base >= argument else lane
        elif mode == "down":
            source = lane + argument if lane - base + argument < width else lane
        else:
            source = lane ^ argument if base <= (lane ^ argument) < base + width else lane
        out.append(values[source])
    return out


@pytest.mark.parametrize("argument,width", [(3, 32), (1, 8), (5, 16), (17, 32)])
def test_shuffles_and_votes_follow_cuda(module, backend, gen, argument, width):
    x = torch.randint(-1000, 1000, (32,), generator=gen, dtype=torch.int32)
    out = torch.zeros(192, dtype=torch.int32)
    run(module, backend, "shuffles", (1,), (32,), x, out, np.int32(argument), np.int32(width))
    values = x.tolist()
    for offset, mode in enumerate(("idx", "up", "down", "xor")):
        assert out[32 * offset : 32 * offset + 32].tolist() == _cuda_shuffle(values, mode, argument, width), mode
    ballot = sum(1 << lane for lane in range(32) if values[lane] & 1)
    assert out[128:160].tolist() == [np.int32(np.uint32(ballot))] * 32
    assert out[160:].tolist() == [int(ballot != 0) + 2 * int(ballot == 0xFFFFFFFF)] * 32


MMA = {  # name: (k, bits, a signed, b signed, float)
    "mma_s8": (32, 8, True, True, False), "mma_u8s8": (32, 8, False, True, False),
    "mma_s4": (64, 4, True, True, False), "mma_u4s4": (64, 4, False, True, False),
    "mma_bf16": (16, 16, True, True, torch.bfloat16), "mma_f16": (16, 16, True, True, torch.float16),
}


def _registers(matrix_codes, bits, rows, cols, lane_rows, lane_cols):
    """Pack elements into 32-bit registers: element i of a register at bits i·width (PTX fragment order)."""
    per = 32 // bits
    words = np.zeros((32, len(lane_rows)), dtype=np.uint64)
    for lane in range(32):
        gid, tid = divmod(lane, 4)
        for q, (row_of, col_of) in enumerate(zip(lane_rows, lane_cols, strict=True)):
            for i in range(per):
                value = int(matrix_codes[row_of(gid, tid, i), col_of(gid, tid, i)]) & ((1 << bits) - 1)
                words[lane, q] |= value << (bits * i)
    return words.astype(np.uint32)


@pytest.mark.parametrize("name", sorted(MMA))
def test_mma_follows_the_ptx_fragment_layouts(module, backend, gen, name):
    k, bits, a_signed, b_signed, floating = MMA[name]
    e, half = 32 // bits, k // 2
    if floating:
        a = torch.randn(16, k, generator=gen).to(floating)
        b = torch.randn(k, 8, generator=gen).to(floating)
        c = torch.randn(16, 8, generator=gen)
        a_codes, b_codes = a.view(torch.int16).numpy(), b.view(torch.int16).numpy()
        c_words = c.numpy().view(np.uint32)
        expected = a.double() @ b.double() + c.double()
    else:
        low = -(1 << (bits - 1))
        a_codes = torch.randint(low if a_signed else 0, (1 << (bits - 1)) if a_signed else 1 << bits, (16, k),
                                generator=gen).numpy()
        b_codes = torch.randint(low, 1 << (bits - 1), (k, 8), generator=gen).numpy()
        c = torch.randint(-(1 << 20), 1 << 20, (16, 8), generator=gen, dtype=torch.int32)
        c_words = c.numpy().view(np.uint32)
        expected = torch.from_numpy(a_codes).long() @ torch.from_numpy(b_codes).long() + c.long()
    # PTX ISA: a0 (gid, tid·e+i), a1 (gid+8, …), a2 (gid, k/2 + tid·e+i), a3 (gid+8, k/2 + …); b0 (tid·e+i, gid),
    # b1 (k/2 + tid·e+i, gid); c0 (gid, 2tid), c1 (gid, 2tid+1), c2 (gid+8, 2tid), c3 (gid+8, 2tid+1).
    a_words = _registers(a_codes, bits, 16, k,
                         [lambda g, t, i, r=r: g + 8 * r for r in (0, 1, 0, 1)],
                         [lambda g, t, i, h=h: h + t * e + i for h in (0, 0, half, half)])
    b_words = _registers(b_codes, bits, k, 8, [lambda g, t, i, h=h: h + t * e + i for h in (0, half)],
                         [lambda g, t, i: g] * 2)
    lanes = np.arange(32)
    gid, tid = lanes // 4, lanes % 4
    c_lane = np.stack([c_words[gid, 2 * tid], c_words[gid, 2 * tid + 1], c_words[gid + 8, 2 * tid],
                       c_words[gid + 8, 2 * tid + 1]], axis=1)
    d = torch.zeros(32 * 4, dtype=torch.int32)
    run(module, backend, name, (1,), (32,), torch.from_numpy(a_words.reshape(-1).view(np.int32)),
        torch.from_numpy(b_words.reshape(-1).view(np.int32)),
        torch.from_numpy(np.ascontiguousarray(c_lane).reshape(-1).view(np.int32)), d)
    d = d.numpy().reshape(32, 4)
    got = np.zeros((16, 8), dtype=np.float64 if floating else np.int64)
    view = d.view(np.float32) if floating else d
    got[gid, 2 * tid], got[gid, 2 * tid + 1] = view[:, 0], view[:, 1]
    got[gid + 8, 2 * tid], got[gid + 8, 2 * tid + 1] = view[:, 2], view[:, 3]
    if floating:
        np.testing.assert_allclose(got, expected.float().double().numpy(), rtol=0, atol=0)
    else:
        np.testing.assert_array_equal(got, expected.numpy())
    if backend.checked:
        assert backend.launches[-1].mma == {
            {32: "m16n8k32.s8", 64: "m16n8k64.s4", 16: "m16n8k16.f16"}[k]: 1}


@pytest.mark.parametrize("transpose", [False, True])
def test_ldmatrix_gives_each_lane_its_fragment(module, backend, gen, transpose):
    tiles = torch.randint(0, 1 << 16, (4, 8, 8), generator=gen, dtype=torch.int32).to(torch.int16)
    out = torch.zeros(128, dtype=torch.int32)
    run(module, backend, "load_matrices", (1,), (32,), tiles.reshape(-1), out, np.int32(transpose))
    words = out.numpy().view(np.uint32).reshape(32, 4)
    elements = tiles.numpy().view(np.uint16)
    for lane in range(32):
        for j in range(4):
            if transpose:  # rows 2·(l%4) and 2·(l%4)+1 of column l/4
                low, high = elements[j, 2 * (lane % 4), lane // 4], elements[j, 2 * (lane % 4) + 1, lane // 4]
            else:  # row l/4, columns 2·(l%4) and 2·(l%4)+1
                low, high = elements[j, lane // 4, 2 * (lane % 4)], elements[j, lane // 4, 2 * (lane % 4) + 1]
            assert words[lane, j] == int(low) | int(high) << 16, (lane, j)


def test_cp_async_lands_at_its_wait_group(module, backend, gen):
    src = torch.randint(0, 1 << 30, (256,), generator=gen, dtype=torch.int32)
    before, after = torch.zeros(96, dtype=torch.int32), torch.zeros(256, dtype=torch.int32)
    run(module, backend, "async_copy", (1,), (32,), src, before, after)
    poison = -1  # shared memory starts as 0xFF bytes
    assert (before[:32] == poison).all(), "data must not land before its group is waited for"
    assert before[32:64].tolist() == src[0:128:4].tolist()
    assert (before[64:] == poison).all()
    after = after.reshape(32, 8)
    assert after[:, :4].reshape(-1).tolist() == src[:128].tolist()
    second = src[128:].reshape(32, 4).clone()
    second[:, 2:] = 0  # src-size 8 of 16: the rest is zero-filled
    assert after[:, 4:].tolist() == second.tolist()


def test_checked_builds_count_global_bytes(backend, module, gen):
    if not backend.checked:
        pytest.skip("counters come from the checked build")
    x, y = torch.randn(1000, generator=gen), torch.zeros(1000)
    record = run(module, backend, "copy", (8,), (128,), x, y, np.int32(1000))
    assert torch.equal(y, x + x.roll(-1))
    assert record.arguments["x"] == {"bytes": 4000, "load": 8000, "store": 0, "unique_load": 4000, "unique_store": 0}
    assert record.arguments["y"]["store"] == 4000 and record.arguments["y"]["unique_store"] == 4000
    assert record.grid == (8, 1, 1) and record.block == (128, 1, 1) and record.flops == 0


FAULTS = [  # kernel, message, needs the checked build
    ("divergent_exit", "deadlock", False),
    ("divergent_sites", "reached different warp collectives", False),
    ("partial_barrier", "wait at __syncthreads", False),
    ("partial_mask", "full-warp masks only", False),
    ("unsupported", "unsupported PTX 'prmt.b32", False),
    ("too_much_shared", "exceeds the 49152-byte limit", False),
    ("shared_race", "shared-memory race", True),
    ("shared_out_of_bounds", "outside the 512 bytes declared", True),
    ("global_out_of_bounds", "out-of-bounds 4-byte write", True),
    ("two_writers", "two threads write byte", True),
]


@pytest.mark.parametrize("name,message,needs_checks", FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_are_errors_naming_the_problem(module, backend, name, message, needs_checks):
    if needs_checks and not backend.checked:
        pytest.skip("memory checks come from the checked build")
    args = [torch.zeros(256)] + ([np.int32(200)] if name == "global_out_of_bounds" else [])
    with pytest.raises(KernelFault, match=message.replace("(", r"\(")):
        run(module, backend, name, (1,), (128,), *args)


def test_misaligned_cp_async_and_bad_launches_are_refused(module, backend):
    with pytest.raises(KernelFault, match="16-byte aligned"):
        run(module, backend, "misaligned_copy", (1,), (32,), torch.zeros(64, dtype=torch.int32))
    with pytest.raises(KernelFault, match=r"unsupported PTX 'mma.sync.aligned.m16n8k8"):
        run(module, backend, "mma_tf32", (1,), (32,), *[torch.zeros(128, dtype=torch.int32)] * 4)
    x = torch.zeros(4)
    copy = module.get_function("copy")
    with pytest.raises(EmulatorError, match="argument 2 \\(n\\) must be a numpy int32, got int"):
        copy((1,), (32,), (backend.array(x), backend.array(x), 4))
    with pytest.raises(EmulatorError, match="takes 3 arguments, got 2"):
        copy((1,), (32,), (backend.array(x), backend.array(x)))
    with pytest.raises(EmulatorError, match="exceeds CUDA's limits"):
        copy((1, 70000), (32,), (backend.array(x), backend.array(x), np.int32(4)))
    with pytest.raises(EmulatorError, match="must be a device array"):
        copy((1,), (32,), (x, backend.array(x), np.int32(4)))


def test_a_name_expression_that_does_not_compile_is_an_error(backend):
    source = "template <typename T, int R, bool A, bool B> __global__ void k(T* x) { x[0] = R; }\n"
    with pytest.raises(EmulatorError, match="compiling k.cu for the emulator failed"):
        backend.module(source, ["k<float, 32, false>"], "k.cu")  # one template argument short


def test_translation_keeps_lines_and_refuses_what_it_cannot_read():
    source = 'x;\nasm volatile("mma.sync ...;\\n"\n  : "+r"(c)\n  : "r"(a));\n__shared__ float s[4][8];\ny;\n'
    translated = translate(source)
    assert translated.count("\n") == source.count("\n")
    assert '::svdq_emu::ptx("mma.sync ...;\\n", {::svdq_emu::inout(c)}, {::svdq_emu::in(a)})' in translated
    assert "shared_static" in translated and translated.splitlines()[-1] == "y;"
    with pytest.raises(TranslationError):
        translate("__shared__ float a[4], b[4];\n")
    with pytest.raises(TranslationError):
        translate('asm volatile("x;" : "=q"(r));\n')
    assert kernel_parameters("__global__ void k(const float* __restrict__ x, int n) {}", "k") == ["x", "n"]
