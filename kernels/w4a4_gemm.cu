// W4A4 GEMM with the low-rank up-projection and bias in the epilogue (DESIGN.md §1 step 4):
//   y[m, n] = Σ_g ascale[g, m] · wscale[g, n] · Σ_{k∈g} a[m, k] · w[n, k]  +  Σ_r down[m, r] · up[n, r]  +  bias[n]
// int32 accumulation inside a group of 64, float scaling across groups (acc = fma(dot, as·ws, acc), groups in
// order), the branch added in rank order, y written once in the model dtype.
//
// v2 (see benchmarks/kernels-notes.md). A block computes a 128 (M) × 128 (N) tile with 8 warps in a 2 × 4
// grid, each warp 64 × 32 (4 m16 × 4 n8 MMA tiles). Per group of 64 along K, the block's activation codes
// (128 rows × 32 bytes), weight fragments (16 n8 tiles × 32 lanes × 8 bytes) and both scale vectors are staged
// in shared memory by cp.async in a three-stage pipeline, so every operand byte a block needs is read from
// global memory once per block. The A fragments come from shared memory by ldmatrix.x4 (rows padded to 48
// bytes: conflict-free). The epilogue stages the block's rows of ``down`` and columns of ``lora_up`` in
// shared memory, 32 ranks at a time (coalesced 16-byte copies), instead of every thread reading them from
// global memory per output element.
//
// Two tensor-core paths (template S4), with gid = lane / 4 and tid = lane % 4 (PTX ISA fragment maps):
// - S4 (sm_80/86/89): mma.sync.m16n8k64 s4 (u4 for unsigned activations), one per group of 64. ldmatrix.x4
//   over rows 0-7/8-15 × bytes 0-15/16-31 of a 16 × 64 tile gives exactly a0..a3 (row gid / gid+8, codes
//   tid·8 .. +7 and 32 + tid·8 .. +7); b0 and b1 are the weight words below.
// - int8 (sm_90, which has no 4-bit MMA): mma.sync.m16n8k32 on codes widened to int8 in registers, two per
//   group. The same registers serve: for the first MMA, a0 = low half of the S4 a0 (codes tid·8 .. +3),
//   a2 = its high half (tid·8+4 .. +7), a1/a3 likewise from the S4 a1, b0/b1 the halves of the S4 b0; the
//   second MMA takes a2/a3 and b1. That maps the MMA's k = tid·4 + i and 16 + tid·4 + i onto the group's codes
//   tid·8 + i and tid·8 + 4 + i for both operands alike, so the dot products are the S4 path's, exactly.
// Weights are re-packed once at load (svdq_cli/runtime/fragments.py): [K/64, Npad/8, 32 lanes, 2] uint32, one
// lane's (b0, b1) = codes n = tile·8 + gid, k = g·64 + tid·8 .. +7 and g·64 + 32 + tid·8 .. +7, low nibble
// first. The activation side comes from quantize_lora_down.cu padded to Mpad = a multiple of 128 rows, with
// zero codes, scales and branch rows past M, so full tiles are always in bounds.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

constexpr int kGroup = 64;
constexpr int kTile = 128;        // block tile, M and N
constexpr int kThreads = 256;     // 8 warps
constexpr int kStages = 3;        // cp.async pipeline depth, in groups of 64
constexpr int kRowBytes = 48;     // one activation row of a group (32 bytes) padded against bank conflicts
constexpr int kRankChunk = 32;    // ranks staged at a time in the epilogue
constexpr int kDownStride = kRankChunk + 4;   // floats per staged row of down (bank-conflict padding)
constexpr int kUpStride = kRankChunk + 8;     // 16-bit elements per staged column of lora_up

constexpr int kStageA = kTile * kRowBytes;    // 6144 bytes
constexpr int kStageB = kTile / 8 * 32 * 8;   // 4096 bytes
constexpr int kStageBytes = kStageA + kStageB + 2 * kTile * 4;
constexpr int kPipelineBytes = kStages * kStageBytes;
constexpr int kEpilogueBytes = kTile * kDownStride * 4 + kTile * kUpStride * 2;
constexpr int kSharedBytes = kPipelineBytes > kEpilogueBytes ? kPipelineBytes : kEpilogueBytes;

__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void copy16(void* shared, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(shared)), "l"(global));
}

// Zero-filled where the source row does not exist (lora_up past N): src-size 0 reads nothing.
__device__ __forceinline__ void copy16_or_zero(void* shared, const void* global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void wait_pending() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four nibbles (bits 4j..4j+3 = element j) to four bytes, sign-extended or zero-extended.
template <bool SIGNED>
__device__ __forceinline__ uint32_t widen4(uint32_t nibbles) {
    const uint32_t bytes = (nibbles & 0xFu) | ((nibbles & 0xF0u) << 4) | ((nibbles & 0xF00u) << 8) |
                           ((nibbles & 0xF000u) << 12);
    return SIGNED ? __vsub4(bytes ^ 0x08080808u, 0x08080808u) : bytes;
}

template <bool UNSIGNED_A>
__device__ __forceinline__ void mma_16832(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
    if (UNSIGNED_A) {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

template <bool UNSIGNED_A>
__device__ __forceinline__ void mma_16864(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if (UNSIGNED_A) {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// The 16 × 64 A fragment of one m16 tile: rows row0 .. row0+15 of a staged group.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const unsigned char* stage_a, int row0, int lane) {
    const unsigned char* row = stage_a + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(shared_address(row)));
}

// Issue the copies of group g into a stage: 256 threads, one 16-byte chunk each of A and of B, plus scales.
__device__ __forceinline__ void load_stage(unsigned char* stage, const uint8_t* act_packed, const float* act_scales,
                                           const uint32_t* w_frag, const float* w_scales, int g, int m0, int n0,
                                           int Mpad, int Npad, int K) {
    const int t = threadIdx.x;
    unsigned char* stage_a = stage;
    unsigned char* stage_b = stage + kStageA;
    float* stage_as = reinterpret_cast<float*>(stage + kStageA + kStageB);
    float* stage_ws = stage_as + kTile;
    const int row = t >> 1, half = t & 1;
    copy16(stage_a + row * kRowBytes + half * 16, act_packed + (size_t)(m0 + row) * (K / 2) + g * 32 + half * 16);
    copy16(stage_b + t * 16, reinterpret_cast<const unsigned char*>(w_frag) +
                                 ((size_t)g * (Npad / 8) + n0 / 8) * 256 + t * 16);
    if (t < 32) copy16(stage_as + t * 4, act_scales + (size_t)g * Mpad + m0 + t * 4);
    else if (t < 64) copy16(stage_ws + (t - 32) * 4, w_scales + (size_t)g * Npad + n0 + (t - 32) * 4);
}

template <typename T, int RANK, bool UNSIGNED_A, bool S4>
__global__ void __launch_bounds__(kThreads, 1) w4a4_gemm(
    const uint8_t* __restrict__ act_packed,   // [Mpad, K/2]
    const float* __restrict__ act_scales,     // [K/64, Mpad]
    const uint32_t* __restrict__ w_frag,      // [K/64, Npad/8, 32, 2]
    const float* __restrict__ w_scales,       // [K/64, Npad]
    const float* __restrict__ down,           // [Mpad, RANK]
    const T* __restrict__ lora_up,            // [N, RANK]
    const T* __restrict__ bias,               // [N]
    T* __restrict__ out,                      // [M, N]
    int M, int N, int Mpad, int Npad, int K)
{
    __shared__ __align__(16) unsigned char smem[kSharedBytes];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gid = lane / 4, tid = lane % 4;
    const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
    const int warp_m = (warp % 2) * 64, warp_n = (warp / 2) * 32;
    const int groups = K / kGroup;
    float acc[4][4][4] = {};

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < groups) load_stage(smem + s * kStageBytes, act_packed, act_scales, w_frag, w_scales, s, m0, n0, Mpad, Npad, K);
        commit();
    }
    for (int g = 0; g < groups; ++g) {
        wait_pending<kStages - 2>();
        __syncthreads();  // group g has landed for every thread; everyone is done with the stage refilled next
        if (g + kStages - 1 < groups)
            load_stage(smem + (g + kStages - 1) % kStages * kStageBytes, act_packed, act_scales, w_frag, w_scales,
                       g + kStages - 1, m0, n0, Mpad, Npad, K);
        commit();

        const unsigned char* stage = smem + g % kStages * kStageBytes;
        const uint2* stage_b = reinterpret_cast<const uint2*>(stage + kStageA);
        const float* stage_as = reinterpret_cast<const float*>(stage + kStageA + kStageB);
        const float* stage_ws = stage_as + kTile;
        uint2 b[4];
        float ws[4][2];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            b[ni] = stage_b[(warp_n / 8 + ni) * 32 + lane];
            ws[ni][0] = stage_ws[warp_n + ni * 8 + tid * 2];
            ws[ni][1] = stage_ws[warp_n + ni * 8 + tid * 2 + 1];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            uint32_t a[4];
            load_a(a, stage, warp_m + mi * 16, lane);
            const float as0 = stage_as[warp_m + mi * 16 + gid], as1 = stage_as[warp_m + mi * 16 + gid + 8];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                int dot[4] = {0, 0, 0, 0};
                if constexpr (S4) {
                    mma_16864<UNSIGNED_A>(dot, a, b[ni].x, b[ni].y);
                } else {
                    mma_16832<UNSIGNED_A>(dot, widen4<!UNSIGNED_A>(a[0] & 0xFFFFu), widen4<!UNSIGNED_A>(a[1] & 0xFFFFu),
                                          widen4<!UNSIGNED_A>(a[0] >> 16), widen4<!UNSIGNED_A>(a[1] >> 16),
                                          widen4<true>(b[ni].x & 0xFFFFu), widen4<true>(b[ni].x >> 16));
                    mma_16832<UNSIGNED_A>(dot, widen4<!UNSIGNED_A>(a[2] & 0xFFFFu), widen4<!UNSIGNED_A>(a[3] & 0xFFFFu),
                                          widen4<!UNSIGNED_A>(a[2] >> 16), widen4<!UNSIGNED_A>(a[3] >> 16),
                                          widen4<true>(b[ni].y & 0xFFFFu), widen4<true>(b[ni].y >> 16));
                }
                acc[mi][ni][0] = fmaf((float)dot[0], as0 * ws[ni][0], acc[mi][ni][0]);
                acc[mi][ni][1] = fmaf((float)dot[1], as0 * ws[ni][1], acc[mi][ni][1]);
                acc[mi][ni][2] = fmaf((float)dot[2], as1 * ws[ni][0], acc[mi][ni][2]);
                acc[mi][ni][3] = fmaf((float)dot[3], as1 * ws[ni][1], acc[mi][ni][3]);
            }
        }
    }
    wait_pending<0>();
    __syncthreads();  // the pipeline's shared memory becomes the epilogue's

    // Epilogue: the low-rank up-projection in rank order, 32 ranks of down rows and lora_up columns at a time.
    if constexpr (RANK > 0) {
        constexpr int kChunk = RANK % kRankChunk == 0 ? kRankChunk : 16;  // ranks are multiples of 16
        float* down_s = reinterpret_cast<float*>(smem);                                   // [128][kDownStride]
        T* up_s = reinterpret_cast<T*>(smem + kTile * kDownStride * 4);                   // [128][kUpStride]
        for (int r0 = 0; r0 < RANK; r0 += kChunk) {
            const int t = threadIdx.x;
            for (int i = t; i < kTile * (kChunk / 4); i += kThreads) {  // 16-byte chunks: 4 floats of down
                const int row = i / (kChunk / 4), part = i % (kChunk / 4);
                copy16(down_s + row * kDownStride + part * 4, down + (size_t)(m0 + row) * RANK + r0 + part * 4);
            }
            for (int i = t; i < kTile * (kChunk / 8); i += kThreads) {  // 16-byte chunks: 8 values of lora_up
                const int col = i / (kChunk / 8), part = i % (kChunk / 8);
                const bool valid = n0 + col < N;
                copy16_or_zero(up_s + col * kUpStride + part * 8,
                               lora_up + (size_t)(valid ? n0 + col : 0) * RANK + r0 + part * 8, valid);
            }
            commit();
            wait_pending<0>();
            __syncthreads();
#pragma unroll 4
            for (int r = 0; r < kChunk; ++r) {
                float d[4][2], u[4][2];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                    d[mi][0] = down_s[(warp_m + mi * 16 + gid) * kDownStride + r];
                    d[mi][1] = down_s[(warp_m + mi * 16 + gid + 8) * kDownStride + r];
                }
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    u[ni][0] = load_float(up_s + (warp_n + ni * 8 + tid * 2) * kUpStride + r);
                    u[ni][1] = load_float(up_s + (warp_n + ni * 8 + tid * 2 + 1) * kUpStride + r);
                }
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                        for (int i = 0; i < 4; ++i)
                            acc[mi][ni][i] = fmaf(d[mi][i >> 1], u[ni][i & 1], acc[mi][ni][i]);
            }
            __syncthreads();  // done with this chunk before the next one overwrites it
        }
    }

    // Bias, one write per output element.
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = m0 + warp_m + mi * 16 + gid + (i >= 2 ? 8 : 0);
                const int col = n0 + warp_n + ni * 8 + tid * 2 + (i & 1);
                if (row >= M || col >= N) continue;
                store(out + (size_t)row * N + col, acc[mi][ni][i] + load_float(bias + col));
            }
}

}  // namespace svdq

#ifdef SVDQ_INSTANTIATE
template __global__ void svdq::w4a4_gemm<__nv_bfloat16, 32, false, false>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int);
template __global__ void svdq::w4a4_gemm<__half, 128, true, false>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __half*, const __half*, __half*,
    int, int, int, int, int);
template __global__ void svdq::w4a4_gemm<__nv_bfloat16, 32, false, true>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int);
template __global__ void svdq::w4a4_gemm<__half, 64, true, true>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __half*, const __half*, __half*,
    int, int, int, int, int);
#endif
