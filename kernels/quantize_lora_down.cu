// Fused activation quantization + low-rank down-projection: x is read once (DESIGN.md §1 step 4).
//
//   x̂[k]   = (x[m,k] + shift) / λ[k]                     (__fdiv_rn, __fadd_rn: IEEE, like torch)
//   scale  = max(max x̂ / 7, −min x̂ / negative_divisor) over the group (signed: negative_divisor 8 uses the
//            whole code range, 7 is the symmetric max|x̂|/7)   or  max(x̂) / 15 (unsigned, after the shift)
//   code   = clamp(__float2int_rn(x̂ / scale), -8, 7)  or  clamp(…, 0, 15);  scale 0 → code 0
//   packed[m, k/2] = code[k] & 0xF | (code[k+1] & 0xF) << 4        (canonical: low nibble = even k)
//   down[m, r] = Σ_k x̂[k] · lora_down[r, k]                         (fp32, k in order)
// These are the reference forward's operations in the same order, so the codes agree exactly.
//
// v2 (see benchmarks/kernels-notes.md): a block takes 64 token rows and walks K one group of 64 at a time. Per
// group, λ and the group's columns of lora_down are staged in shared memory once for the 64 rows (v1 re-read
// both for every row); each warp quantizes 8 rows (a lane takes two adjacent channels: coalesced loads), keeping
// x̂ in shared memory; then each thread adds the group to RANK / 4 of the block's down-projection sums.
// Outputs are laid out for w4a4_gemm.cu: rows padded to Mpad (a multiple of 128) with zero codes, scales and
// branch rows, and the scales group-major, [K/64, Mpad], so a GEMM block reads 128 of them contiguously.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

constexpr int kGroup = 64;
constexpr int kRows = 64;               // token rows per block
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSmoothedStride = kGroup + 1;  // floats per staged row of x̂ (bank-conflict padding)

template <typename T, int RANK, bool UNSIGNED>
__global__ void __launch_bounds__(kThreads) quantize_lora_down(
    const T* __restrict__ x,           // [M, K]
    const T* __restrict__ smooth,      // [K]
    const T* __restrict__ lora_down,   // [RANK, K]
    uint8_t* __restrict__ packed,      // [Mpad, K/2]
    float* __restrict__ scales,        // [K/64, Mpad]
    float* __restrict__ down,          // [Mpad, RANK]
    int M, int Mpad, int K, float shift, float negative_divisor)
{
    constexpr int kRanks = RANK > 0 ? RANK : 1;
    constexpr int kPerThread = (RANK + 3) / 4 > 0 ? (RANK + 3) / 4 : 1;  // ranks warp/2, warp/2 + 4, …
    __shared__ float smoothed[kRows][kSmoothedStride];
    __shared__ float smooth_s[kGroup];
    __shared__ T down_s[kRanks][kGroup];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int m0 = blockIdx.x * kRows;
    const int branch_row = (warp % 2) * 32 + lane, branch_rank = warp / 2;
    float partial[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) partial[j] = 0.f;

    for (int g = 0; g < K / kGroup; ++g) {
        const int k0 = g * kGroup;
        if (threadIdx.x < kGroup) smooth_s[threadIdx.x] = to_float(smooth[k0 + threadIdx.x]);
        if (RANK > 0)
            for (int i = threadIdx.x; i < RANK * kGroup; i += kThreads)
                down_s[i / kGroup][i % kGroup] = lora_down[(size_t)(i / kGroup) * K + k0 + i % kGroup];
        __syncthreads();

        for (int i = 0; i < kRows / kWarps; ++i) {
            const int row = warp + i * kWarps, m = m0 + row, k = 2 * lane;
            float x0 = 0.f, x1 = 0.f;  // rows past M quantize to zero codes and a zero scale
            if (m < M) {
                x0 = __fdiv_rn(__fadd_rn(to_float(x[(size_t)m * K + k0 + k]), shift), smooth_s[k]);
                x1 = __fdiv_rn(__fadd_rn(to_float(x[(size_t)m * K + k0 + k + 1]), shift), smooth_s[k + 1]);
            }
            float high = fmaxf(fmaxf(x0, x1), 0.f), low = fmaxf(-fminf(x0, x1), 0.f);  // the group's extremes
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                high = fmaxf(high, __shfl_xor_sync(0xffffffffu, high, offset));
                low = fmaxf(low, __shfl_xor_sync(0xffffffffu, low, offset));
            }
            const float scale = UNSIGNED ? __fdiv_rn(high, 15.f)
                                         : fmaxf(__fdiv_rn(high, 7.f), __fdiv_rn(low, negative_divisor));
            int q0 = 0, q1 = 0;
            if (scale > 0.f) {
                q0 = __float2int_rn(__fdiv_rn(x0, scale));
                q1 = __float2int_rn(__fdiv_rn(x1, scale));
                q0 = UNSIGNED ? min(max(q0, 0), 15) : min(max(q0, -8), 7);
                q1 = UNSIGNED ? min(max(q1, 0), 15) : min(max(q1, -8), 7);
            }
            packed[(size_t)m * (K / 2) + (k0 + k) / 2] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
            if (lane == 0) scales[(size_t)g * Mpad + m] = scale;
            smoothed[row][k] = x0;
            smoothed[row][k + 1] = x1;
        }

        if (RANK > 0) {
            __syncthreads();  // x̂ of every row is staged
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int r = branch_rank + 4 * j;
                float sum = partial[j];
                for (int c = 0; c < kGroup; ++c) sum = fmaf(smoothed[branch_row][c], to_float(down_s[r][c]), sum);
                partial[j] = sum;
            }
        }
        __syncthreads();  // before the next group overwrites the staged values
    }

    if (RANK > 0)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
            down[(size_t)(m0 + branch_row) * RANK + branch_rank + 4 * j] = partial[j];
}

}  // namespace svdq

#ifdef SVDQ_INSTANTIATE
// nvcc compile checks instantiate the hot variants; at run time NVRTC instantiates by name.
template __global__ void svdq::quantize_lora_down<__nv_bfloat16, 32, false>(
    const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, uint8_t*, float*, float*, int, int, int, float,
    float);
template __global__ void svdq::quantize_lora_down<__half, 128, true>(
    const __half*, const __half*, const __half*, uint8_t*, float*, float*, int, int, int, float, float);
#endif
