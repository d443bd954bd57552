// svdq's CUDA-on-CPU emulator: the runtime behind svdq_emu.h.
//
// A grid's blocks are spread over OS threads; inside a block every CUDA thread is a fiber (its own stack,
// switched cooperatively on one OS thread), so __syncthreads, warp collectives and __shared__ memory behave
// as on the GPU for a correct kernel, and misbehave loudly for a wrong one:
//   * a warp collective (shuffle, vote, mma.sync, ldmatrix) waits for all 32 lanes, checks that they reached
//     the same instruction, then evaluates it on the gathered registers with the PTX ISA fragment layouts;
//   * a thread that can never proceed (a lane exited or diverged away from a collective, a barrier that not
//     every thread reaches) is a deadlock error naming who waits where, never a hang;
//   * an instruction the interpreter does not implement is an error, never a guess;
//   * shared memory is a per-block arena poisoned with 0xFF bytes, so reading what nobody wrote shows.
// A checked build compiles the kernel with -fsanitize=thread instrumentation, whose hooks (defined below) see
// each of the kernel's own loads and stores: they count global bytes per argument buffer (requested, and
// distinct 32-byte sectors), and fail on an access outside every argument buffer, outside the allocated
// shared arena, on two threads writing the same global byte, and on shared-memory races (two threads
// touching the same byte, one writing, with no __syncthreads/__syncwarp ordering them).
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__) || defined(SVDQ_EMU_UCONTEXT)
#define SVDQ_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#include "svdq_emu.h"

namespace svdq_emu {
namespace {

constexpr int kWarp = 32;
// Each fiber stack lives in a region aligned to its size: a header page (the lane's address, so the memory
// hooks find their lane from the stack pointer without thread-local lookups), a guard page, then the stack.
constexpr size_t kStackRegion = 64 * 1024;
constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = kStackRegion - 2 * kPage;
constexpr uint64_t kHeaderMagic = 0x5356445145535441ull;
constexpr size_t kArenaBytes = 232 * 1024;  // the largest shared memory of any supported GPU (sm_90: 227 KB)
constexpr int kMaxBuffers = 16;
constexpr uint8_t kPoison = 0xFF;           // NaN as float, -1 as integer

struct KernelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::string format(const char* pattern, ...) {
    char text[1024];
    va_list args;
    va_start(args, pattern);
    vsnprintf(text, sizeof text, pattern, args);
    va_end(args);
    return text;
}

struct Lane;
struct Worker;
extern thread_local Worker* worker;
extern thread_local Lane* current;
[[noreturn]] void abandon_fiber(const std::string& message);

// Inside a fiber an error stops the fiber for good (the scheduler then fails the launch): exceptions cannot
// unwind through the instrumented kernel's calls to the memory hooks, which the compiler takes as nothrow.
[[noreturn]] void raise(const std::string& message) {
    if (current) abandon_fiber(message);
    throw KernelError(message);
}

// ---------------------------------------------------------------- fibers
#ifndef SVDQ_EMU_USE_UCONTEXT
// x86-64 System V: push the callee-saved registers, MXCSR and the x87 control word, swap stack pointers.
extern "C" void svdq_emu_switch(void** save, void* load);
asm(R"(
.text
.globl svdq_emu_switch
.hidden svdq_emu_switch
.type svdq_emu_switch,@function
svdq_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size svdq_emu_switch, .-svdq_emu_switch
)");
#endif

struct AsyncCopy {  // a cp.async waiting for cp.async.wait_group
    uint32_t destination;
    const char* source;
    unsigned bytes, source_bytes;
};

struct Lane {
#ifdef SVDQ_EMU_USE_UCONTEXT
    ucontext_t context;
#else
    void* stack_pointer = nullptr;
#endif
    char* stack = nullptr;  // usable stack, above the header and guard pages of its region
    struct Worker* owner = nullptr;
    uint3 index{};
    int linear = 0, lane = 0, warp = 0;
    uint64_t collectives = 0;  // collectives this lane has entered
    bool done = false;
    const char* waiting = "";
    std::vector<AsyncCopy> copies;  // issued cp.async, oldest first
    std::vector<size_t> groups;     // cp.async.commit_group boundaries into ``copies``
};

// A warp collective in flight. Consecutive collectives use alternate slots: a lane can be at most one
// collective ahead of the slowest lane of its warp.
struct Slot {
    uint32_t input[kWarp][12];
    uint32_t output[kWarp][4];
    const void* site[kWarp];
    const char* what[kWarp];
    uint64_t computed = ~0ull;
};

struct Warp {
    uint64_t arrived = 0;  // lane arrivals at collectives, ever
    uint32_t sync_epoch = 0;
    Slot slot[2];
};

// Race shadow of one shared-memory byte: the last writer and reader with the barrier epochs they saw.
struct Shadow {
    uint32_t block_serial;
    uint16_t writer, reader;  // thread index + 1; kManyReaders
    uint32_t write_epoch, write_warp_epoch, read_epoch, read_warp_epoch;
};
constexpr uint16_t kManyReaders = 0xFFFF;

struct BufferState {
    uintptr_t begin = 0;
    uint64_t bytes = 0;
    std::vector<uint8_t> read_sectors, written_sectors;
    std::vector<uint32_t> writers;  // global thread id + 1 of the last writer of each byte (checked only)
};

struct Launch {
    const LaunchConfig* config = nullptr;
    void (*thunk)(void*) = nullptr;
    void* context = nullptr;
    BufferState buffers[kMaxBuffers];
    int buffer_count = 0;
    uint64_t threads_per_block = 0;
    std::atomic<uint64_t> next_block{0};
    uint64_t blocks = 0;
    std::mutex mutex;
    std::string first_error;
    LaunchStats totals{};
};

struct Worker {
#ifdef SVDQ_EMU_USE_UCONTEXT
    ucontext_t scheduler;
#else
    void* scheduler_pointer = nullptr;
#endif
    Launch* launch = nullptr;
    uint3 block_index{};
    uint64_t block_linear = 0;
    uint32_t block_serial = 0;
    dim3 block_dim;
    std::vector<Lane> lanes;
    std::vector<Warp> warps;
    int live = 0, exited = 0;
    uint64_t progress = 0;
    // __syncthreads
    int barrier_arrived = 0;
    uint32_t barrier_epoch = 0;
    // shared memory
    char* arena = nullptr;
    size_t arena_used = 0, static_bytes = 0, dynamic_offset = 0;
    bool dynamic_placed = false;
    std::vector<std::pair<const void*, size_t>> statics;
    std::vector<Shadow> shadow;
    LaunchStats stats{};
    std::string error;
};

thread_local Worker* worker = nullptr;
thread_local Lane* current = nullptr;

void to_scheduler() {
#ifdef SVDQ_EMU_USE_UCONTEXT
    swapcontext(&current->context, &worker->scheduler);
#else
    svdq_emu_switch(&current->stack_pointer, worker->scheduler_pointer);
#endif
}

void wait_here(const char* what) {
    current->waiting = what;
    to_scheduler();
    current->waiting = "";
}

std::string where() {
    if (!worker || !current) return "";
    return format("block (%u,%u,%u) thread (%u,%u,%u): ", worker->block_index.x, worker->block_index.y,
                  worker->block_index.z, current->index.x, current->index.y, current->index.z);
}

std::string where();

void abandon_fiber(const std::string& message) {
    if (worker->error.empty()) worker->error = where() + message;
    for (;;) to_scheduler();
}

void fiber_main() {
    Lane* me = current;
    try {
        worker->launch->thunk(worker->launch->context);
    } catch (const std::exception& e) {
        if (worker->error.empty()) worker->error = where() + e.what();
    }
    me->done = true;
    me->copies.clear();  // copies never waited for: their data is never read
    worker->live--;
    worker->exited++;
    worker->progress++;
    // CUDA leaves a barrier that not every thread of the block reaches undefined: make it an error.
    if (worker->barrier_arrived > 0 && worker->error.empty())
        worker->error = where() + format("exited while %d thread(s) of its block wait at __syncthreads (every "
                                         "thread must reach each barrier)", worker->barrier_arrived);
    for (;;) to_scheduler();  // never resumed
}

#ifndef SVDQ_EMU_USE_UCONTEXT
extern "C" void svdq_emu_entry() { fiber_main(); }
#endif

// Fiber stacks and shared-memory arenas outlive launches: a launch takes them from these pools and gives
// them back, so a small launch costs no system calls.
std::mutex pool_mutex;
std::vector<char*> stack_pool;
std::vector<std::vector<char>> arena_pool;

char* take_stack() {
    {
        std::lock_guard<std::mutex> guard(pool_mutex);
        if (!stack_pool.empty()) {
            char* stack = stack_pool.back();
            stack_pool.pop_back();
            return stack;
        }
    }
    // A guard page below each stack turns an overflow into a crash, not silent corruption. Regions are never
    // unmapped (the pool keeps them), so the unaligned slack of each mapping is simply left unused.
    void* block = mmap(nullptr, 2 * kStackRegion, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (block == MAP_FAILED) raise("cannot allocate a fiber stack");
    char* region = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(block) + kStackRegion - 1) & ~(kStackRegion - 1));
    mprotect(region + kPage, kPage, PROT_NONE);
    return region + 2 * kPage;
}

struct StackHeader {
    uint64_t magic;
    Lane* lane;
};

// The lane running on the current stack: read from the stack region's header.
inline Lane* lane_of_stack() {
    const uintptr_t sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
    const auto* header = reinterpret_cast<const StackHeader*>(sp & ~(uintptr_t)(kStackRegion - 1));
    return header->magic == kHeaderMagic ? header->lane : nullptr;
}

void give_back(std::vector<Lane>& lanes) {
    std::lock_guard<std::mutex> guard(pool_mutex);
    for (Lane& lane : lanes)
        if (lane.stack) stack_pool.push_back(lane.stack), lane.stack = nullptr;
}

std::vector<char> take_arena() {
    std::lock_guard<std::mutex> guard(pool_mutex);
    if (arena_pool.empty()) return std::vector<char>(kArenaBytes);
    std::vector<char> arena = std::move(arena_pool.back());
    arena_pool.pop_back();
    return arena;
}

void give_back(std::vector<char>&& arena) {
    std::lock_guard<std::mutex> guard(pool_mutex);
    arena_pool.push_back(std::move(arena));
}

void start_lane(Lane& lane) {
    if (!lane.stack) lane.stack = take_stack();
    *reinterpret_cast<StackHeader*>(lane.stack - 2 * kPage) = StackHeader{kHeaderMagic, &lane};
    lane.owner = worker;
#ifdef SVDQ_EMU_USE_UCONTEXT
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = lane.stack;
    lane.context.uc_stack.ss_size = kStackBytes;
    lane.context.uc_link = nullptr;
    makecontext(&lane.context, (void (*)())fiber_main, 0);
#else
    auto top = reinterpret_cast<uintptr_t>(lane.stack + kStackBytes) & ~uintptr_t(15);
    auto* frame = reinterpret_cast<uint64_t*>(top);
    frame[-1] = 0;                                              // svdq_emu_entry's (never used) return address
    frame[-2] = reinterpret_cast<uint64_t>(&svdq_emu_entry);  // where svdq_emu_switch returns to
    for (int i = 3; i <= 8; ++i) frame[-i] = 0;                 // rbp rbx r12 r13 r14 r15
    const uint32_t control[2] = {0x1F80u, 0x037Fu};             // default MXCSR and x87 control word
    memcpy(&frame[-9], control, 8);
    lane.stack_pointer = &frame[-9];
#endif
}

void resume(Lane& lane) {
    current = &lane;
#ifdef SVDQ_EMU_USE_UCONTEXT
    swapcontext(&worker->scheduler, &lane.context);
#else
    svdq_emu_switch(&worker->scheduler_pointer, lane.stack_pointer);
#endif
    current = nullptr;
}

std::string describe_deadlock() {
    std::string text = "deadlock: no thread can proceed;";
    int shown = 0;
    for (Lane& lane : worker->lanes) {
        if (lane.done || shown++ >= 4) continue;
        text += format(" thread %d (warp %d lane %d) waits at %s;", lane.linear, lane.warp, lane.lane, lane.waiting);
    }
    int exited = 0;
    for (Lane& lane : worker->lanes) exited += lane.done;
    if (exited) text += format(" %d thread(s) of the block already exited", exited);
    return text;
}

void run_block(uint64_t linear) {
    Worker& w = *worker;
    const LaunchConfig& config = *w.launch->config;
    const unsigned gx = config.grid[0], gy = config.grid[1];
    w.block_index = make_uint3(linear % gx, (linear / gx) % gy, linear / ((uint64_t)gx * gy));
    w.block_linear = linear;
    w.block_serial++;
    const int count = (int)w.launch->threads_per_block;
    if ((int)w.lanes.size() != count) {
        give_back(w.lanes);
        w.lanes.assign(count, Lane{});
    }
    w.warps.assign((count + kWarp - 1) / kWarp, Warp{});
    for (int i = 0; i < count; ++i) {
        Lane& lane = w.lanes[i];
        lane.index = make_uint3(i % w.block_dim.x, (i / w.block_dim.x) % w.block_dim.y,
                                i / (w.block_dim.x * w.block_dim.y));
        lane.linear = i, lane.lane = i % kWarp, lane.warp = i / kWarp;
        lane.collectives = 0;
        lane.done = false;
        lane.copies.clear();
        lane.groups.clear();
        start_lane(lane);
    }
    w.live = count;
    w.exited = 0;
    w.barrier_arrived = 0;
    w.arena_used = w.static_bytes = w.dynamic_offset = 0;
    w.dynamic_placed = false;
    w.statics.clear();
    while (w.live > 0) {
        const uint64_t before = w.progress;
        for (int j = 0; j < count; ++j) {
            Lane& lane = w.lanes[config.reverse ? count - 1 - j : j];
            if (!lane.done) resume(lane);
            if (!w.error.empty()) raise(w.error);
        }
        if (w.progress == before && w.live > 0) raise(format("block (%u,%u,%u): ", w.block_index.x, w.block_index.y,
                                                             w.block_index.z) + describe_deadlock());
    }
    w.stats.shared_bytes = std::max<uint64_t>(w.stats.shared_bytes, w.arena_used);
}

// ---------------------------------------------------------------- warp collectives
// Deposit ``words``, wait for the warp's 32 lanes, and let the first lane through evaluate the collective.
template <class Compute>
Slot& collective(const void* site, const char* what, const uint32_t* words, int count, Compute&& compute) {
    Lane& me = *current;
    Worker& w = *worker;
    if ((me.warp + 1) * kWarp > (int)w.lanes.size())
        raise(format("%s in a partial warp (block of %zu threads): the emulator needs whole warps", what,
                     w.lanes.size()));
    Warp& warp = w.warps[me.warp];
    const uint64_t sequence = me.collectives++;
    Slot& slot = warp.slot[sequence & 1];
    if (count) memcpy(slot.input[me.lane], words, count * sizeof(uint32_t));
    slot.site[me.lane] = site;
    slot.what[me.lane] = what;
    warp.arrived++;
    w.progress++;
    while (warp.arrived < (sequence + 1) * kWarp) wait_here(what);
    if (slot.computed != sequence) {
        for (int lane = 0; lane < kWarp; ++lane)
            if (slot.site[lane] != site)
                raise(format("divergence: lanes of warp %d reached different warp collectives (lane 0 at %s, "
                             "lane %d at %s)", me.warp, slot.what[0], lane, slot.what[lane]));
        compute(slot);
        slot.computed = sequence;
        w.stats.collectives++;
    }
    return slot;
}

void check_full_mask(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) raise(format("%s with mask 0x%08x: the emulator supports full-warp masks only", what, mask));
}

// ---------------------------------------------------------------- shared memory
char* shared_pointer(uint32_t address, unsigned bytes, const char* what) {
    Worker& w = *worker;
    if ((uint64_t)address + bytes > w.arena_used)
        raise(format("%s: shared address 0x%x (+%u bytes) is outside the %zu bytes of shared memory this block "
                     "declared", what, address, bytes, w.arena_used));
    return w.arena + address;
}

size_t allocate_shared(size_t bytes, size_t align) {
    Worker& w = *worker;
    const size_t offset = (w.arena_used + align - 1) / align * align;
    const LaunchConfig& config = *w.launch->config;
    if (offset + bytes > config.shared_limit)
        raise(format("shared memory of %zu bytes exceeds the %u bytes per block of the emulated device",
                     offset + bytes, config.shared_limit));
    memset(w.arena + w.arena_used, kPoison, offset + bytes - w.arena_used);
    w.arena_used = offset + bytes;
    return offset;
}

// ---------------------------------------------------------------- memory checks (checked builds)
bool race_checks() { return worker->launch->config->checked && !worker->launch->config->count_only; }

uintptr_t image_begin = 0, image_end = 0;  // this module's loaded segments: constants, string literals

void find_image() {
    if (image_end) return;
    Dl_info info;
    if (!dladdr((void*)&find_image, &info)) return;
    struct Range {
        uintptr_t base, begin, end;
    } range{(uintptr_t)info.dli_fbase, ~uintptr_t(0), 0};
    dl_iterate_phdr(
        [](dl_phdr_info* module, size_t, void* data) -> int {
            auto* r = static_cast<Range*>(data);
            if ((uintptr_t)module->dlpi_addr != r->base) return 0;
            for (int i = 0; i < module->dlpi_phnum; ++i) {
                const ElfW(Phdr)& segment = module->dlpi_phdr[i];
                if (segment.p_type != PT_LOAD) continue;
                r->begin = std::min<uintptr_t>(r->begin, module->dlpi_addr + segment.p_vaddr);
                r->end = std::max<uintptr_t>(r->end, module->dlpi_addr + segment.p_vaddr + segment.p_memsz);
            }
            return 1;
        },
        &range);
    image_begin = range.begin;
    image_end = range.end;
}

bool ordered(const Worker& w, uint16_t other, uint32_t epoch, uint32_t warp_epoch, int me) {
    if (other == me + 1) return true;
    if (epoch != w.barrier_epoch) return true;  // a __syncthreads came between
    const int other_warp = (other - 1) / kWarp;
    return other_warp == me / kWarp && warp_epoch != w.warps[other_warp].sync_epoch;  // a __syncwarp did
}

void shared_access(Worker& w, const Lane& lane, uintptr_t offset, size_t bytes, bool write) {
    if (offset + bytes > w.arena_used)
        raise(format("shared memory %s of %zu bytes at offset %zu, outside the %zu bytes declared",
                     write ? "write" : "read", bytes, (size_t)offset, w.arena_used));
    const int me = lane.linear;
    const uint32_t my_warp_epoch = w.warps[me / kWarp].sync_epoch;
    for (size_t i = 0; i < bytes; ++i) {
        Shadow& s = w.shadow[offset + i];
        if (s.block_serial != w.block_serial) s = Shadow{w.block_serial, 0, 0, 0, 0, 0, 0};
        if (s.writer && !ordered(w, s.writer, s.write_epoch, s.write_warp_epoch, me))
            raise(format("shared-memory race: thread %d %s byte %zu that thread %d wrote, with no barrier between",
                         me, write ? "writes" : "reads", (size_t)(offset + i), s.writer - 1));
        if (write) {
            if (s.reader == kManyReaders ? s.read_epoch == w.barrier_epoch
                                         : s.reader && !ordered(w, s.reader, s.read_epoch, s.read_warp_epoch, me))
                raise(format("shared-memory race: thread %d writes byte %zu that %s read, with no barrier between",
                             me, (size_t)(offset + i),
                             s.reader == kManyReaders ? "other threads" : format("thread %d", s.reader - 1).c_str()));
            s.writer = (uint16_t)(me + 1), s.write_epoch = w.barrier_epoch, s.write_warp_epoch = my_warp_epoch;
            s.reader = 0;
        } else {
            // One reader, or several unordered with each other (then only a __syncthreads orders them all).
            bool alone = s.reader == 0 || s.reader == me + 1;
            if (s.reader == kManyReaders) alone = s.read_epoch != w.barrier_epoch;
            else if (!alone) alone = ordered(w, s.reader, s.read_epoch, s.read_warp_epoch, me);
            s.reader = alone ? (uint16_t)(me + 1) : kManyReaders;
            s.read_epoch = w.barrier_epoch, s.read_warp_epoch = my_warp_epoch;
        }
    }
}

void global_access(Worker& w, const Lane& lane, BufferState& buffer, int index, uintptr_t address, size_t bytes,
                   bool write) {
    const uint64_t offset = address - buffer.begin;
    (write ? w.stats.store_bytes : w.stats.load_bytes)[index] += bytes;
    auto& sectors = write ? buffer.written_sectors : buffer.read_sectors;
    for (uint64_t s = offset / 32; s <= (offset + bytes - 1) / 32; ++s) __atomic_store_n(&sectors[s], 1, __ATOMIC_RELAXED);
    if (!write || buffer.writers.empty()) return;
    const uint32_t me = (uint32_t)(w.block_linear * w.launch->threads_per_block + lane.linear + 1);
    for (size_t i = 0; i < bytes; ++i) {
        const uint32_t before = __atomic_exchange_n(&buffer.writers[offset + i], me, __ATOMIC_RELAXED);
        if (before && before != me)
            raise(format("two threads write byte %llu of buffer #%d (global threads %u and %u): each output must "
                         "have one writer", (unsigned long long)(offset + i), index, before - 1, me - 1));
    }
}

void check_access(const void* pointer, size_t bytes, bool write) {
    const uintptr_t address = (uintptr_t)pointer;
    const Lane* lane = lane_of_stack();  // the hooks run on the kernel's fiber stack
    if (!lane || !bytes) return;
    if (address - (uintptr_t)lane->stack < kStackBytes) return;  // the kernel's own locals: the usual case
    Worker* w = lane->owner;
    if (!w->launch->config->checked) return;
    if (address - (uintptr_t)w->arena < kArenaBytes) {
        if (w->launch->config->count_only) return;  // counting at scale: global traffic only
        return shared_access(*w, *lane, address - (uintptr_t)w->arena, bytes, write);
    }
    Launch& launch = *w->launch;
    for (int i = 0; i < launch.buffer_count; ++i) {
        BufferState& buffer = launch.buffers[i];
        if (address - buffer.begin < buffer.bytes) {
            if (address + bytes > buffer.begin + buffer.bytes)
                raise(format("%zu-byte %s straddles the end of buffer #%d", bytes, write ? "write" : "read", i));
            return global_access(*w, *lane, buffer, i, address, bytes, write);
        }
    }
    if (address >= image_begin && address < image_end && !write) return;
    std::string nearest = "no argument buffer";
    for (int i = 0; i < launch.buffer_count; ++i) {
        const BufferState& buffer = launch.buffers[i];
        if (address >= buffer.begin + buffer.bytes && address - (buffer.begin + buffer.bytes) < 4096)
            nearest = format("%llu bytes past the end of buffer #%d",
                             (unsigned long long)(address - buffer.begin - buffer.bytes), i);
        else if (address < buffer.begin && buffer.begin - address <= 4096)
            nearest = format("%llu bytes before buffer #%d", (unsigned long long)(buffer.begin - address), i);
    }
    raise(format("out-of-bounds %zu-byte %s at %p (%s)", bytes, write ? "write" : "read", pointer, nearest.c_str()));
}

// ---------------------------------------------------------------- inline PTX
enum MmaKind { kMmaS8 = 0, kMmaS4 = 1, kMmaF16 = 2, kMmaKinds = 3 };

struct Instruction {
    enum Op { kMma, kLdmatrix, kCpAsync, kCommit, kWaitGroup, kWaitAll } op;
    std::vector<std::vector<int>> operands;  // per operand: register indices ({..} groups); [%n] is one
    std::vector<long> immediates;            // numeric operands, in order
    // mma
    MmaKind kind = kMmaS8;
    int k = 0, bits = 0;
    bool a_signed = true, b_signed = true, bf16 = false;
    // ldmatrix
    int matrices = 0;
    bool transpose = false;
    // cp.async
    int copy_bytes = 0;
};

std::vector<std::string> split(const std::string& text, char separator) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t i = 0; i <= text.size(); ++i)
        if (i == text.size() || text[i] == separator) parts.push_back(text.substr(start, i - start)), start = i + 1;
    return parts;
}

[[noreturn]] void unsupported(const std::string& text) {
    raise("unsupported PTX '" + text + "' (the emulator implements mma.sync m16n8k32 s8/u8, m16n8k64 s4/u4, "
          "m16n8k16 f32.bf16/f16, ldmatrix m8n8 .b16, cp.async and its commit/wait groups)");
}

void parse_mma(Instruction& ins, const std::vector<std::string>& parts, const std::string& text) {
    // mma.sync.aligned.SHAPE.row.col.DTYPE.ATYPE.BTYPE.CTYPE
    if (parts.size() != 10 || parts[1] != "sync" || parts[2] != "aligned" || parts[4] != "row" || parts[5] != "col")
        unsupported(text);
    ins.op = Instruction::kMma;
    const std::string &shape = parts[3], &d = parts[6], &a = parts[7], &b = parts[8], &c = parts[9];
    if (shape == "m16n8k32" && d == "s32" && c == "s32" && (a == "s8" || a == "u8") && (b == "s8" || b == "u8"))
        ins.kind = kMmaS8, ins.k = 32, ins.bits = 8;
    else if (shape == "m16n8k64" && d == "s32" && c == "s32" && (a == "s4" || a == "u4") && (b == "s4" || b == "u4"))
        ins.kind = kMmaS4, ins.k = 64, ins.bits = 4;
    else if (shape == "m16n8k16" && d == "f32" && c == "f32" && a == b && (a == "bf16" || a == "f16"))
        ins.kind = kMmaF16, ins.k = 16, ins.bits = 16, ins.bf16 = a == "bf16";
    else
        unsupported(text);
    ins.a_signed = a[0] == 's';
    ins.b_signed = b[0] == 's';
}

Instruction parse(const char* source) {
    const std::string text(source);
    const size_t begin = text.find_first_not_of(" \t\n");
    const size_t end = text.find(';');
    if (begin == std::string::npos || end == std::string::npos ||
        text.find_first_not_of(" \t\n", end + 1) != std::string::npos)
        raise("the emulator takes one PTX instruction per asm statement: '" + text + "'");
    const size_t space = text.find_first_of(" \t\n;", begin);
    const std::string opcode = text.substr(begin, space - begin);
    const std::vector<std::string> parts = split(opcode, '.');
    Instruction ins{};
    if (parts[0] == "mma") {
        parse_mma(ins, parts, text);
    } else if (parts[0] == "ldmatrix") {
        // ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared[.b16]
        std::vector<std::string> rest(parts.begin() + 1, parts.end());
        if (rest.size() < 5 || rest[0] != "sync" || rest[1] != "aligned" || rest[2] != "m8n8") unsupported(text);
        if (rest[3] == "x1") ins.matrices = 1;
        else if (rest[3] == "x2") ins.matrices = 2;
        else if (rest[3] == "x4") ins.matrices = 4;
        else unsupported(text);
        size_t i = 4;
        if (rest[i] == "trans") ins.transpose = true, ++i;
        if (i >= rest.size() || rest[i] != "shared") unsupported(text);
        if (++i < rest.size() && (rest[i] != "b16" || i + 1 != rest.size())) unsupported(text);
        ins.op = Instruction::kLdmatrix;
    } else if (opcode == "cp.async.ca.shared.global" || opcode == "cp.async.cg.shared.global") {
        ins.op = Instruction::kCpAsync;
    } else if (opcode == "cp.async.commit_group") {
        ins.op = Instruction::kCommit;
    } else if (opcode == "cp.async.wait_group") {
        ins.op = Instruction::kWaitGroup;
    } else if (opcode == "cp.async.wait_all") {
        ins.op = Instruction::kWaitAll;
    } else {
        unsupported(text);
    }
    // Operands: {%a, %b}, %n, [%n], or an immediate.
    std::vector<int>* group = nullptr;
    for (size_t i = space; i < end; ++i) {
        const char ch = text[i];
        if (ch == '{' || ch == '[') {
            ins.operands.emplace_back();
            group = &ins.operands.back();
        } else if (ch == '}' || ch == ']') {
            group = nullptr;
        } else if (ch == '%') {
            size_t used = 0;
            const int n = std::stoi(text.substr(i + 1), &used);
            i += used;
            if (group) group->push_back(n);
            else ins.operands.push_back({n});
        } else if (isdigit((unsigned char)ch)) {
            size_t used = 0;
            ins.immediates.push_back(std::stol(text.substr(i), &used, 0));
            i += used - 1;
        } else if (!(ch == ',' || ch == ' ' || ch == '\t' || ch == '\n')) {
            raise("the emulator cannot read the operands of '" + text + "'");
        }
    }
    return ins;
}

const Instruction& instruction(const char* text) {
    // A deque: references stay valid while other fibers (on this OS thread) add entries mid-instruction.
    thread_local std::deque<std::pair<const char*, Instruction>> cache;
    for (auto& entry : cache)
        if (entry.first == text) return entry.second;
    cache.emplace_back(text, parse(text));
    return cache.back().second;
}

struct Operands {
    const Operand* list;
    int outputs, count;
    const char* text;

    const Operand& at(int n) const {
        if (n < 0 || n >= count) raise(format("operand %%%d does not exist in '%s'", n, text));
        return list[n];
    }
    uint64_t read(int n, unsigned size) const {
        const Operand& o = at(n);
        if (!o.readable) raise(format("'%s' reads write-only operand %%%d", text, n));
        if (o.size != size) raise(format("'%s': operand %%%d is %u bytes, the instruction needs %u", text, n, o.size, size));
        uint64_t value = 0;
        memcpy(&value, o.address, size);
        return value;
    }
    void write(int n, uint32_t value) const {
        const Operand& o = at(n);
        if (!o.writable || n >= outputs) raise(format("'%s' writes input operand %%%d", text, n));
        if (o.size != 4) raise(format("'%s': destination %%%d is not a 32-bit register", text, n));
        memcpy(o.address, &value, 4);
    }
};

int64_t integer_element(uint32_t reg, int i, int bits, bool is_signed) {
    const uint32_t v = (reg >> (i * bits)) & ((1u << bits) - 1);
    return is_signed && (v >> (bits - 1)) ? (int64_t)v - (1ll << bits) : (int64_t)v;
}

double half_element(uint32_t reg, int i, bool bf16) {
    const uint16_t bits = (uint16_t)(reg >> (16 * i));
    if (bf16) {
        __nv_bfloat16 v;
        memcpy(&v, &bits, 2);
        return (double)__bfloat162float(v);
    }
    __half v;
    memcpy(&v, &bits, 2);
    return (double)__half2float(v);
}

// D = A·B + C for one warp, PTX ISA fragment layouts. gid = lane/4, tid = lane%4, e = k/8 elements a register:
//   A: a0 = A[gid][tid·e ..], a1 = A[gid+8][tid·e ..], a2 = A[gid][k/2 + tid·e ..], a3 = A[gid+8][k/2 + tid·e ..]
//   B: b0 = B[tid·e ..][gid], b1 = B[k/2 + tid·e ..][gid]
//   C, D: c0 = C[gid][2·tid], c1 = C[gid][2·tid+1], c2 = C[gid+8][2·tid], c3 = C[gid+8][2·tid+1]
// Integer products are exact (int32 wrap-around like the hardware); half-precision products are summed
// exactly in double and rounded to float once.
void mma_compute(Slot& slot, const Instruction& ins) {
    const int e = ins.k / 8;
    double A[16][64], B[64][8], C[16][8];
    for (int lane = 0; lane < kWarp; ++lane) {
        const int gid = lane / 4, tid = lane % 4;
        const uint32_t* r = slot.input[lane];
        for (int q = 0; q < 4; ++q)
            for (int i = 0; i < e; ++i) {
                const int row = gid + 8 * (q & 1), col = (q >> 1) * (ins.k / 2) + tid * e + i;
                A[row][col] = ins.kind == kMmaF16 ? half_element(r[q], i, ins.bf16)
                                                  : (double)integer_element(r[q], i, ins.bits, ins.a_signed);
            }
        for (int q = 0; q < 2; ++q)
            for (int i = 0; i < e; ++i)
                B[q * (ins.k / 2) + tid * e + i][gid] = ins.kind == kMmaF16
                                                           ? half_element(r[4 + q], i, ins.bf16)
                                                           : (double)integer_element(r[4 + q], i, ins.bits, ins.b_signed);
        for (int q = 0; q < 4; ++q) {
            const int row = gid + 8 * (q >> 1), col = 2 * tid + (q & 1);
            if (ins.kind == kMmaF16) {
                float f;
                memcpy(&f, &r[6 + q], 4);
                C[row][col] = f;
            } else {
                C[row][col] = (double)(int32_t)r[6 + q];
            }
        }
    }
    for (int lane = 0; lane < kWarp; ++lane) {
        const int gid = lane / 4, tid = lane % 4;
        for (int q = 0; q < 4; ++q) {
            const int row = gid + 8 * (q >> 1), col = 2 * tid + (q & 1);
            if (ins.kind == kMmaF16) {
                double sum = C[row][col];
                for (int k = 0; k < ins.k; ++k) sum += A[row][k] * B[k][col];
                const float f = (float)sum;
                memcpy(&slot.output[lane][q], &f, 4);
            } else {
                int64_t sum = (int64_t)C[row][col];
                for (int k = 0; k < ins.k; ++k) sum += (int64_t)A[row][k] * (int64_t)B[k][col];
                slot.output[lane][q] = (uint32_t)(uint64_t)sum;  // wraps mod 2^32 like the s32 accumulator
            }
        }
    }
}

void run_mma(const Instruction& ins, const Operands& ops, const char* text) {
    if (ins.operands.size() != 4 || ins.operands[0].size() != 4 || ins.operands[1].size() != 4 ||
        ins.operands[2].size() != 2 || ins.operands[3].size() != 4)
        raise(format("'%s': mma takes {d0..d3}, {a0..a3}, {b0, b1}, {c0..c3}", text));
    uint32_t words[10];
    for (int q = 0; q < 4; ++q) words[q] = (uint32_t)ops.read(ins.operands[1][q], 4);
    for (int q = 0; q < 2; ++q) words[4 + q] = (uint32_t)ops.read(ins.operands[2][q], 4);
    for (int q = 0; q < 4; ++q) words[6 + q] = (uint32_t)ops.read(ins.operands[3][q], 4);
    Slot& slot = collective(text, text, words, 10, [&](Slot& s) {
        if (worker->launch->config->count_only) memset(s.output, 0, sizeof s.output);
        else mma_compute(s, ins);
        worker->stats.mma[ins.kind]++;  // one warp-wide instruction
    });
    for (int q = 0; q < 4; ++q) ops.write(ins.operands[0][q], slot.output[current->lane][q]);
}

void run_ldmatrix(const Instruction& ins, const Operands& ops, const char* text) {
    if (ins.operands.size() != 2 || (int)ins.operands[0].size() != ins.matrices || ins.operands[1].size() != 1)
        raise(format("'%s': ldmatrix takes {r0..r%d}, [address]", text, ins.matrices - 1));
    const uint32_t address = (uint32_t)ops.read(ins.operands[1][0], 4);
    if (address % 16) raise(format("'%s': row address 0x%x is not 16-byte aligned", text, address));
    Slot& slot = collective(text, text, &address, 1, [&](Slot& s) {
        // Lane 8·j + i gives row i of matrix j; lane l receives row l/4, bytes 4·(l%4) .. +3 of each matrix
        // (transposed: the 16-bit elements at rows 2·(l%4) and 2·(l%4)+1 of column l/4).
        for (int j = 0; j < ins.matrices; ++j)
            for (int lane = 0; lane < kWarp; ++lane) {
                uint16_t low, high;
                if (!ins.transpose) {
                    const char* row = shared_pointer(s.input[8 * j + lane / 4][0], 16, "ldmatrix");
                    memcpy(&low, row + 4 * (lane % 4), 2);
                    memcpy(&high, row + 4 * (lane % 4) + 2, 2);
                } else {
                    const char* row0 = shared_pointer(s.input[8 * j + 2 * (lane % 4)][0], 16, "ldmatrix");
                    const char* row1 = shared_pointer(s.input[8 * j + 2 * (lane % 4) + 1][0], 16, "ldmatrix");
                    memcpy(&low, row0 + 2 * (lane / 4), 2);
                    memcpy(&high, row1 + 2 * (lane / 4), 2);
                }
                s.output[lane][j] = low | (uint32_t)high << 16;
            }
    });
    if (race_checks() && current->lane < 8 * ins.matrices)  // the row this lane named
        shared_access(*worker, *current, address, 16, false);
    for (int j = 0; j < ins.matrices; ++j) ops.write(ins.operands[0][j], slot.output[current->lane][j]);
}

void complete_copies(Lane& lane, size_t count) {
    for (size_t i = 0; i < count; ++i) {
        const AsyncCopy& copy = lane.copies[i];
        char* target = shared_pointer(copy.destination, copy.bytes, "cp.async");
        if (worker->launch->config->checked) check_access(copy.source, copy.source_bytes, false);
        if (race_checks()) shared_access(*worker, lane, copy.destination, copy.bytes, true);
        memcpy(target, copy.source, copy.source_bytes);
        memset(target + copy.source_bytes, 0, copy.bytes - copy.source_bytes);
    }
    lane.copies.erase(lane.copies.begin(), lane.copies.begin() + count);
    for (size_t& end : lane.groups) end -= std::min(end, count);
}

void run_cp_async(const Instruction& ins, const Operands& ops, const char* text) {
    Lane& me = *current;
    if (ins.op == Instruction::kCpAsync) {
        // cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}
        if (ins.operands.size() < 2 || ins.immediates.empty())
            raise(format("'%s': cp.async takes [shared], [global], size", text));
        const uint32_t destination = (uint32_t)ops.read(ins.operands[0][0], 4);
        const char* source = reinterpret_cast<const char*>(ops.read(ins.operands[1][0], 8));
        const unsigned bytes = (unsigned)ins.immediates[0];
        unsigned source_bytes = bytes;
        if (ins.operands.size() == 3) source_bytes = (unsigned)ops.read(ins.operands[2][0], 4);
        if (bytes != 4 && bytes != 8 && bytes != 16) raise(format("'%s': cp-size must be 4, 8 or 16", text));
        if (strstr(text, ".cg.") && bytes != 16) raise(format("'%s': cp.async.cg copies 16 bytes", text));
        if (source_bytes > bytes) raise(format("'%s': src-size %u exceeds cp-size %u", text, source_bytes, bytes));
        if (destination % bytes || (uintptr_t)source % bytes)
            raise(format("'%s': addresses must be %u-byte aligned (shared 0x%x, global %p)", text, bytes, destination,
                         (const void*)source));
        shared_pointer(destination, bytes, "cp.async");
        me.copies.push_back({destination, source, bytes, source_bytes});
    } else if (ins.op == Instruction::kCommit) {
        me.groups.push_back(me.copies.size());
    } else {
        // wait_group N: all but the N most recent committed groups complete; wait_all: commit, then all.
        if (ins.op == Instruction::kWaitAll) me.groups.push_back(me.copies.size());
        long keep = 0;
        if (ins.op == Instruction::kWaitGroup) {
            if (!ins.operands.empty()) keep = (long)ops.read(ins.operands[0][0], 4);
            else if (!ins.immediates.empty()) keep = ins.immediates[0];
            else raise(format("'%s': wait_group needs a count", text));
        }
        if ((long)me.groups.size() > keep) {
            const size_t done_groups = me.groups.size() - keep;
            complete_copies(me, me.groups[done_groups - 1]);
            me.groups.erase(me.groups.begin(), me.groups.begin() + done_groups);
        }
    }
}

}  // namespace

// ---------------------------------------------------------------- entry points of svdq_emu.h
uint3 thread_idx() { return current->index; }
uint3 block_idx() { return worker->block_index; }
dim3 block_dim() { return worker->block_dim; }
dim3 grid_dim() {
    const LaunchConfig& c = *worker->launch->config;
    return dim3(c.grid[0], c.grid[1], c.grid[2]);
}
void fail(const char* message) { raise(message); }

void sync_threads() {
    Worker& w = *worker;
    if (w.exited)
        raise(format("__syncthreads after %d thread(s) of the block exited (every thread must reach each barrier)",
                     w.exited));
    const uint32_t epoch = w.barrier_epoch;
    w.progress++;
    w.stats.barriers++;
    if (++w.barrier_arrived == w.live) {
        w.barrier_arrived = 0;
        w.barrier_epoch++;
        return;
    }
    while (w.barrier_epoch == epoch) wait_here("__syncthreads");
}

void sync_warp(unsigned mask) {
    check_full_mask(mask, "__syncwarp");
    collective(__builtin_return_address(0), "__syncwarp", nullptr, 0, [](Slot&) {
        worker->warps[current->warp].sync_epoch++;
    });
}

uint32_t shuffle(unsigned mask, uint32_t value, int mode, int argument, int width) {
    check_full_mask(mask, "a warp shuffle");
    if (width < 1 || width > kWarp || (width & (width - 1)))
        raise(format("shuffle width %d is not a power of two up to 32", width));
    const int me = current->lane;
    Slot& slot = collective(__builtin_return_address(0), "a warp shuffle", &value, 1, [](Slot&) {});
    const int base = me & ~(width - 1);
    int source = me;
    switch (mode) {
        case kShuffleIndex: source = base + (argument & (width - 1)); break;
        case kShuffleUp: source = me - base - argument >= 0 ? me - argument : me; break;
        case kShuffleDown: source = me - base + argument < width ? me + argument : me; break;
        case kShuffleXor: source = ((me ^ argument) - base) >= 0 && ((me ^ argument) - base) < width ? me ^ argument : me;
                          break;
    }
    return slot.input[source][0];
}

uint32_t vote(unsigned mask, int predicate, int mode) {
    check_full_mask(mask, "a warp vote");
    const uint32_t word = predicate != 0;
    Slot& slot = collective(__builtin_return_address(0), "a warp vote", &word, 1, [](Slot&) {});
    uint32_t ballot = 0;
    for (int lane = 0; lane < kWarp; ++lane) ballot |= slot.input[lane][0] << lane;
    return mode == kVoteBallot ? ballot : mode == kVoteAll ? ballot == 0xffffffffu : ballot != 0;
}

template <class T, class Add>
T atomic_update(T* address, Add add) {
    check_access(address, sizeof(T), false);
    check_access(address, sizeof(T), true);
    static_assert(sizeof(T) == 4, "32-bit atomics");
    uint32_t* bits = reinterpret_cast<uint32_t*>(address);
    uint32_t seen = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
        T old;
        memcpy(&old, &seen, 4);
        const T next = add(old);
        uint32_t wanted;
        memcpy(&wanted, &next, 4);
        if (__atomic_compare_exchange_n(bits, &seen, wanted, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
}
int atomic_add(int* a, int v) { return atomic_update(a, [v](int x) { return (int)((unsigned)x + (unsigned)v); }); }
unsigned atomic_add(unsigned* a, unsigned v) { return atomic_update(a, [v](unsigned x) { return x + v; }); }
float atomic_add(float* a, float v) { return atomic_update(a, [v](float x) { return x + v; }); }

void* shared_static(const void* tag, size_t bytes, size_t align) {
    Worker& w = *worker;
    for (auto& entry : w.statics)
        if (entry.first == tag) return w.arena + entry.second;
    const LaunchConfig& config = *w.launch->config;
    if (w.static_bytes + bytes > config.static_shared_limit)
        raise(format("static __shared__ memory of %zu bytes exceeds the %u-byte limit (use extern __shared__)",
                     w.static_bytes + bytes, config.static_shared_limit));
    w.static_bytes += bytes;
    const size_t offset = allocate_shared(bytes, std::max<size_t>(align, 16));
    w.statics.emplace_back(tag, offset);
    return w.arena + offset;
}

void* shared_dynamic(size_t align) {
    Worker& w = *worker;
    if (!w.dynamic_placed) {
        w.dynamic_offset = allocate_shared(w.launch->config->dynamic_shared, std::max<size_t>(align, 16));
        w.dynamic_placed = true;
    }
    return w.arena + w.dynamic_offset;
}

uint32_t shared_address(const void* generic) {
    const uintptr_t offset = (uintptr_t)generic - (uintptr_t)worker->arena;
    if (offset >= worker->arena_used) raise("__cvta_generic_to_shared of a pointer that is not into shared memory");
    return (uint32_t)offset;
}

void ptx(const char* text, const Operand* list, int outputs, int count) {
    const Instruction& ins = instruction(text);
    const Operands ops{list, outputs, count, text};
    switch (ins.op) {
        case Instruction::kMma: return run_mma(ins, ops, text);
        case Instruction::kLdmatrix: return run_ldmatrix(ins, ops, text);
        default: return run_cp_async(ins, ops, text);
    }
}

int run_grid(const LaunchConfig* config, void (*thunk)(void*), void* context, LaunchStats* stats, char* error,
             int error_size) {
    Launch launch;
    launch.config = config;
    launch.thunk = thunk;
    launch.context = context;
    launch.blocks = (uint64_t)config->grid[0] * config->grid[1] * config->grid[2];
    launch.threads_per_block = (uint64_t)config->block[0] * config->block[1] * config->block[2];
    launch.buffer_count = std::min(config->buffer_count, kMaxBuffers);
    if (config->checked) find_image();
    for (int i = 0; i < launch.buffer_count; ++i) {
        BufferState& b = launch.buffers[i];
        b.begin = (uintptr_t)config->buffers[i].address;
        b.bytes = config->buffers[i].bytes;
        if (config->checked) {
            b.read_sectors.assign((b.bytes + 31) / 32, 0);
            b.written_sectors.assign((b.bytes + 31) / 32, 0);
            if (b.bytes <= (8u << 20) && !config->count_only) b.writers.assign(b.bytes, 0);  // 4 shadow bytes a byte
        }
    }
    int threads = config->threads > 0 ? config->threads : (int)std::max(1u, std::thread::hardware_concurrency());
    threads = (int)std::min<uint64_t>(threads, std::max<uint64_t>(launch.blocks, 1));
    auto work = [&launch] {
        Worker w;
        w.launch = &launch;
        w.block_dim = dim3(launch.config->block[0], launch.config->block[1], launch.config->block[2]);
        std::vector<char> arena = take_arena();
        w.arena = arena.data();
        if (launch.config->checked && !launch.config->count_only) w.shadow.assign(kArenaBytes, Shadow{0, 0, 0, 0, 0, 0, 0});
        worker = &w;
        try {
            for (uint64_t block; (block = launch.next_block.fetch_add(1)) < launch.blocks;) run_block(block);
        } catch (const std::exception& e) {
            launch.next_block = launch.blocks;  // the other threads stop at their next block
            std::lock_guard<std::mutex> guard(launch.mutex);
            if (launch.first_error.empty()) launch.first_error = e.what();
        }
        give_back(w.lanes);
        give_back(std::move(arena));
        std::lock_guard<std::mutex> guard(launch.mutex);
        LaunchStats& t = launch.totals;
        for (int i = 0; i < kMaxBuffers; ++i) t.load_bytes[i] += w.stats.load_bytes[i], t.store_bytes[i] += w.stats.store_bytes[i];
        for (int i = 0; i < kMmaKinds; ++i) t.mma[i] += w.stats.mma[i];
        t.shared_bytes = std::max(t.shared_bytes, w.stats.shared_bytes);
        t.barriers += w.stats.barriers;
        t.collectives += w.stats.collectives;
        worker = nullptr;
    };
    if (threads == 1) {
        work();
    } else {
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) pool.emplace_back(work);
        for (std::thread& t : pool) t.join();
    }
    for (int i = 0; i < launch.buffer_count; ++i) {
        const BufferState& b = launch.buffers[i];
        uint64_t read = 0, written = 0;
        for (uint8_t s : b.read_sectors) read += s;
        for (uint8_t s : b.written_sectors) written += s;
        launch.totals.unique_load_bytes[i] = std::min<uint64_t>(read * 32, b.bytes);
        launch.totals.unique_store_bytes[i] = std::min<uint64_t>(written * 32, b.bytes);
    }
    if (stats) *stats = launch.totals;
    snprintf(error, error_size, "%s", launch.first_error.c_str());
    return launch.first_error.empty() ? 0 : 1;
}

}  // namespace svdq_emu

// ---------------------------------------------------------------- instrumentation hooks (checked builds)
// GCC's -fsanitize=thread calls these around every load and store of the kernel's translation unit; without
// libtsan linked, ours run instead.
extern "C" {
#define SVDQ_EMU_HOOK __attribute__((visibility("default")))
SVDQ_EMU_HOOK void __tsan_init() {}
SVDQ_EMU_HOOK void __tsan_func_entry(void*) {}
SVDQ_EMU_HOOK void __tsan_func_exit() {}
SVDQ_EMU_HOOK void __tsan_vptr_update(void**, void*) {}
SVDQ_EMU_HOOK void __tsan_vptr_read(void**) {}
#define SVDQ_EMU_ACCESS(n)                                                                                  \
    SVDQ_EMU_HOOK void __tsan_read##n(void* p) { svdq_emu::check_access(p, n, false); }                      \
    SVDQ_EMU_HOOK void __tsan_write##n(void* p) { svdq_emu::check_access(p, n, true); }                      \
    SVDQ_EMU_HOOK void __tsan_unaligned_read##n(void* p) { svdq_emu::check_access(p, n, false); }            \
    SVDQ_EMU_HOOK void __tsan_unaligned_write##n(void* p) { svdq_emu::check_access(p, n, true); }            \
    SVDQ_EMU_HOOK void __tsan_volatile_read##n(void* p) { svdq_emu::check_access(p, n, false); }             \
    SVDQ_EMU_HOOK void __tsan_volatile_write##n(void* p) { svdq_emu::check_access(p, n, true); }             \
    SVDQ_EMU_HOOK void __tsan_unaligned_volatile_read##n(void* p) { svdq_emu::check_access(p, n, false); }   \
    SVDQ_EMU_HOOK void __tsan_unaligned_volatile_write##n(void* p) { svdq_emu::check_access(p, n, true); }
SVDQ_EMU_ACCESS(1)
SVDQ_EMU_ACCESS(2)
SVDQ_EMU_ACCESS(4)
SVDQ_EMU_ACCESS(8)
SVDQ_EMU_ACCESS(16)
SVDQ_EMU_HOOK void __tsan_read_range(void* p, unsigned long n) { svdq_emu::check_access(p, n, false); }
SVDQ_EMU_HOOK void __tsan_write_range(void* p, unsigned long n) { svdq_emu::check_access(p, n, true); }
}
