// Fused activation quantization + low-rank down-projection: x is read once (DESIGN.md §1 step 4).
//
// One block per token row m; each warp takes groups of 64 channels, two adjacent channels per lane:
//   x̂[k]   = (x[m,k] + shift) / λ[k]                     (__fadd_rn, __fdiv_rn: IEEE, like torch)
//   scale  = max|x̂| over the group / 7   (signed)  or  max(x̂) / 15 (unsigned, after the shift)
//   code   = clamp(__float2int_rn(x̂ / scale), -8, 7)  or  clamp(…, 0, 15);  scale 0 → code 0
//   packed[m, k/2] = code[k] & 0xF | (code[k+1] & 0xF) << 4        (canonical: low nibble = even k)
//   down[m, r] = Σ_k x̂[k] · lora_down[r, k]                         (fp32 accumulation)
// These are the reference forward's operations in the same order, so the codes agree exactly.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

constexpr int kGroup = 64;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int RANK, bool UNSIGNED>
__global__ void __launch_bounds__(kThreads) quantize_lora_down(
    const T* __restrict__ x,           // [M, K]
    const T* __restrict__ smooth,      // [K]
    const T* __restrict__ lora_down,   // [RANK, K]
    uint8_t* __restrict__ packed,      // [M, K/2]
    float* __restrict__ scales,        // [M, K/64]
    float* __restrict__ down,          // [M, RANK]
    int K, float shift)
{
    const int m = blockIdx.x;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int groups = K / kGroup;
    float partial[RANK > 0 ? RANK : 1];
#pragma unroll
    for (int r = 0; r < RANK; ++r) partial[r] = 0.f;

    for (int g = warp; g < groups; g += kWarps) {
        const int k = g * kGroup + 2 * lane;
        const float x0 = __fdiv_rn(__fadd_rn(to_float(x[(size_t)m * K + k]), shift), to_float(smooth[k]));
        const float x1 = __fdiv_rn(__fadd_rn(to_float(x[(size_t)m * K + k + 1]), shift), to_float(smooth[k + 1]));
        float peak = UNSIGNED ? fmaxf(fmaxf(x0, x1), 0.f) : fmaxf(fabsf(x0), fabsf(x1));
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, offset));
        const float scale = __fdiv_rn(peak, UNSIGNED ? 15.f : 7.f);
        int q0 = 0, q1 = 0;
        if (scale > 0.f) {
            q0 = __float2int_rn(__fdiv_rn(x0, scale));
            q1 = __float2int_rn(__fdiv_rn(x1, scale));
            q0 = UNSIGNED ? min(max(q0, 0), 15) : min(max(q0, -8), 7);
            q1 = UNSIGNED ? min(max(q1, 0), 15) : min(max(q1, -8), 7);
        }
        packed[(size_t)m * (K / 2) + k / 2] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
        if (lane == 0) scales[(size_t)m * groups + g] = scale;
#pragma unroll
        for (int r = 0; r < RANK; ++r)
            partial[r] = fmaf(x0, to_float(lora_down[(size_t)r * K + k]),
                              fmaf(x1, to_float(lora_down[(size_t)r * K + k + 1]), partial[r]));
    }

    if (RANK > 0) {
        __shared__ float sums[kWarps][RANK > 0 ? RANK : 1];
#pragma unroll
        for (int r = 0; r < RANK; ++r) {
            float v = partial[r];
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (lane == 0) sums[warp][r] = v;
        }
        __syncthreads();
        for (int r = threadIdx.x; r < RANK; r += kThreads) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) total += sums[w][r];
            down[(size_t)m * RANK + r] = total;
        }
    }
}

}  // namespace svdq

#ifdef SVDQ_INSTANTIATE
// nvcc compile checks instantiate the hot variants; at run time NVRTC instantiates by name.
template __global__ void svdq::quantize_lora_down<__nv_bfloat16, 32, false>(
    const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, uint8_t*, float*, float*, int, float);
template __global__ void svdq::quantize_lora_down<__half, 64, true>(
    const __half*, const __half*, const __half*, uint8_t*, float*, float*, int, float);
#endif
