// The kernel side of svdq's CUDA-on-CPU emulator: what a translated kernels/*.cu sees instead of a GPU.
//
// The emulator compiles the real CUDA source as host C++ (after translate.py has rewritten its inline-PTX
// `asm` statements into svdq_emu::ptx(...) calls and its __shared__ declarations into per-block arena
// references) and runs every CUDA thread as a fiber. Everything here is a thin declaration or inline
// forwarder; the scheduler, the warp collectives, the PTX interpreter and the memory checks live in
// runtime.cpp, compiled without instrumentation, so a checked build sees only the kernel's own accesses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

// Host builds of the CUDA headers leave __global__/__device__ empty; these need our meaning.
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __constant__
#define __constant__
// A __shared__ declaration the translator did not rewrite must not compile into a private variable.
#undef __shared__
#define __shared__ SVDQ_EMU_UNTRANSLATED_SHARED_DECLARATION

#define SVDQ_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace svdq_emu {

// ---------------------------------------------------------------- runtime entry points (runtime.cpp)
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
[[noreturn]] void fail(const char* message);

void sync_threads();
void sync_warp(unsigned mask);
// Warp collectives tell their call sites apart by return address, so the wrappers below are always inlined.
uint32_t shuffle(unsigned mask, uint32_t value, int mode, int argument, int width);
uint32_t vote(unsigned mask, int predicate, int mode);
int atomic_add(int* address, int value);
unsigned atomic_add(unsigned* address, unsigned value);
float atomic_add(float* address, float value);

enum ShuffleMode { kShuffleIndex, kShuffleUp, kShuffleDown, kShuffleXor };
enum VoteMode { kVoteAll, kVoteAny, kVoteBallot };

template <class T>
__attribute__((always_inline)) inline T shuffle_value(unsigned mask, T value, int mode, int argument, int width) {
    static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits = shuffle(mask, bits, mode, argument, width);
    memcpy(&value, &bits, 4);
    return value;
}

// Per-block arena: static __shared__ variables by call-site tag, and the dynamic extern __shared__ region.
void* shared_static(const void* tag, size_t bytes, size_t align);
void* shared_dynamic(size_t align);
uint32_t shared_address(const void* generic);

// One inline-PTX statement: the instruction text and its operands (pointer, byte size, readable).
struct Operand {
    void* address;
    unsigned size;
    bool readable;
    bool writable;
};
void ptx(const char* text, const Operand* operands, int output_count, int count);

// Launch: a type-erased thunk runs the kernel in every fiber.
struct Buffer {
    const void* address;
    uint64_t bytes;
};
struct LaunchConfig {
    unsigned grid[3], block[3];
    unsigned dynamic_shared;
    unsigned static_shared_limit, shared_limit;  // bytes per block the emulated device allows
    int threads;                                 // OS threads running blocks (0: all cores)
    int reverse;                                 // resume lanes in reverse order (shakes out order bugs)
    int checked;                                 // memory checks and counters (needs an instrumented build)
    int count_only;                              // skip mma arithmetic (results are zeros): counting at scale
    const Buffer* buffers;                       // the pointer arguments, for checks and counters
    int buffer_count;
};
struct LaunchStats {
    uint64_t load_bytes[16], store_bytes[16];    // per buffer, as requested by the kernel's instructions
    uint64_t unique_load_bytes[16], unique_store_bytes[16];  // distinct 32-byte sectors touched, in bytes
    uint64_t mma[8];                             // by kind, see runtime.cpp's MmaKind
    uint64_t shared_bytes;                       // per block, static + dynamic
    uint64_t barriers, collectives;
};
int run_grid(const LaunchConfig* config, void (*thunk)(void*), void* context, LaunchStats* stats, char* error,
             int error_size);

// ---------------------------------------------------------------- launch glue generated per kernel
template <class T>
constexpr const char* kind_of() {
    if constexpr (std::is_pointer_v<T>) return "ptr";
    else if constexpr (std::is_same_v<T, float>) return "f32";
    else if constexpr (std::is_same_v<T, double>) return "f64";
    else if constexpr (std::is_same_v<T, bool>) return "b8";
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 4) return std::is_signed_v<T> ? "i32" : "u32";
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 8) return std::is_signed_v<T> ? "i64" : "u64";
    else return "unsupported";
}

template <class... A>
const char* signature_of(void (*)(A...)) {
    static const char* const kinds[] = {kind_of<std::decay_t<A>>()..., nullptr};
    static char text[512] = {0};
    if (!text[0]) {
        size_t used = 0;
        for (int i = 0; kinds[i]; ++i) {
            int wrote = snprintf(text + used, sizeof text - used, "%s%s", i ? "," : "", kinds[i]);
            used += wrote > 0 ? (size_t)wrote : 0;
        }
        if (!used) text[0] = '-';  // no parameters
    }
    return text;
}

// Reading the parameter array is the launcher's business, not the kernel's: kept out of the checks.
template <class... A, size_t... I>
__attribute__((no_sanitize_thread, noinline)) void invoke(void (*kernel)(A...), void** params,
                                                          std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

template <class... A>
struct Thunk {
    void (*kernel)(A...);
    void** params;
    __attribute__((no_sanitize_thread)) static void run(void* self) {
        auto* thunk = static_cast<Thunk*>(self);
        invoke(thunk->kernel, thunk->params, std::index_sequence_for<A...>{});
    }
};

template <class... A>
int launch(void (*kernel)(A...), const LaunchConfig* config, void** params, LaunchStats* stats, char* error,
           int error_size) {
    Thunk<A...> thunk{kernel, params};
    return run_grid(config, &Thunk<A...>::run, &thunk, stats, error, error_size);
}

// ---------------------------------------------------------------- inline PTX operands
template <class T>
inline Operand out(T& value) { return {(void*)&value, sizeof(T), false, true}; }
template <class T>
inline Operand inout(T& value) { return {(void*)&value, sizeof(T), true, true}; }
template <class T>
inline Operand in(const T& value) { return {(void*)&value, sizeof(T), true, false}; }

inline void ptx(const char* text, std::initializer_list<Operand> outputs, std::initializer_list<Operand> inputs) {
    Operand all[32];
    int count = 0;
    if (outputs.size() + inputs.size() > 32) fail("an asm statement with more than 32 operands");
    for (const Operand& o : outputs) all[count++] = o;
    for (const Operand& i : inputs) all[count++] = i;
    ptx(text, all, (int)outputs.size(), count);
}

template <class T>
inline T& shared_variable(const void* tag) {
    return *static_cast<T*>(shared_static(tag, sizeof(T), alignof(T)));
}

}  // namespace svdq_emu

// ---------------------------------------------------------------- CUDA built-ins
#define threadIdx (::svdq_emu::thread_idx())
#define blockIdx (::svdq_emu::block_idx())
#define blockDim (::svdq_emu::block_dim())
#define gridDim (::svdq_emu::grid_dim())
#define warpSize 32

template <class T>
__attribute__((always_inline)) inline T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
    return ::svdq_emu::shuffle_value(mask, value, ::svdq_emu::kShuffleIndex, source, width);
}
template <class T>
__attribute__((always_inline)) inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    return ::svdq_emu::shuffle_value(mask, value, ::svdq_emu::kShuffleUp, (int)delta, width);
}
template <class T>
__attribute__((always_inline)) inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    return ::svdq_emu::shuffle_value(mask, value, ::svdq_emu::kShuffleDown, (int)delta, width);
}
template <class T>
__attribute__((always_inline)) inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    return ::svdq_emu::shuffle_value(mask, value, ::svdq_emu::kShuffleXor, lane_mask, width);
}
__attribute__((always_inline)) inline int __all_sync(unsigned mask, int predicate) {
    return (int)::svdq_emu::vote(mask, predicate, ::svdq_emu::kVoteAll);
}
__attribute__((always_inline)) inline int __any_sync(unsigned mask, int predicate) {
    return (int)::svdq_emu::vote(mask, predicate, ::svdq_emu::kVoteAny);
}
__attribute__((always_inline)) inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return ::svdq_emu::vote(mask, predicate, ::svdq_emu::kVoteBallot);
}

inline void __syncthreads() { ::svdq_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::svdq_emu::sync_warp(mask); }
inline size_t __cvta_generic_to_shared(const void* pointer) { return ::svdq_emu::shared_address(pointer); }
template <class T>
inline T __ldg(const T* pointer) { return *pointer; }

// IEEE single-precision operations with explicit rounding: the host's defaults (round to nearest even).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline int __float2int_rn(float x) {  // cvt.rni.s32.f32: nearest even, saturating, NaN → 0
    if (std::isnan(x)) return 0;
    const float r = std::nearbyint(x);
    if (r >= 2147483648.f) return INT32_MAX;
    if (r < -2147483648.f) return INT32_MIN;
    return (int)r;
}
inline int __float2int_rz(float x) {
    if (std::isnan(x)) return 0;
    const float r = std::trunc(x);
    if (r >= 2147483648.f) return INT32_MAX;
    if (r < -2147483648.f) return INT32_MIN;
    return (int)r;
}
inline unsigned __vsub4(unsigned a, unsigned b) {  // per-byte subtraction without borrows between bytes
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= ((((a >> (8 * i)) & 0xFFu) - ((b >> (8 * i)) & 0xFFu)) & 0xFFu) << (8 * i);
    return r;
}
inline unsigned __vadd4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= ((((a >> (8 * i)) & 0xFFu) + ((b >> (8 * i)) & 0xFFu)) & 0xFFu) << (8 * i);
    return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
// fmaf, fmaxf, fminf, fabsf: the C library's (correctly rounded fma; fmaxf/fminf return the non-NaN operand
// like CUDA's).

// Blocks of one grid run on several OS threads, so atomics are real (and counted) in the runtime.
inline int atomicAdd(int* address, int value) { return ::svdq_emu::atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return ::svdq_emu::atomic_add(address, value); }
inline float atomicAdd(float* address, float value) { return ::svdq_emu::atomic_add(address, value); }
