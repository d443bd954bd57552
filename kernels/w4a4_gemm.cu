// W4A4 GEMM with the low-rank up-projection and bias in the epilogue (DESIGN.md §1 step 4):
//   y[m, n] = Σ_g ascale[m, g] · wscale[g, n] · Σ_{k∈g} a[m, k] · w[n, k]  +  Σ_r down[m, r] · up[n, r]  +  bias[n]
// int32 accumulation inside a group of 64, float scaling across groups, y written once in the model dtype.
//
// Two tensor-core variants (template S4), with gid = lane / 4 and tid = lane % 4 (PTX ISA fragment maps):
// - S4 (sm_80/86/89): native 4-bit mma.sync.m16n8k64, one MMA per group of 64:
//     A 16×64: a0 = A[gid][tid*8 .. +7]  a1 = A[gid+8][tid*8 ..]  a2 = A[gid][32+tid*8 ..]  a3 = A[gid+8][32+tid*8 ..]
//     B 64×8:  b0 = B[tid*8 .. +7][gid]  b1 = B[32+tid*8 ..][gid]
//   An A register is one aligned 32-bit load of the canonical packed activations (8 nibbles, low = even k).
// - int8 (sm_90, which has no 4-bit MMA): mma.sync.m16n8k32 on codes widened to int8 in registers, two
//   MMAs per group:
//     A 16×32: a0 = A[gid][tid*4 .. +3]  a1 = A[gid+8][tid*4 ..]  a2 = A[gid][16+tid*4 ..]  a3 = A[gid+8][16+tid*4 ..]
//     B 32×8:  b0 = B[tid*4 .. +3][gid]  b1 = B[16+tid*4 ..][gid]
// Both: C 16×8: c0 = C[gid][tid*2]  c1 = C[gid][tid*2+1]  c2 = C[gid+8][tid*2]  c3 = C[gid+8][tid*2+1].
// Weights are re-packed once at load (svdq_cli/runtime/fragments.py) so each lane's B operand for one MMA
// is contiguous: int8 variant [Npad/8, K/32, 32] uint32 (b0's 4 nibbles, then b1's); S4 variant
// [Npad/8, K/64, 32, 2] uint32 (b0's 8 nibbles, b1's 8 nibbles). A warp reads 128 or 256 contiguous bytes.
// Block: 4 warps, a 32 (M) × 64 (N) tile; warp w owns rows (w % 2) * 16 and columns (w / 2) * 32.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

constexpr int kGroup = 64;
constexpr int kBlockM = 32;
constexpr int kBlockN = 64;
constexpr int kTilesN = 4;  // n8 tiles per warp

__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

// Four nibbles (bits 4j..4j+3 = element j) to four bytes, sign-extended or zero-extended.
template <bool SIGNED>
__device__ __forceinline__ uint32_t widen4(uint32_t nibbles) {
    const uint32_t bytes = (nibbles & 0xFu) | ((nibbles & 0xF0u) << 4) | ((nibbles & 0xF00u) << 8) |
                           ((nibbles & 0xF000u) << 12);
    return SIGNED ? __vsub4(bytes ^ 0x08080808u, 0x08080808u) : bytes;
}

template <bool UNSIGNED_A>
__device__ __forceinline__ void mma_16832(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if (UNSIGNED_A) {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

// The 16-bit word of codes k .. k+3 of row m (zero past the last row).
__device__ __forceinline__ uint32_t activation_word(const uint8_t* packed, int m, int M, int K, int k) {
    if (m >= M) return 0u;
    return *reinterpret_cast<const uint16_t*>(packed + (size_t)m * (K / 2) + k / 2);
}

// The 32-bit word of codes k .. k+7 of row m (zero past the last row).
__device__ __forceinline__ uint32_t activation_word8(const uint8_t* packed, int m, int M, int K, int k) {
    if (m >= M) return 0u;
    return *reinterpret_cast<const uint32_t*>(packed + (size_t)m * (K / 2) + k / 2);
}

template <typename T, int RANK, bool UNSIGNED_A, bool S4>
__global__ void __launch_bounds__(128) w4a4_gemm(
    const uint8_t* __restrict__ act_packed,   // [M, K/2]
    const float* __restrict__ act_scales,     // [M, K/64]
    const uint32_t* __restrict__ w_frag,      // [Npad/8, K/32, 32] (int8 variant) or [Npad/8, K/64, 32, 2] (S4)
    const float* __restrict__ w_scales,       // [K/64, Npad]
    const float* __restrict__ down,           // [M, RANK]
    const T* __restrict__ lora_up,            // [N, RANK]
    const T* __restrict__ bias,               // [N] or null
    T* __restrict__ out,                      // [M, N]
    int M, int N, int Npad, int K)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gid = lane / 4, tid = lane % 4;
    const int row0 = blockIdx.y * kBlockM + (warp % 2) * 16;
    const int col0 = blockIdx.x * kBlockN + (warp / 2) * 32;
    const int steps = K / 32;
    float acc[kTilesN][4] = {};

    for (int g = 0; g < K / kGroup; ++g) {
        int dot[kTilesN][4] = {};
        if constexpr (S4) {
            const int k0 = g * kGroup;
            uint32_t a[4];
            a[0] = activation_word8(act_packed, row0 + gid, M, K, k0 + tid * 8);
            a[1] = activation_word8(act_packed, row0 + gid + 8, M, K, k0 + tid * 8);
            a[2] = activation_word8(act_packed, row0 + gid, M, K, k0 + 32 + tid * 8);
            a[3] = activation_word8(act_packed, row0 + gid + 8, M, K, k0 + 32 + tid * 8);
#pragma unroll
            for (int t = 0; t < kTilesN; ++t) {
                const size_t index = ((size_t)(col0 / 8 + t) * (K / kGroup) + g) * 32 + lane;
                const uint2 words = reinterpret_cast<const uint2*>(w_frag)[index];
                mma_16864<UNSIGNED_A>(dot[t], a, words.x, words.y);
            }
        } else {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int k0 = g * kGroup + half * 32;
                uint32_t a[4];
                a[0] = widen4<!UNSIGNED_A>(activation_word(act_packed, row0 + gid, M, K, k0 + tid * 4));
                a[1] = widen4<!UNSIGNED_A>(activation_word(act_packed, row0 + gid + 8, M, K, k0 + tid * 4));
                a[2] = widen4<!UNSIGNED_A>(activation_word(act_packed, row0 + gid, M, K, k0 + 16 + tid * 4));
                a[3] = widen4<!UNSIGNED_A>(activation_word(act_packed, row0 + gid + 8, M, K, k0 + 16 + tid * 4));
#pragma unroll
                for (int t = 0; t < kTilesN; ++t) {
                    const uint32_t word = w_frag[((size_t)(col0 / 8 + t) * steps + k0 / 32) * 32 + lane];
                    mma_16832<UNSIGNED_A>(dot[t], a, widen4<true>(word & 0xFFFFu), widen4<true>(word >> 16));
                }
            }
        }
        const float as0 = row0 + gid < M ? act_scales[(size_t)(row0 + gid) * (K / kGroup) + g] : 0.f;
        const float as1 = row0 + gid + 8 < M ? act_scales[(size_t)(row0 + gid + 8) * (K / kGroup) + g] : 0.f;
#pragma unroll
        for (int t = 0; t < kTilesN; ++t) {
            const int col = col0 + t * 8 + tid * 2;
            const float ws0 = w_scales[(size_t)g * Npad + col], ws1 = w_scales[(size_t)g * Npad + col + 1];
            acc[t][0] = fmaf((float)dot[t][0], as0 * ws0, acc[t][0]);
            acc[t][1] = fmaf((float)dot[t][1], as0 * ws1, acc[t][1]);
            acc[t][2] = fmaf((float)dot[t][2], as1 * ws0, acc[t][2]);
            acc[t][3] = fmaf((float)dot[t][3], as1 * ws1, acc[t][3]);
        }
    }

    // Epilogue: low-rank up-projection, bias, one write per output element.
#pragma unroll
    for (int t = 0; t < kTilesN; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + gid + (i >= 2 ? 8 : 0);
            const int col = col0 + t * 8 + tid * 2 + (i & 1);
            if (row >= M || col >= N) continue;
            float y = acc[t][i];
#pragma unroll
            for (int r = 0; r < RANK; ++r) y = fmaf(down[(size_t)row * RANK + r], load_float(lora_up + (size_t)col * RANK + r), y);
            if (bias != nullptr) y += load_float(bias + col);
            store(out + (size_t)row * N + col, y);
        }
    }
}

}  // namespace svdq

#ifdef SVDQ_INSTANTIATE
template __global__ void svdq::w4a4_gemm<__nv_bfloat16, 32, false, false>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int);
template __global__ void svdq::w4a4_gemm<__half, 64, true, false>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __half*, const __half*, __half*,
    int, int, int, int);
template __global__ void svdq::w4a4_gemm<__nv_bfloat16, 32, false, true>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int);
template __global__ void svdq::w4a4_gemm<__half, 64, true, true>(
    const uint8_t*, const float*, const uint32_t*, const float*, const float*, const __half*, const __half*, __half*,
    int, int, int, int);
#endif
