// VQ GEMM (VQ4DiT layers, svdq_cli/runtime/vq_linear.py):
//   y[m, n] = Σ_k x[m, k] · W[n, k] + bias[n],   W[n, j·D + i] = codebook[index(n, j)][i]
// where index(n, j) is bits j·IB .. j·IB+IB−1 of row n's little-endian bit stream of packed indices
// (IB = index bits, 8 for 2-bit d=4 and 12 for 3-bit d=4; ceil(K/D · IB / 8) bytes per row).
//
// A block computes a 64 (M) × 64 (N) tile with 4 warps, each warp 16 rows × 64 columns (8 n8 MMA tiles).
// The codebook (CODEWORDS × D 16-bit values, 2 KB at 256 × 4, 32 KB at 4096 × 4) is staged in shared memory
// once per block. Per step of 32 along K, the block stages x's 64 × 32 tile, decodes the 64 × 32 weight tile
// from the indices (64 rows × 32/D indices, each thread a few) into 16-bit shared memory, and each warp runs
// two k16 steps of mma.sync.m16n8k16 (f32 accumulation) per n8 tile, with A (x, row-major) by ldmatrix.x4 and
// B (the decoded weights, [n][k] = "col") by ldmatrix.x2. Rows are padded to 40 elements (80 bytes: 16-byte
// aligned, conflict-free ldmatrix). The epilogue adds the bias (zeros for a layer without one) and writes y
// once in the model dtype.
// Rows past M and columns past N are zero-filled in shared memory and not written; K must be a multiple of 32
// (the launcher falls back to the reference otherwise).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

constexpr int kVqTile = 64;      // block tile, M and N
constexpr int kVqThreads = 128;  // 4 warps
constexpr int kVqStep = 32;      // K per stage
constexpr int kVqStride = 40;    // 16-bit elements per staged row (32 + 8 padding)

__device__ __forceinline__ float vq_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float vq_load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void vq_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void vq_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void vq_zero(__nv_bfloat16* p) { *p = __float2bfloat16_rn(0.f); }
__device__ __forceinline__ void vq_zero(__half* p) { *p = __float2half_rn(0.f); }

__device__ __forceinline__ uint32_t vq_shared(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <typename T>
__device__ __forceinline__ void vq_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void vq_mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                      uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void vq_mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Index j of a row's packed bit stream (IB ≤ 16 bits: at most three bytes, never past the row's last byte).
template <int IB>
__device__ __forceinline__ uint32_t vq_index(const uint8_t* row, int j) {
    const int bit = j * IB;
    const int first = bit >> 3, last = (bit + IB - 1) >> 3;
    uint32_t word = 0;
    for (int b = first; b <= last; ++b) word |= static_cast<uint32_t>(row[b]) << (8 * (b - first));
    return (word >> (bit & 7)) & ((1u << IB) - 1u);
}

template <typename T, int D, int IB>
__global__ void __launch_bounds__(kVqThreads) vq_gemm(const T* __restrict__ x, const T* __restrict__ codebook,
                                                      const uint8_t* __restrict__ codes, const T* __restrict__ bias,
                                                      T* __restrict__ y, int M, int N, int K, int row_bytes) {
    constexpr int kCodewords = 1 << IB;
    __shared__ __align__(16) T book[kCodewords * D];
    __shared__ __align__(16) T tile_a[kVqTile * kVqStride];
    __shared__ __align__(16) T tile_b[kVqTile * kVqStride];

    const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    const int m0 = blockIdx.y * kVqTile, n0 = blockIdx.x * kVqTile;
    for (int i = t; i < kCodewords * D; i += kVqThreads) book[i] = codebook[i];

    float acc[8][4];
    for (int j = 0; j < 8; ++j)
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;

    for (int k0 = 0; k0 < K; k0 += kVqStep) {
        __syncthreads();  // the previous step's tiles are consumed (and the codebook is staged)
        // x: 64 rows × 32 columns, 16 elements per thread; zeros past M.
        for (int i = t; i < kVqTile * kVqStep; i += kVqThreads) {
            const int r = i / kVqStep, c = i % kVqStep;
            if (m0 + r < M) tile_a[r * kVqStride + c] = x[(size_t)(m0 + r) * K + k0 + c];
            else vq_zero(tile_a + r * kVqStride + c);
        }
        // W: 64 rows × (32 / D) indices, decoded from the shared codebook; zeros past N.
        for (int i = t; i < kVqTile * (kVqStep / D); i += kVqThreads) {
            const int r = i / (kVqStep / D), v = i % (kVqStep / D);
            const bool valid = n0 + r < N;
            const uint32_t index = valid ? vq_index<IB>(codes + (size_t)(n0 + r) * row_bytes, (k0 / D) + v) : 0u;
            for (int e = 0; e < D; ++e) {
                if (valid) tile_b[r * kVqStride + v * D + e] = book[index * D + e];
                else vq_zero(tile_b + r * kVqStride + v * D + e);
            }
        }
        __syncthreads();
        for (int kk = 0; kk < kVqStep; kk += 16) {
            uint32_t a[4];
            const T* a_row = tile_a + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kVqStride + kk + (lane >> 4) * 8;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                         : "r"(vq_shared(a_row)));
            for (int j = 0; j < 8; ++j) {
                uint32_t b0, b1;
                const T* b_row = tile_b + (j * 8 + (lane & 7)) * kVqStride + kk + ((lane >> 3) & 1) * 8;
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                             : "=r"(b0), "=r"(b1)
                             : "r"(vq_shared(b_row)));
                vq_mma<T>(acc[j], a, b0, b1);
            }
        }
    }
    // Accumulator map (m16n8 f32): c0, c1 = row gid, columns 2·tid, 2·tid+1; c2, c3 = row gid + 8.
    const int gid = lane >> 2, tid = lane & 3;
    for (int j = 0; j < 8; ++j) {
        for (int q = 0; q < 4; ++q) {
            const int m = m0 + warp * 16 + gid + (q >> 1) * 8;
            const int n = n0 + j * 8 + tid * 2 + (q & 1);
            if (m < M && n < N) {
                vq_store(y + (size_t)m * N + n, acc[j][q] + vq_load(bias + n));
            }
        }
    }
}

}  // namespace svdq

#ifdef SVDQ_INSTANTIATE  // for nvcc's ahead-of-time check; NVRTC instantiates from the name expression
template __global__ void svdq::vq_gemm<__nv_bfloat16, 4, 8>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                          const uint8_t*, const __nv_bfloat16*, __nv_bfloat16*,
                                                          int, int, int, int);
template __global__ void svdq::vq_gemm<__half, 4, 12>(const __half*, const __half*, const uint8_t*, const __half*,
                                                    __half*, int, int, int, int);
#endif
