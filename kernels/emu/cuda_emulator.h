// CPU emulation of our CUDA C kernels (kernels/cuda/*.cu). Force-included by the emulator's build:
//   g++ -std=c++20 -O2 -fPIC -shared -fno-strict-aliasing -fvisibility=hidden -DLOOKAHEAD_EMULATE
//       -include kernels/emu/cuda_emulator.h -I kernels/cuda -x c++ kernels/cuda/NAME.cu
// it turns a .cu file into host C++ (the CUDA qualifiers, built-in variables and intrinsics our
// kernels use) plus one entry point, lookahead_emu_run, that runs a kernel launch on the host.
//
// Execution model: the blocks (clusters) of a grid run one after another; the threads of a block run as
// cooperative fibers on the calling OS thread, one at a time, each until its next
// synchronisation point (a barrier, a warp collective) or its exit, in the order of the launch's
// schedule (round-robin, far-apart or random; see `Schedule` below). Synchronisation is
// real: __syncthreads releases when every live thread of the block waits at the same barrier; a
// warp collective (shuffles, votes, __syncwarp, mma, ldmatrix) releases when every lane of its
// mask waits at it, and its results are then computed from all lanes' inputs by the PTX ISA's
// definition. A state where nothing can proceed is a deadlock and comes back as an error naming
// the kernel, the block and where each thread waits; so does a collective whose mask names an
// exited lane. Thread-block clusters: the CTAs of a cluster run together (their warps interleaved
// by the schedule), with the split cluster barrier and reads of each other's shared memory
// (cluster.cuh). Static __shared__ variables are thread_local: the module's TLS block holds the
// running CTA's copy and is swapped per CTA (launches of one module are serialised by a mutex);
// dynamic shared memory (LA_DYNAMIC_SHARED) is a buffer per CTA of the cluster. Both are filled
// with 0xff bytes (NaN as f32, bf16 and f16) before every block (and when a CTA of a cluster
// exits), so reads of never-written shared memory show; so does a cp.async destination between
// the issue and the wait that retires it. Hopper warpgroup MMA (wgmma) runs as collectives of the
// 128 threads of a warpgroup, asynchronously: the accumulator is NaN from the issue until the
// wgmma_wait that retires its group computes the product from shared memory as it is then.
// Pipelines (pipeline.cuh): named barriers at warp granularity, mbarriers with arrival and
// transaction counts and parity waits (scheduling points), cp_async_mbarrier_arrive, TMA 2D
// loads and stores that land at a scheduling point the schedule picks (their destination holds
// 0xff bytes until then), setmaxnreg as a warpgroup collective; in clusters, TMA loads multicast
// to several CTAs and arrivals on another CTA's mbarrier (mapa), with the cluster-wide init
// visibility (fence_mbarrier_init + cluster barrier) and CTA lifetime they need checked.
// See kernels/emu/README.md for what is not emulated.
#pragma once
#ifndef LOOKAHEAD_EMULATE
#error "cuda_emulator.h is only for builds with -DLOOKAHEAD_EMULATE"
#endif

// System headers first: the CUDA qualifier macros below must not reach them.
#include <math.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <link.h>
#include <limits>
#include <type_traits>
#include <utility>
// The hand-written x86-64 context switch, or ucontext (other targets, or forced with
// -DLOOKAHEAD_EMU_UCONTEXT to test that path).
#if defined(__x86_64__) && !defined(LOOKAHEAD_EMU_UCONTEXT)
#define LA_EMU_X86_SWITCH 1
#else
#include <ucontext.h>
#endif

// ---- qualifiers ----------------------------------------------------------------------------------
// Kernels are `extern "C" __global__`: exported from the module (built with -fvisibility=hidden).
#define __global__ __attribute__((visibility("default")))
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A const kernel parameter the kernel may take the address of (TensorMap): by value here anyway.
#define __grid_constant__
// Static shared variables are thread-local: the module's TLS block (nothing else of the module is
// thread-local) holds the shared memory of the CTA that runs now; the launch swaps in another
// CTA's copy when it switches to one of its threads (thread-block clusters run several CTAs at once).
#define __shared__ static thread_local
// __restrict__ is GCC's own keyword already.

// bf16 and f16 are defined by common.cuh; declared here so that the mma specialisations below
// can name them.
struct bf16;
struct f16;
// pipeline.cuh's TMA descriptor (struct alignas(64) TensorMap { u64 opaque[16]; }).
struct TensorMap;

// ---- vector types ----------------------------------------------------------------------------------
#define LA_EMU_VECTOR_TYPES(T, NAME, ALIGN2, ALIGN4)                                                     \
    struct NAME##1 { T x; };                                                                           \
    struct __attribute__((aligned(ALIGN2))) NAME##2 { T x, y; };                                       \
    struct NAME##3 { T x, y, z; };                                                                     \
    struct __attribute__((aligned(ALIGN4))) NAME##4 { T x, y, z, w; };                                 \
    inline NAME##1 make_##NAME##1(T x) { return NAME##1{x}; }                                          \
    inline NAME##2 make_##NAME##2(T x, T y) { return NAME##2{x, y}; }                                  \
    inline NAME##3 make_##NAME##3(T x, T y, T z) { return NAME##3{x, y, z}; }                          \
    inline NAME##4 make_##NAME##4(T x, T y, T z, T w) { return NAME##4{x, y, z, w}; }
LA_EMU_VECTOR_TYPES(signed char, char, 2, 4)
LA_EMU_VECTOR_TYPES(unsigned char, uchar, 2, 4)
LA_EMU_VECTOR_TYPES(short, short, 4, 8)
LA_EMU_VECTOR_TYPES(unsigned short, ushort, 4, 8)
LA_EMU_VECTOR_TYPES(int, int, 8, 16)
LA_EMU_VECTOR_TYPES(unsigned int, uint, 8, 16)
LA_EMU_VECTOR_TYPES(float, float, 8, 16)
LA_EMU_VECTOR_TYPES(long long, longlong, 16, 16)
LA_EMU_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
LA_EMU_VECTOR_TYPES(double, double, 16, 16)
#undef LA_EMU_VECTOR_TYPES

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

// ---- the runtime ---------------------------------------------------------------------------------
namespace lookahead_emu {

// AtNamed: the thread's warp has arrived at a named barrier (bar.sync) that has not completed yet;
// AtMbarrier: waits in mbarrier_try_wait for the phase of parity in[0] of the mbarrier at addr.
enum class State : int { Runnable, AtBlockBarrier, AtWarp, AtCluster, AtNamed, AtMbarrier, Exited };

// What a thread waits at (op) and its variant (sub).
enum Op : int { OpNone, OpSyncThreads, OpSyncWarp, OpShfl, OpVote, OpReduce, OpMma, OpLdmatrix, OpClusterWait, OpWarpgroup, OpNamedBarrier, OpMbarrierWait };
enum ShflMode : int { ShflIdx, ShflUp, ShflDown, ShflXor };
enum VoteMode : int { VoteBallot, VoteAny, VoteAll, VoteUni };
enum ReduceMode : int { ReduceAddU, ReduceMinU, ReduceMaxU, ReduceMinI, ReduceMaxI, ReduceAnd, ReduceOr, ReduceXor };
enum BarrierMode : int { BarrierPlain, BarrierCount, BarrierAnd, BarrierOr };

struct PendingCopy {
    unsigned char* dst;
    unsigned char data[16];
    unsigned size;  // 16 (cp_async_16) or 8 (cp_async_8)
};

struct Launch;
struct WgmmaOp;
struct Fiber;

// The wgmma state of one warpgroup: its issued, not yet retired wgmmas in issue order and the
// end index of every committed group, oldest first (ops past the last end are not committed).
struct WarpgroupState {
    WgmmaOp** ops;
    unsigned nops, ops_cap;
    unsigned* group_end;
    unsigned ngroups, groups_cap;
};

// A named barrier (bar.sync / bar.arrive id, count) of one CTA in its current phase: the thread
// count the first warp gave, the warp arrivals so far (each warp counts 32 threads; a warp that
// arrives twice counts twice, as on the GPU) and which warps arrived.
struct NamedBarrier {
    unsigned count, arrivals;
    uint32_t warps;
    unsigned first_warp;
    const char* file;
    int line;
};

// An mbarrier (PTX ISA "mbarrier"), kept beside the u64 it lives in: the u64 holds kMbarrierTag
// from its init on, so that a plain store over it shows. pending: arrivals still missing in the
// current phase; tx: transaction bytes announced (arrive_expect_tx) minus those completed
// (complete_tx of TMA copies), negative while copies run ahead of their announcement.
struct Mbarrier {
    unsigned char* addr;
    unsigned cta;
    unsigned count, pending, phase;
    long long tx;
    const char* file;  // its mbarrier_init
    int line;
    // The initialising thread and how many block / cluster barriers it had passed: another
    // thread may use the mbarrier only after passing more (pipeline.cuh: init, fence, __syncthreads).
    const Fiber* init_fiber;
    unsigned init_syncs;
    // Cluster-wide visibility (remote arrivals, multicast copies from other CTAs): UINT_MAX until
    // the initialising thread's fence_mbarrier_init, then its cluster-barrier arrivals at the
    // fence; another CTA's thread may use the mbarrier once it has passed more cluster waits.
    unsigned fence_arrives;
};
constexpr uint64_t kMbarrierTag = 0x6d626172456d7521ull;

// An asynchronous operation in flight, completed at a scheduling point the schedule picks (or at
// the wait that needs it): a cp_async_mbarrier_arrive (the arrival once the thread's cp.async
// copies issued before it, seq, have landed), a TMA load (box into shared memory, then
// complete_tx on the mbarrier) or a TMA store (box from shared memory to global memory, bulk
// group `seq` of its thread).
enum AsyncKind : int { AsyncCpArrive, AsyncTmaLoad, AsyncTmaStore };
struct AsyncOp {
    int kind;
    unsigned cta;
    Fiber* f;  // the issuing thread
    uint64_t seq;
    unsigned char* smem;  // TMA: the box in shared memory
    unsigned char* bar;   // the mbarrier (cp.async arrive, TMA load)
    unsigned mask;        // TMA multicast: the CTA mask (0 for a plain load); cta is this copy's destination
    uint64_t map[16];     // TMA: the tensor map, as at the issue
    int x, y, z, w;       // TMA: the box's coordinates (inner first; z, w 0 below rank 3, 4)
    const char* file;
    int line;
};

// One emulated thread. Lives at the (region-aligned) base of its fiber's memory region, so that a
// running thread finds itself from its stack address: no thread-local storage on the hot path.
struct Fiber {
    uint64_t magic;
    void* sp;  // saved stack pointer while switched out (x86-64)
    Launch* launch;
    uint3 tid, block_idx;
    unsigned linear, lane, warp;
    unsigned cta;               // rank of its CTA in the cluster (0 without clusters)
    unsigned arrives, waits;    // cluster barrier: arrivals and completed waits so far
    State state;
    // The synchronisation point it waits at: op, variant, lane mask and source location.
    int op, sub;
    unsigned mask;
    const char* file;
    int line;
    // Inputs deposited for a collective, and the results the collective hands back.
    uint32_t in[12];
    uint64_t addr;
    uint32_t out[4];
    // cp.async: copies in issue order (data read at issue), and the end index of every committed
    // group, oldest first; copies past the last end are not committed yet.
    PendingCopy* copies;
    unsigned ncopies, copies_cap;
    unsigned* group_end;
    unsigned ngroups, groups_cap;
    uint64_t copy_seq;          // cp.async copies issued so far (cp_async_mbarrier_arrive's marks)
    unsigned block_syncs;       // block and cluster barriers passed (orders mbarrier inits before uses)
    unsigned bulk_groups;       // TMA store bulk groups committed so far
#if !defined(LA_EMU_X86_SWITCH)
    ucontext_t ctx;
#endif
};

constexpr uint64_t kMagic = 0x6c61656d7566696bull;  // "laemufik"
// Fiber memory region: the Fiber header, a guard page, then the stack (about 440 KiB: Rust
// callbacks run on it). Regions are aligned to their size.
constexpr uintptr_t kRegion = 512 * 1024;
constexpr uintptr_t kHeader = 64 * 1024;

// The order in which the threads of a block run between synchronisation points (the `schedule`
// argument of lookahead_emu_run; kernels/emu/README.md says what each one exposes):
// - round-robin: rounds of every runnable thread in index order, each to its next sync point;
//   then the warps' collectives and the block barrier are resolved. Warps stay in step.
// - far-apart: one warp runs as far as it can (until each lane waits at a block barrier or has
//   exited) before the next warp starts; the warp order (and the lane order inside each warp)
//   alternates forward / reverse at every block barrier and starts reversed in odd blocks. A
//   fast warp thus finishes a whole barrier interval, including the writes and cp.async issues
//   that start the next one, before a slow warp has done anything in it.
// - random: a seeded generator picks the next warp among those with a runnable lane, the lane
//   order, and how many sync points (1 .. 256, log-uniform) the warp runs before the next pick.
enum Schedule : int { ScheduleRoundRobin = 0, ScheduleFarApart = 1, ScheduleRandom = 2 };

struct Launch {
    const char* kernel;
    int schedule;
    uint64_t rng;  // state of the random schedule's generator
    uint3 grid, block, block_idx;  // block_idx: the first CTA of the cluster that runs (errors)
    uint3 cluster;                  // cluster dims; (1,1,1) without clusters
    unsigned nthreads, nwarps;      // per CTA
    unsigned ncta, total;           // CTAs per cluster; threads of the cluster (ncta * nthreads)
    unsigned char* dyn_shared[16];  // per CTA
    unsigned dyn_bytes;
    // Static shared memory: the module's TLS block (live: the CTA whose copy is in it) and a
    // saved copy per CTA of the cluster.
    unsigned char* tls_base;
    size_t tls_size;
    unsigned char* tls_save;
    unsigned live_cta;
    unsigned exited[16];            // exited threads per CTA
    // Warpgroup MMA: the state of warpgroup g of CTA r at wgs[r * nwg + g]; dyn_window: offset of
    // the dynamic shared memory in the CTA's shared window (static shared memory at 0, dynamic
    // after it rounded up to 1024 bytes), the "absolute address" of wgmma descriptors.
    WarpgroupState* wgs;
    unsigned nwg;
    unsigned dyn_window;
    Fiber** fibers;                 // CTA r's threads at fibers[r * nthreads ...]
    int (*thread_fn)(void*, const void*);
    void* ctx;
    const void* kernel_fn;
    // Named barriers (per CTA, ids 1..15), mbarriers and the asynchronous operations in flight
    // of the running cluster.
    NamedBarrier named[16][16];
    Mbarrier* mbars;
    unsigned nmbars, mbars_cap;
    AsyncOp* async;
    unsigned nasync, async_cap;
    bool failed;
    bool callback_panicked;
    char msg[8192];
#if defined(LA_EMU_X86_SWITCH)
    void* sched_sp;
#else
    ucontext_t sched_ctx;
#endif
};

// Makes CTA `cta`'s static shared memory the one in the TLS block.
inline void make_live(Launch* L, unsigned cta) {
    if (cta == L->live_cta || L->tls_size == 0) return;
    memcpy(L->tls_save + (size_t)L->live_cta * L->tls_size, L->tls_base, L->tls_size);
    memcpy(L->tls_base, L->tls_save + (size_t)cta * L->tls_size, L->tls_size);
    L->live_cta = cta;
}
// Where CTA `cta`'s static shared memory is now.
inline unsigned char* static_shared_of(Launch* L, unsigned cta) { return cta == L->live_cta ? L->tls_base : L->tls_save + (size_t)cta * L->tls_size; }

// The lanes of warp `w` (numbered over the cluster: CTA w / nwarps, warp w % nwarps of it) and
// how many there are.
inline Fiber** warp_lanes(Launch* L, unsigned w, unsigned& nl) {
    const unsigned cta = w / L->nwarps, first = 32 * (w % L->nwarps);
    nl = L->nthreads - first < 32 ? L->nthreads - first : 32;
    return L->fibers + (size_t)cta * L->nthreads + first;
}

[[noreturn]] inline void outside_launch() {
    fprintf(stderr, "lookahead CUDA emulator: a CUDA built-in (threadIdx, __syncthreads, ...) was used outside an emulated launch\n");
    abort();
}

inline Fiber* self() {
    Fiber* f = reinterpret_cast<Fiber*>(reinterpret_cast<uintptr_t>(__builtin_frame_address(0)) & ~(kRegion - 1));
    if (__builtin_expect(f->magic != kMagic, 0)) outside_launch();
    return f;
}

inline const char* base_name(const char* path) {
    const char* b = path;
    for (const char* p = path; *p; ++p)
        if (*p == '/') b = p + 1;
    return b;
}

// ---- context switching ---------------------------------------------------------------------------
#if defined(LA_EMU_X86_SWITCH)
// lookahead_emu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save, and resumes the stack `to`.
extern "C" void lookahead_emu_switch(void** save, void* to);
asm(R"(
    .pushsection .text
    .p2align 4
    .globl lookahead_emu_switch
    .hidden lookahead_emu_switch
    .type lookahead_emu_switch, @function
lookahead_emu_switch:
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
    .size lookahead_emu_switch, .-lookahead_emu_switch
    .popsection
)");
#endif

void fiber_main();

// A fresh start of `f` at fiber_main on its own stack.
inline void reset_stack(Fiber* f) {
    unsigned char* top = reinterpret_cast<unsigned char*>(f) + kRegion;
#if defined(LA_EMU_X86_SWITCH)
    uint64_t* s = reinterpret_cast<uint64_t*>(top);
    *--s = 0;  // fiber_main's return address: it never returns
    *--s = reinterpret_cast<uint64_t>(&fiber_main);
    for (int i = 0; i < 6; ++i) *--s = 0;  // rbp rbx r12 r13 r14 r15
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    *--s = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
    f->sp = s;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = reinterpret_cast<unsigned char*>(f) + kHeader + 65536;
    f->ctx.uc_stack.ss_size = kRegion - kHeader - 65536;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, &fiber_main, 0);
#endif
}

inline void enter_fiber(Launch* L, Fiber* f) {
    make_live(L, f->cta);
#if defined(LA_EMU_X86_SWITCH)
    lookahead_emu_switch(&L->sched_sp, f->sp);
#else
    swapcontext(&L->sched_ctx, &f->ctx);
#endif
}

inline void leave_fiber(Fiber* f) {
#if defined(LA_EMU_X86_SWITCH)
    lookahead_emu_switch(&f->sp, f->launch->sched_sp);
#else
    swapcontext(&f->ctx, &f->launch->sched_ctx);
#endif
}

// ---- errors --------------------------------------------------------------------------------------
// The first error of a launch is kept; the thread that raises it is never resumed.
__attribute__((format(printf, 2, 3))) inline void set_error(Launch* L, const char* fmt, ...) {
    if (L->failed) return;
    L->failed = true;
    int n = L->ncta > 1 ? snprintf(L->msg, sizeof L->msg, "cluster of blocks (%u,%u,%u)+(%u,%u,%u): ", L->block_idx.x, L->block_idx.y, L->block_idx.z, L->cluster.x, L->cluster.y, L->cluster.z)
                        : snprintf(L->msg, sizeof L->msg, "block (%u,%u,%u): ", L->block_idx.x, L->block_idx.y, L->block_idx.z);
    if (n < 0 || (size_t)n >= sizeof L->msg) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->msg + n, sizeof L->msg - n, fmt, ap);
    va_end(ap);
}

// Raised by a running thread: records the error and hands control back for good.
template <typename... A> [[noreturn]] inline void thread_error(Fiber* f, const char* fmt, A... args) {
    char buf[1024];
    snprintf(buf, sizeof buf, fmt, args...);
    if (f->launch->ncta > 1) set_error(f->launch, "block (%u,%u,%u) thread (%u,%u,%u): %s", f->block_idx.x, f->block_idx.y, f->block_idx.z, f->tid.x, f->tid.y, f->tid.z, buf);
    else set_error(f->launch, "thread (%u,%u,%u): %s", f->tid.x, f->tid.y, f->tid.z, buf);
    leave_fiber(f);
    __builtin_trap();  // never resumed
}

// ---- 16-bit floats -------------------------------------------------------------------------------
inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
inline float bf16_bits_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }
// Exact f16 -> f32 (cvt.f32.f16); NaN keeps its sign and payload.
inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        const float v = (float)man * 0x1p-24f;  // zero or subnormal, exact
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
// f32 -> f16 rounded to nearest even (cvt.rn.f16.f32): overflow to infinity, subnormals kept;
// NaN keeps its sign and the top of its payload, quieted (as the Rust half crate).
inline uint16_t f32_to_f16_bits(float v) {
    const uint32_t x = f32_bits(v), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(ax == 0x7f800000u ? sign | 0x7c00u : sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (ax >= 0x38800000u) {                                  // normal f16 (>= 2^-14)
        const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    if (ax < 0x33000000u) return (uint16_t)sign;  // <= 2^-25: rounds to zero
    const uint32_t e = ax >> 23, man = (ax & 0x7fffffu) | 0x800000u, s = 126u - e;
    uint32_t q = man >> s;
    const uint32_t rem = man & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (uint16_t)(sign | q);
}

// ---- barriers and warp collectives (thread side) -----------------------------------------------------
// Waits at a synchronisation point: the scheduler resumes the thread once it is released.
inline void wait_at(Fiber* f, State st, int op, int sub, unsigned mask, const char* file, int line) {
    f->state = st;
    f->op = op;
    f->sub = sub;
    f->mask = mask;
    f->file = file;
    f->line = line;
    leave_fiber(f);
    f->op = OpNone;
}

inline unsigned block_barrier(int mode, int pred, const char* file, int line) {
    Fiber* f = self();
    f->in[0] = pred != 0;
    wait_at(f, State::AtBlockBarrier, OpSyncThreads, mode, 0, file, line);
    return f->out[0];
}

inline uint64_t shfl(int mode, unsigned mask, uint64_t bits, int b, int width, const char* file, int line) {
    Fiber* f = self();
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) thread_error(f, "shuffle width %d at %s:%d is not a power of two in 1..32", width, base_name(file), line);
    f->in[0] = (uint32_t)bits;
    f->in[1] = (uint32_t)(bits >> 32);
    f->in[2] = (uint32_t)b;
    f->in[3] = (uint32_t)width;
    wait_at(f, State::AtWarp, OpShfl, mode, mask, file, line);
    return (uint64_t)f->out[0] | ((uint64_t)f->out[1] << 32);
}

template <typename T> inline uint64_t to_bits64(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move values of at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> inline T from_bits64(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

inline unsigned vote(int mode, unsigned mask, int pred, const char* file, int line) {
    Fiber* f = self();
    f->in[0] = pred != 0;
    wait_at(f, State::AtWarp, OpVote, mode, mask, file, line);
    return f->out[0];
}

inline unsigned warp_reduce(int mode, unsigned mask, unsigned v, const char* file, int line) {
    Fiber* f = self();
    f->in[0] = v;
    wait_at(f, State::AtWarp, OpReduce, mode, mask, file, line);
    return f->out[0];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: sub 0 = bf16, 1 = f16.
inline void mma_16816(int type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const char* file, int line) {
    Fiber* f = self();
    for (int i = 0; i < 4; ++i) f->in[i] = a[i];
    f->in[4] = b[0];
    f->in[5] = b[1];
    for (int i = 0; i < 4; ++i) f->in[6 + i] = f32_bits(d[i]);
    wait_at(f, State::AtWarp, OpMma, type, 0xffffffffu, file, line);
    for (int i = 0; i < 4; ++i) d[i] = bits_f32(f->out[i]);
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: sub = count | trans << 4.
template <int N> inline void ldmatrix(uint32_t (&r)[N], const void* row, bool trans, const char* file, int line) {
    Fiber* f = self();
    f->addr = reinterpret_cast<uint64_t>(row);
    wait_at(f, State::AtWarp, OpLdmatrix, N | (trans ? 16 : 0), 0xffffffffu, file, line);
    for (int i = 0; i < N; ++i) r[i] = f->out[i];
}

// ---- cp.async (per thread; no synchronisation) ---------------------------------------------------
// One copy of `size` bytes (16: cp.async.cg, 8: cp.async.ca); dst and (when full) src aligned to
// `size`; !full zero-fills.
inline void cp_async_bytes(void* dst, const void* src, bool full, unsigned size, const char* name, const char* file, int line) {
    Fiber* f = self();
    if (reinterpret_cast<uintptr_t>(dst) % size != 0) thread_error(f, "%s destination %p at %s:%d is not %u-byte aligned", name, dst, base_name(file), line, size);
    if (full && reinterpret_cast<uintptr_t>(src) % size != 0) thread_error(f, "%s source %p at %s:%d is not %u-byte aligned", name, src, base_name(file), line, size);
    if (f->ncopies == f->copies_cap) {
        f->copies_cap = f->copies_cap ? 2 * f->copies_cap : 16;
        f->copies = static_cast<PendingCopy*>(realloc(f->copies, f->copies_cap * sizeof(PendingCopy)));
        if (!f->copies) abort();
    }
    PendingCopy& c = f->copies[f->ncopies++];
    c.dst = static_cast<unsigned char*>(dst);
    // The source is read now: a later change to it does not reach the copy, as on the GPU once
    // the copy is under way. The destination is written when a wait retires the group.
    c.size = size;
    ++f->copy_seq;
    if (full) memcpy(c.data, src, size);
    else memset(c.data, 0, size);
    // Until then the destination is undefined (the hardware may write it at any moment after
    // the issue): it holds 0xff bytes (NaN as f32 / bf16 / f16), so that a read of it — by this
    // thread before its wait, or by another thread that still uses the old contents (a stage
    // overwritten before every warp is done with it) — shows in the results.
    memset(dst, 0xff, size);
}
inline void cp_async_16(void* dst, const void* src, bool full, const char* file, int line) { cp_async_bytes(dst, src, full, 16, "cp_async_16", file, line); }
inline void cp_async_8(void* dst, const void* src, bool full, const char* file, int line) { cp_async_bytes(dst, src, full, 8, "cp_async_8", file, line); }

inline void cp_async_commit() {
    Fiber* f = self();
    if (f->ngroups == f->groups_cap) {
        f->groups_cap = f->groups_cap ? 2 * f->groups_cap : 8;
        f->group_end = static_cast<unsigned*>(realloc(f->group_end, f->groups_cap * sizeof(unsigned)));
        if (!f->group_end) abort();
    }
    f->group_end[f->ngroups++] = f->ncopies;
}

// Writes the copies of the oldest `groups` committed groups (all copies when groups < 0, at exit).
inline void retire_copies(Fiber* f, int groups) {
    unsigned done;
    if (groups < 0) {
        done = f->ncopies;
        f->ngroups = 0;
    } else {
        if (groups == 0) return;
        done = f->group_end[groups - 1];
        for (unsigned g = groups; g < f->ngroups; ++g) f->group_end[g - groups] = f->group_end[g] - done;
        f->ngroups -= groups;
    }
    for (unsigned i = 0; i < done; ++i) memcpy(f->copies[i].dst, f->copies[i].data, f->copies[i].size);
    memmove(f->copies, f->copies + done, (f->ncopies - done) * sizeof(PendingCopy));
    f->ncopies -= done;
}

inline void cp_async_wait(int n) {
    Fiber* f = self();
    if ((int)f->ngroups > n) retire_copies(f, (int)f->ngroups - n);
}

inline unsigned char* dynamic_shared() {
    Fiber* f = self();
    return f->launch->dyn_shared[f->cta];
}

// ---- thread-block clusters -------------------------------------------------------------------------
// barrier.cluster.arrive: does not block (the thread may work before its wait).
inline void cluster_arrive(const char* file, int line) {
    Fiber* f = self();
    if (f->arrives != f->waits) thread_error(f, "cluster_arrive at %s:%d: arrived again before waiting for the previous arrival", base_name(file), line);
    ++f->arrives;
}
// barrier.cluster.wait: until every (non-exited) thread of the cluster has arrived as often as
// this one.
inline void cluster_wait(const char* file, int line) {
    Fiber* f = self();
    if (f->arrives == f->waits) thread_error(f, "cluster_wait at %s:%d without a cluster_arrive before it", base_name(file), line);
    ++f->waits;
    wait_at(f, State::AtCluster, OpClusterWait, 0, 0, file, line);
}
// ld.shared::cluster of the f32 at this CTA's shared address p, in CTA `rank`'s shared memory.
inline float cluster_load_remote(const float* p, unsigned rank, const char* file, int line) {
    Fiber* f = self();
    Launch* L = f->launch;
    if (rank >= L->ncta) thread_error(f, "cluster_load_remote at %s:%d: rank %u, but the cluster has %u CTAs", base_name(file), line, rank, L->ncta);
    const unsigned char* a = reinterpret_cast<const unsigned char*>(p);
    const unsigned char* src = nullptr;
    if (L->tls_size && a >= L->tls_base && a + 4 <= L->tls_base + L->tls_size) src = static_shared_of(L, rank) + (a - L->tls_base);
    else if (a >= L->dyn_shared[f->cta] && a + 4 <= L->dyn_shared[f->cta] + L->dyn_bytes) src = L->dyn_shared[rank] + (a - L->dyn_shared[f->cta]);
    else thread_error(f, "cluster_load_remote at %s:%d: %p is not in this CTA's shared memory", base_name(file), line, (const void*)p);
    float v;
    memcpy(&v, src, 4);
    return v;
}


// ---- named barriers, mbarriers and asynchronous completions (pipeline.cuh) -----------------------
// The offset of [p, p + size) in CTA `cta`'s shared window (static shared memory at 0, dynamic
// at dyn_window), or -1 when it is not inside this CTA's shared memory.
inline long long shared_offset(Launch* L, unsigned cta, const void* p, size_t size) {
    const unsigned char* a = static_cast<const unsigned char*>(p);
    if (L->tls_size && a >= L->tls_base && a + size <= L->tls_base + L->tls_size) return (long long)(a - L->tls_base);
    if (L->dyn_bytes && a >= L->dyn_shared[cta] && a + size <= L->dyn_shared[cta] + L->dyn_bytes) return (long long)(L->dyn_window + (a - L->dyn_shared[cta]));
    return -1;
}

enum NamedMode : int { NamedSync = 0, NamedArrive = 1 };

// bar.sync / bar.arrive id, threads: a warp-level rendezvous of the warp's non-exited lanes (the
// instruction is .aligned), then one warp arrival at barrier `id` (resolve_named_barrier).
inline void named_barrier(int mode, unsigned id, unsigned threads, const char* file, int line) {
    Fiber* f = self();
    Launch* L = f->launch;
    const char* what = mode == NamedSync ? "named_barrier_sync" : "named_barrier_arrive";
    if (id == 0 || id > 15) thread_error(f, "%s(%u, %u) at %s:%d: barrier id %u is not in 1..15 (0 is __syncthreads' barrier)", what, id, threads, base_name(file), line, id);
    if (threads == 0 || threads % 32 != 0) thread_error(f, "%s(%u, %u) at %s:%d: the thread count is not a positive multiple of 32 (warps arrive whole)", what, id, threads, base_name(file), line);
    if (threads > 32 * L->nwarps) thread_error(f, "%s(%u, %u) at %s:%d: the thread count is more than the block's %u warps can give", what, id, threads, base_name(file), line, L->nwarps);
    f->in[0] = id;
    f->in[1] = threads;
    wait_at(f, State::AtWarp, OpNamedBarrier, mode, 0xffffffffu, file, line);
}

inline Mbarrier* find_mbarrier(Launch* L, unsigned cta, const void* p) {
    for (unsigned i = 0; i < L->nmbars; ++i)
        if (L->mbars[i].addr == p && L->mbars[i].cta == cta) return &L->mbars[i];
    return nullptr;
}

// The mbarrier at `bar` for `what` at file:line; an error when it is not an initialised one.
inline Mbarrier* mbarrier_of(Fiber* f, const void* bar, const char* what, const char* file, int line) {
    Launch* L = f->launch;
    const long long off = shared_offset(L, f->cta, bar, 8);
    if (off < 0) thread_error(f, "%s at %s:%d: %p is not in this CTA's shared memory (an mbarrier is a u64 in shared memory)", what, base_name(file), line, bar);
    if (off % 8 != 0) thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx is not 8-byte aligned", what, base_name(file), line, off);
    Mbarrier* m = find_mbarrier(L, f->cta, bar);
    if (!m) thread_error(f, "%s at %s:%d: shared+0x%llx is not an initialised mbarrier (mbarrier_init, fence_mbarrier_init and __syncthreads come before any use)", what, base_name(file), line, off);
    if (m->init_fiber != f && f->block_syncs <= m->init_syncs)
        thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx is used without a __syncthreads (or cluster barrier) since its mbarrier_init by thread %u at %s:%d (the init may not be visible yet)",
                     what, base_name(file), line, off, m->init_fiber->linear, base_name(m->file), m->line);
    uint64_t v;
    memcpy(&v, bar, 8);
    if (v != kMbarrierTag)
        thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx (mbarrier_init at %s:%d) was overwritten by a plain store (or a copy) since its init", what, base_name(file), line, off,
                     base_name(m->file), m->line);
    return m;
}

// Completes m's current phase: the parity flips, the arrival count restarts and every thread
// waiting for the phase resumes.
inline void mbarrier_complete_phase(Launch* L, Mbarrier* m) {
    m->phase++;
    m->pending = m->count;
    m->tx = 0;
    Fiber** fibers = L->fibers + (size_t)m->cta * L->nthreads;
    for (unsigned i = 0; i < L->nthreads; ++i)
        if (fibers[i]->state == State::AtMbarrier && fibers[i]->addr == reinterpret_cast<uint64_t>(m->addr)) fibers[i]->state = State::Runnable;
}

// One arrival on m; false with `err` set when the phase has had all its arrivals already.
inline bool mbarrier_arrive_on(Launch* L, Mbarrier* m, char* err, size_t cap) {
    if (m->pending == 0) {
        snprintf(err, cap, "an arrival beyond the count: phase %u has had all %u arrivals (mbarrier_init at %s:%d) and waits for %lld transaction bytes", m->phase, m->count,
                 base_name(m->file), m->line, m->tx);
        return false;
    }
    if (--m->pending == 0 && m->tx == 0) mbarrier_complete_phase(L, m);
    return true;
}

// complete_tx of `bytes` on m (a TMA load that landed); false with `err` set when the phase has
// all its arrivals and expects fewer bytes (its arrive_expect_tx announced too few).
inline bool mbarrier_complete_tx(Launch* L, Mbarrier* m, unsigned bytes, char* err, size_t cap) {
    if (m->pending == 0 && m->tx < (long long)bytes) {
        snprintf(err, cap, "complete_tx of %u bytes, but phase %u has all its arrivals and expects only %lld more transaction bytes (arrive_expect_tx announced fewer bytes than the copies bring)",
                 bytes, m->phase, m->tx);
        return false;
    }
    m->tx -= bytes;
    if (m->pending == 0 && m->tx == 0) mbarrier_complete_phase(L, m);
    return true;
}

inline void mbarrier_init(unsigned long long* bar, unsigned count, const char* file, int line) {
    Fiber* f = self();
    Launch* L = f->launch;
    const long long off = shared_offset(L, f->cta, bar, 8);
    if (off < 0) thread_error(f, "mbarrier_init at %s:%d: %p is not in this CTA's shared memory", base_name(file), line, (void*)bar);
    if (off % 8 != 0) thread_error(f, "mbarrier_init at %s:%d: shared+0x%llx is not 8-byte aligned", base_name(file), line, off);
    if (count == 0 || count >= (1u << 20)) thread_error(f, "mbarrier_init at %s:%d: count %u is not in 1..2^20-1", base_name(file), line, count);
    Mbarrier* m = find_mbarrier(L, f->cta, bar);
    if (m) {
        unsigned waiters = 0, ops = 0;
        Fiber** fibers = L->fibers + (size_t)f->cta * L->nthreads;
        for (unsigned i = 0; i < L->nthreads; ++i) waiters += fibers[i]->state == State::AtMbarrier && fibers[i]->addr == reinterpret_cast<uint64_t>(bar);
        for (unsigned i = 0; i < L->nasync; ++i) ops += L->async[i].cta == f->cta && L->async[i].bar == reinterpret_cast<unsigned char*>(bar);
        if (m->pending != m->count || m->tx != 0 || waiters || ops)
            thread_error(f, "mbarrier_init at %s:%d: the mbarrier at shared+0x%llx is re-initialised while in use (phase %u: %u of %u arrivals and %lld transaction bytes pending, %u waiting threads, %u copies or arrivals in flight; first init at %s:%d)",
                         base_name(file), line, off, m->phase, m->pending, m->count, m->tx, waiters, ops, base_name(m->file), m->line);
    } else {
        if (L->nmbars == L->mbars_cap) {
            L->mbars_cap = L->mbars_cap ? 2 * L->mbars_cap : 16;
            L->mbars = static_cast<Mbarrier*>(realloc(L->mbars, L->mbars_cap * sizeof(Mbarrier)));
            if (!L->mbars) abort();
        }
        m = &L->mbars[L->nmbars++];
    }
    *m = Mbarrier{reinterpret_cast<unsigned char*>(bar), f->cta, count, count, 0, 0, file, line, f, f->block_syncs, UINT_MAX};
    *bar = kMbarrierTag;
}

inline void mbarrier_arrive(unsigned long long* bar, unsigned tx_bytes, bool expect_tx, const char* file, int line) {
    Fiber* f = self();
    const char* what = expect_tx ? "mbarrier_arrive_expect_tx" : "mbarrier_arrive";
    Mbarrier* m = mbarrier_of(f, bar, what, file, line);
    if (expect_tx) {
        if (tx_bytes >= (1u << 20)) thread_error(f, "%s at %s:%d: %u transaction bytes is more than the 2^20-1 a phase can expect", what, base_name(file), line, tx_bytes);
        m->tx += tx_bytes;
    }
    char err[512];
    if (!mbarrier_arrive_on(f->launch, m, err, sizeof err)) thread_error(f, "%s at %s:%d: mbarrier at shared+0x%llx: %s", what, base_name(file), line, shared_offset(f->launch, f->cta, bar, 8), err);
}

// mbarrier.try_wait.parity: true at once when the phase of that parity has completed (the
// current phase has the other parity); otherwise the thread waits here, a scheduling point, until
// it completes, and then gets true. (The GPU may also return false after a time limit; the
// emulator never does, so a kernel that needs a false to make progress deadlocks here.)
inline bool mbarrier_try_wait(unsigned long long* bar, unsigned parity, const char* file, int line) {
    Fiber* f = self();
    Mbarrier* m = mbarrier_of(f, bar, "mbarrier_try_wait", file, line);
    if ((m->phase & 1u) != (parity & 1u)) return true;
    f->addr = reinterpret_cast<uint64_t>(bar);
    f->in[0] = parity & 1u;
    wait_at(f, State::AtMbarrier, OpMbarrierWait, 0, 0, file, line);
    return true;
}

inline AsyncOp* new_async(Launch* L) {
    if (L->nasync == L->async_cap) {
        L->async_cap = L->async_cap ? 2 * L->async_cap : 16;
        L->async = static_cast<AsyncOp*>(realloc(L->async, L->async_cap * sizeof(AsyncOp)));
        if (!L->async) abort();
    }
    AsyncOp* op = &L->async[L->nasync++];
    memset(op, 0, sizeof *op);
    return op;
}

// cp.async.mbarrier.arrive.noinc: one of the barrier's arrivals, made once every cp.async this
// thread issued before has landed (at a scheduling point the schedule picks).
inline void cp_async_mbarrier_arrive(unsigned long long* bar, const char* file, int line) {
    Fiber* f = self();
    mbarrier_of(f, bar, "cp_async_mbarrier_arrive", file, line);
    AsyncOp* op = new_async(f->launch);
    op->kind = AsyncCpArrive;
    op->cta = f->cta;
    op->f = f;
    op->seq = f->copy_seq;
    op->bar = reinterpret_cast<unsigned char*>(bar);
    op->file = file;
    op->line = line;
}

// Lands the oldest `k` pending cp.async copies of f (the hardware may write them any time
// before the wait); committed groups whose copies have all landed are complete.
inline void land_copies(Fiber* f, unsigned k) {
    if (k > f->ncopies) k = f->ncopies;
    for (unsigned i = 0; i < k; ++i) memcpy(f->copies[i].dst, f->copies[i].data, f->copies[i].size);
    memmove(f->copies, f->copies + k, (f->ncopies - k) * sizeof(PendingCopy));
    f->ncopies -= k;
    unsigned done = 0;
    while (done < f->ngroups && f->group_end[done] <= k) ++done;
    for (unsigned g = done; g < f->ngroups; ++g) f->group_end[g - done] = f->group_end[g] - k;
    f->ngroups -= done;
}

// ---- TMA (cp.async.bulk.tensor 2D and 4D) --------------------------------------------------------
// The emulator's TensorMap (128 bytes; opaque on the GPU, where cuTensorMapEncodeTiled fills it):
// 16 u64 words, built on the host by kernels::emulate::TensorMap::emulated (kernels/src/emulate.rs,
// which documents the same layout):
//   [0] kTensorMapMagic   [1] global address of element (0, 0, 0, 0)   [2] element size in bytes
//   [3] dim 0 (inner, elements)   [4] dim 1   [5] dim 1's stride in bytes
//   [6] box dim 0   [7] box dim 1   [8] swizzle span in bytes: 0, 32, 64 or 128
//   [9] rank (2..4)   [10] dim 2   [11] its stride   [12] dim 3   [13] its stride
//   [14] box dim 2   [15] box dim 3 (dims and boxes past the rank are 1).
// Out-of-range elements of a load are zero-filled; a store skips them. A copy's instruction has
// the map's rank (tma_load_2d takes rank-2 maps, tma_load_4d rank-4 ones).
constexpr uint64_t kTensorMapMagic = 0x3244706d54656d75ull;  // "umeTmp2D"

// Checks map (as copied at the issue) and the shared-memory box at smem; the box's offset in the
// shared window in `off`. An error names `what` at file:line.
inline uint64_t tma_box_bytes(const uint64_t* map) { return map[6] * map[7] * map[14] * map[15] * map[2]; }
inline void tma_check(Fiber* f, const uint64_t* map, const void* smem, unsigned rank, const char* what, const char* file, int line, long long& off) {
    if (map[0] != kTensorMapMagic)
        thread_error(f, "%s at %s:%d: the TensorMap is not an emulator tensor map (word 0 is 0x%016llx; build it with kernels::emulate::TensorMap::emulated)", what, base_name(file), line,
                     (unsigned long long)map[0]);
    if (map[9] != rank) thread_error(f, "%s at %s:%d: the TensorMap has rank %llu, the copy %u dimensions", what, base_name(file), line, (unsigned long long)map[9], rank);
    for (int k = 0; k < 2; ++k) {
        const uint64_t dim = map[10 + 2 * k], st = map[11 + 2 * k], bx = map[14 + k];
        const bool used = rank > 2u + k;
        if (dim == 0 || bx == 0 || bx > 256 || (!used && (dim != 1 || bx != 1)) || (used && (st % 16 || st < map[3] * map[2])))
            thread_error(f, "%s at %s:%d: TensorMap dimension %d (%llu entries, stride %llu bytes, box %llu) breaks TMA's rules (16-byte multiple strides of at least an inner row, boxes 1..256, 1 past the rank)",
                         what, base_name(file), line, 2 + k, (unsigned long long)dim, (unsigned long long)st, (unsigned long long)bx);
    }
    const uint64_t esize = map[2], cols = map[3], rows = map[4], stride = map[5], bc = map[6], br = map[7], swz = map[8];
    if (esize != 1 && esize != 2 && esize != 4 && esize != 8) thread_error(f, "%s at %s:%d: TensorMap element size %llu is not 1, 2, 4 or 8", what, base_name(file), line, (unsigned long long)esize);
    if (map[1] % 16 || stride % 16 || cols == 0 || rows == 0 || stride < cols * esize)
        thread_error(f, "%s at %s:%d: TensorMap global layout (address 0x%llx, %llu x %llu, row stride %llu bytes) breaks TMA's rules (16-byte aligned address and stride, stride >= a row)", what,
                     base_name(file), line, (unsigned long long)map[1], (unsigned long long)rows, (unsigned long long)cols, (unsigned long long)stride);
    if (bc == 0 || br == 0 || bc > 256 || br > 256 || (bc * esize) % 16)
        thread_error(f, "%s at %s:%d: TensorMap box %llu x %llu: each dimension 1..256 and the inner one a multiple of 16 bytes", what, base_name(file), line, (unsigned long long)br,
                     (unsigned long long)bc);
    if (swz != 0 && swz != 32 && swz != 64 && swz != 128) thread_error(f, "%s at %s:%d: TensorMap swizzle %llu is not 0, 32, 64 or 128 bytes", what, base_name(file), line, (unsigned long long)swz);
    if (swz && bc * esize != swz)
        thread_error(f, "%s at %s:%d: with the %lluB swizzle the box's inner dimension must be %llu bytes, not %llu", what, base_name(file), line, (unsigned long long)swz,
                     (unsigned long long)swz, (unsigned long long)(bc * esize));
    const uint64_t bytes = tma_box_bytes(map);
    off = shared_offset(f->launch, f->cta, smem, bytes);
    if (off < 0) thread_error(f, "%s at %s:%d: the %llu-byte box at %p is not inside this CTA's shared memory", what, base_name(file), line, (unsigned long long)bytes, smem);
    const long long align = swz == 128 ? 1024 : 128;
    if (off % align != 0)
        thread_error(f, "%s at %s:%d: the shared-memory box at shared+0x%llx is not %lld-byte aligned%s", what, base_name(file), line, off, align, swz == 128 ? " (128B swizzle)" : "");
}

// The host address of byte `o` (row-major, unswizzled) of the box at `smem` (window offset `off`),
// after the swizzle (on the absolute window offset, as the wgmma descriptors read it).
inline unsigned char* tma_smem_byte(unsigned char* smem, long long off, uint64_t swz, uint64_t o) {
    const uint64_t w = (uint64_t)off + o, mask = swz == 128 ? 0x70 : swz == 64 ? 0x30 : swz == 32 ? 0x10 : 0;
    return smem + ((w ^ ((w >> 3) & mask)) - (uint64_t)off);
}

// A TMA copy in flight issued by f: the box `smem` of CTA `cta` at coordinates `at` of `map` (as
// at the issue), its mbarrier `bar` (loads).
inline AsyncOp* new_tma(Fiber* f, int kind, unsigned cta, void* smem, void* bar, const uint64_t* map, const int (&at)[4], const char* file, int line) {
    AsyncOp* op = new_async(f->launch);
    op->kind = kind;
    op->cta = cta;
    op->f = f;
    op->smem = static_cast<unsigned char*>(smem);
    op->bar = static_cast<unsigned char*>(bar);
    memcpy(op->map, map, sizeof op->map);
    op->x = at[0];
    op->y = at[1];
    op->z = at[2];
    op->w = at[3];
    op->file = file;
    op->line = line;
    return op;
}

// A rank-`rank` TMA load of the box at (x, y, z, w) (tma_load_2d / tma_load_4d).
inline void tma_load(void* dst, const TensorMap* map_p, unsigned rank, int x, int y, int z, int w, unsigned long long* bar, const char* what, const char* file, int line) {
    Fiber* f = self();
    const uint64_t* map = reinterpret_cast<const uint64_t*>(map_p);
    long long off;
    tma_check(f, map, dst, rank, what, file, line, off);
    mbarrier_of(f, bar, what, file, line);
    new_tma(f, AsyncTmaLoad, f->cta, dst, bar, map, {x, y, z, w}, file, line);
    // Undefined until the copy lands: 0xff bytes (NaN), as a cp.async destination.
    memset(dst, 0xff, tma_box_bytes(map));
}
inline void tma_load_2d(void* dst, const TensorMap* map, int x, int y, unsigned long long* bar, const char* file, int line) { tma_load(dst, map, 2, x, y, 0, 0, bar, "tma_load_2d", file, line); }
inline void tma_load_4d(void* dst, const TensorMap* map, int x, int y, int z, int w, unsigned long long* bar, const char* file, int line) {
    tma_load(dst, map, 4, x, y, z, w, bar, "tma_load_4d", file, line);
}

inline void tma_store_2d(const TensorMap* map_p, int x, int y, const void* src, const char* file, int line) {
    Fiber* f = self();
    const uint64_t* map = reinterpret_cast<const uint64_t*>(map_p);
    long long off;
    tma_check(f, map, src, 2, "tma_store_2d", file, line, off);
    AsyncOp* op = new_tma(f, AsyncTmaStore, f->cta, const_cast<void*>(src), nullptr, map, {x, y, 0, 0}, file, line);
    op->seq = f->bulk_groups;  // the bulk group it joins at the next commit
}

// ---- thread-block clusters: remote mbarrier arrivals and TMA multicast (pipeline.cuh) -------------
// fence.mbarrier_init.release.cluster: the mbarriers this thread has initialised become visible
// to the other CTAs of the cluster after its next cluster barrier (recorded per mbarrier; local
// uses still need the __syncthreads or cluster barrier after the init, as before).
inline void fence_mbarrier_init() {
    Fiber* f = self();
    Launch* L = f->launch;
    for (unsigned i = 0; i < L->nmbars; ++i)
        if (L->mbars[i].init_fiber == f && L->mbars[i].fence_arrives == UINT_MAX) L->mbars[i].fence_arrives = f->arrives;
}

// mapa: the bytes [p, p + size) of this CTA's (`from`) shared memory at the same offset in cluster
// CTA `rank`. Returns the address the emulator keys them by (mbarriers, TMA boxes: the CTA's own
// buffer for dynamic shared memory; the TLS address for static shared memory, whose CTA copy is
// made live before use), with where the bytes are now in `now` and the window offset in `off`;
// null when p is not in this CTA's shared memory.
inline unsigned char* cluster_shared(Launch* L, unsigned from, const void* p, size_t size, unsigned rank, unsigned char** now, long long* off) {
    unsigned char* a = const_cast<unsigned char*>(static_cast<const unsigned char*>(p));
    *off = shared_offset(L, from, p, size);
    if (*off < 0) return nullptr;
    if (L->tls_size && a >= L->tls_base && a + size <= L->tls_base + L->tls_size) {
        *now = static_shared_of(L, rank) + (a - L->tls_base);
        return a;
    }
    *now = L->dyn_shared[rank] + (a - L->dyn_shared[from]);
    return *now;
}

// The mbarrier at bar's offset (bar: this CTA's address) in cluster CTA `rank`, for `what` at
// file:line; this CTA's own through mbarrier_of. For another CTA's: an error when rank is outside
// the cluster, that CTA has exited, there is no initialised mbarrier there, or its init is not
// visible to this thread (no fence_mbarrier_init after it, or no cluster barrier since).
inline Mbarrier* cluster_mbarrier_of(Fiber* f, const void* bar, unsigned rank, const char* what, const char* file, int line) {
    Launch* L = f->launch;
    if (rank >= L->ncta) thread_error(f, "%s at %s:%d: CTA rank %u, but the cluster has %u CTAs", what, base_name(file), line, rank, L->ncta);
    if (rank == f->cta) return mbarrier_of(f, bar, what, file, line);
    unsigned char* now;
    long long off;
    unsigned char* key = cluster_shared(L, f->cta, bar, 8, rank, &now, &off);
    if (!key) thread_error(f, "%s at %s:%d: %p is not in this CTA's shared memory (the remote mbarrier is named by its offset in this CTA's shared memory, as mapa maps it)", what, base_name(file), line, bar);
    if (off % 8 != 0) thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx is not 8-byte aligned", what, base_name(file), line, off);
    if (L->exited[rank] == L->nthreads)
        thread_error(f, "%s at %s:%d: CTA %u of the cluster has exited: its shared memory (the mbarrier at shared+0x%llx) is gone (a cluster barrier before its exit is missing)", what, base_name(file), line,
                     rank, off);
    Mbarrier* m = find_mbarrier(L, rank, key);
    if (!m) thread_error(f, "%s at %s:%d: shared+0x%llx of CTA %u is not an initialised mbarrier", what, base_name(file), line, off, rank);
    if (m->fence_arrives == UINT_MAX)
        thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx of CTA %u (mbarrier_init at %s:%d) is used from CTA %u, but its initialising thread has not run fence_mbarrier_init since the init (not visible to the cluster)",
                     what, base_name(file), line, off, rank, base_name(m->file), m->line, f->cta);
    if (f->waits <= m->fence_arrives)
        thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx of CTA %u (mbarrier_init at %s:%d) is used from CTA %u without a cluster barrier since its init and fence_mbarrier_init (the init may not be visible yet)",
                     what, base_name(file), line, off, rank, base_name(m->file), m->line, f->cta);
    uint64_t v;
    memcpy(&v, now, 8);
    if (v != kMbarrierTag)
        thread_error(f, "%s at %s:%d: the mbarrier at shared+0x%llx of CTA %u (mbarrier_init at %s:%d) was overwritten by a plain store (or a copy) since its init", what, base_name(file), line, off, rank,
                     base_name(m->file), m->line);
    return m;
}

// mapa + mbarrier.arrive.release.cluster.shared::cluster: one arrival on the mbarrier at bar's
// offset in cluster CTA `rank` (waking that CTA's waiters when it completes the phase).
inline void mbarrier_arrive_cluster(unsigned long long* bar, unsigned rank, const char* file, int line) {
    Fiber* f = self();
    Mbarrier* m = cluster_mbarrier_of(f, bar, rank, "mbarrier_arrive_cluster", file, line);
    char err[512];
    if (!mbarrier_arrive_on(f->launch, m, err, sizeof err))
        thread_error(f, "mbarrier_arrive_cluster at %s:%d: mbarrier at shared+0x%llx of CTA %u: %s", base_name(file), line, shared_offset(f->launch, f->cta, bar, 8), rank, err);
}

// cp.async.bulk.tensor.2d ... .multicast::cluster: the box to dst's offset in every CTA of `mask`
// (bit r: rank r), each copy completing the box's bytes on the mbarrier at bar's offset in its
// CTA. One asynchronous operation per destination (they land independently); each destination
// holds 0xff bytes until its copy lands.
inline void tma_load_2d_multicast(void* dst, const TensorMap* map_p, int x, int y, unsigned long long* bar, unsigned mask, const char* file, int line) {
    Fiber* f = self();
    Launch* L = f->launch;
    const uint64_t* map = reinterpret_cast<const uint64_t*>(map_p);
    long long off;
    tma_check(f, map, dst, 2, "tma_load_2d_multicast", file, line, off);
    if (mask == 0 || mask > 0xffffu) thread_error(f, "tma_load_2d_multicast at %s:%d: CTA mask 0x%x names no CTA or is wider than 16 bits", base_name(file), line, mask);
    for (unsigned r = L->ncta; r < 16; ++r)
        if (mask >> r & 1u) thread_error(f, "tma_load_2d_multicast at %s:%d: CTA mask 0x%04x names CTA %u, but the cluster has %u CTAs", base_name(file), line, mask, r, L->ncta);
    for (unsigned r = 0; r < L->ncta; ++r)
        if (mask >> r & 1u) cluster_mbarrier_of(f, bar, r, "tma_load_2d_multicast", file, line);
    const uint64_t bytes = tma_box_bytes(map);
    for (unsigned r = 0; r < L->ncta; ++r) {
        if (!(mask >> r & 1u)) continue;
        unsigned char *now, *bar_now;
        long long o;
        unsigned char* box = cluster_shared(L, f->cta, dst, bytes, r, &now, &o);
        unsigned char* bar_key = cluster_shared(L, f->cta, bar, 8, r, &bar_now, &o);
        new_tma(f, AsyncTmaLoad, r, box, bar_key, map, {x, y, 0, 0}, file, line)->mask = mask;
        memset(now, 0xff, bytes);
    }
}

// A TMA copy lands: a load writes the box (zero outside the tensor) and completes its bytes on
// the mbarrier; a store reads the box from shared memory now and writes the elements inside the
// tensor.
inline bool deliver_tma(Launch* L, const AsyncOp& op) {
    const char* what = op.mask ? "tma_load_2d_multicast" : op.map[9] == 4 ? "tma_load_4d" : "tma_load_2d";
    if (op.kind == AsyncTmaLoad && L->ncta > 1 && L->exited[op.cta] == L->nthreads) {
        set_error(L, "thread (%u,%u,%u) of CTA %u: %s (%s:%d) of the box at (x %d, y %d) lands in CTA %u, which has exited: its shared memory is gone (a cluster barrier before its exit is missing)",
                  op.f->tid.x, op.f->tid.y, op.f->tid.z, op.f->cta, what, base_name(op.file), op.line, op.x, op.y, op.cta);
        return false;
    }
    const uint64_t* map = op.map;
    const uint64_t esize = map[2], swz = map[8], bytes = tma_box_bytes(map);
    const long long off = shared_offset(L, op.cta, op.smem, bytes);
    unsigned char* global = reinterpret_cast<unsigned char*>(map[1]);
    // Dimension k: size, stride in bytes (dim 0: the element), box, the copy's coordinate.
    const uint64_t dim[4] = {map[3], map[4], map[10], map[12]}, stride[4] = {esize, map[5], map[11], map[13]}, box[4] = {map[6], map[7], map[14], map[15]};
    const long long at[4] = {op.x, op.y, op.z, op.w};
    for (uint64_t e = 0; e < bytes / esize; ++e) {
        // Element e of the dense box (dim 0 fastest).
        bool inside = true;
        uint64_t g = 0, rest = e;
        for (int k = 0; k < 4; ++k) {
            const long long c = at[k] + (long long)(rest % box[k]);
            rest /= box[k];
            inside = inside && c >= 0 && (uint64_t)c < dim[k];
            g += inside ? (uint64_t)c * stride[k] : 0;
        }
        unsigned char* s = tma_smem_byte(op.smem, off, swz, e * esize);
        if (op.kind == AsyncTmaLoad) {
            if (inside) memcpy(s, global + g, esize);
            else memset(s, 0, esize);
        } else if (inside) {
            memcpy(global + g, s, esize);
        }
    }
    if (op.kind == AsyncTmaStore) return true;
    Mbarrier* m = find_mbarrier(L, op.cta, op.bar);
    char err[512];
    uint64_t tag = 0;
    if (m) memcpy(&tag, op.bar, 8);
    if (!m) snprintf(err, sizeof err, "the mbarrier is no longer initialised");
    else if (tag != kMbarrierTag) snprintf(err, sizeof err, "the mbarrier (mbarrier_init at %s:%d) was overwritten since its init", base_name(m->file), m->line);
    if (!m || tag != kMbarrierTag || !mbarrier_complete_tx(L, m, (unsigned)bytes, err, sizeof err)) {
        set_error(L, "thread (%u,%u,%u): %s (%s:%d) of the box at (x %d, y %d) on the mbarrier at shared+0x%llx of CTA %u: %s", op.f->tid.x, op.f->tid.y, op.f->tid.z, what, base_name(op.file),
                  op.line, op.x, op.y, shared_offset(L, op.cta, op.bar, 8), op.cta, err);
        return false;
    }
    return true;
}

inline bool deliver_async(Launch* L, unsigned i);

// cp.async.bulk.wait_group.read N (and a thread's exit, n < 0): the thread's TMA stores of all but
// the newest N committed bulk groups (all of them at exit) have read their source now.
inline void tma_store_wait(int n) {
    Fiber* f = self();
    Launch* L = f->launch;
    for (unsigned i = 0; i < L->nasync;) {
        const AsyncOp& op = L->async[i];
        if (op.kind == AsyncTmaStore && op.f == f && (n < 0 || op.seq + (uint64_t)n < f->bulk_groups)) {
            if (!deliver_async(L, i)) {
                leave_fiber(f);
                __builtin_trap();  // never resumed: the launch failed
            }
        } else {
            ++i;
        }
    }
    make_live(L, f->cta);
}

// Completes the asynchronous operation L->async[i] (removing it). False with the launch error set
// on a fault. Leaves op.cta's static shared memory live.
inline bool deliver_async(Launch* L, unsigned i) {
    const AsyncOp op = L->async[i];
    memmove(L->async + i, L->async + i + 1, (L->nasync - i - 1) * sizeof(AsyncOp));
    L->nasync--;
    make_live(L, op.cta);
    if (op.kind != AsyncCpArrive) return deliver_tma(L, op);
    Fiber* f = op.f;
    const uint64_t first = f->copy_seq - f->ncopies;  // the sequence number of its oldest pending copy
    if (op.seq > first) land_copies(f, (unsigned)(op.seq - first));
    Mbarrier* m = find_mbarrier(L, op.cta, op.bar);
    char err[512];
    if (!m) snprintf(err, sizeof err, "the mbarrier is no longer initialised");
    if (!m || !mbarrier_arrive_on(L, m, err, sizeof err)) {
        set_error(L, "thread (%u,%u,%u): cp_async_mbarrier_arrive (%s:%d) on the mbarrier at shared+0x%llx: %s", f->tid.x, f->tid.y, f->tid.z, base_name(op.file), op.line,
                  shared_offset(L, op.cta, op.bar, 8), err);
        return false;
    }
    return true;
}

// Completes the pending asynchronous operations: all of them in issue order, or (random schedule)
// one picked by the generator. False on a fault.
inline uint64_t next_random(Launch* L);
inline bool deliver_pending(Launch* L, bool all) {
    if (!all && L->nasync) return deliver_async(L, (unsigned)(next_random(L) % L->nasync));
    while (L->nasync)
        if (!deliver_async(L, 0)) return false;
    return true;
}

// ---- the scheduler -------------------------------------------------------------------------------
inline void fiber_main() {
    Fiber* f = self();
    Launch* L = f->launch;
    if (L->thread_fn(L->ctx, L->kernel_fn) != 0) {
        L->callback_panicked = true;
        set_error(L, "thread (%u,%u,%u): the launch callback panicked", f->tid.x, f->tid.y, f->tid.z);
    }
    // Copies still in flight at exit land (the GPU completes them too), TMA stores included.
    retire_copies(f, -1);
    if (!L->failed) tma_store_wait(-1);
    f->state = State::Exited;
    // A CTA's shared memory ends with its last thread: later reads from other CTAs of the
    // cluster see 0xff bytes (a missing cluster barrier before exit shows).
    if (++L->exited[f->cta] == L->nthreads && L->ncta > 1) {
        memset(static_shared_of(L, f->cta), 0xff, L->tls_size);
        if (L->dyn_bytes) memset(L->dyn_shared[f->cta], 0xff, L->dyn_bytes);
    }
    leave_fiber(f);
    __builtin_trap();  // an exited thread is never resumed
}

inline const char* op_name(int op, int sub) {
    switch (op) {
    case OpSyncThreads:
        return sub == BarrierCount ? "__syncthreads_count" : sub == BarrierAnd ? "__syncthreads_and" : sub == BarrierOr ? "__syncthreads_or" : "__syncthreads";
    case OpSyncWarp: return "__syncwarp";
    case OpShfl: return sub == ShflIdx ? "__shfl_sync" : sub == ShflUp ? "__shfl_up_sync" : sub == ShflDown ? "__shfl_down_sync" : "__shfl_xor_sync";
    case OpVote: return sub == VoteBallot ? "__ballot_sync" : sub == VoteAny ? "__any_sync" : sub == VoteAll ? "__all_sync" : "__uni_sync";
    case OpReduce: return "__reduce_*_sync";
    case OpClusterWait: return "cluster_wait";
    case OpNamedBarrier: return sub == NamedSync ? "named_barrier_sync" : "named_barrier_arrive";
    case OpMbarrierWait: return "mbarrier_try_wait";
    case OpWarpgroup: {
        if ((sub & 7) == 4) return (sub >> 5) & 1 ? "setmaxnreg_inc" : "setmaxnreg_dec";
        static const char* names[] = {"wgmma_fence", "wgmma_commit", "wgmma_wait", "wgmma_ss<bf16>", "wgmma_ss<f16>", "wgmma_rs<bf16>", "wgmma_rs<f16>"};
        const int kind = sub & 7;
        return kind < 3 ? names[kind] : names[3 + ((sub >> 4) & 1) + 2 * ((sub >> 5) & 1)];
    }
    case OpMma: return sub == 0 ? "mma_16816<bf16>" : "mma_16816<f16>";
    case OpLdmatrix: {
        static const char* names[] = {"?", "ldmatrix_x1", "ldmatrix_x2", "?", "ldmatrix_x4"};
        static const char* tnames[] = {"?", "ldmatrix_x1_trans", "ldmatrix_x2_trans", "?", "ldmatrix_x4_trans"};
        return (sub & 16) ? tnames[sub & 7] : names[sub & 7];
    }
    default: return "?";
    }
}

inline bool same_site(const Fiber* a, const Fiber* b) { return a->line == b->line && (a->file == b->file || strcmp(a->file, b->file) == 0); }

// "threads 0-31: waiting at __syncthreads (softmax.cu:40); threads 32-63: exited; ..."
inline void describe_threads(Launch* L, char* out, size_t cap) {
    size_t n = 0;
    int groups = 0;
    auto key_equal = [](const Fiber* a, const Fiber* b) {
        if (a->state != b->state || a->cta != b->cta) return false;
        if (a->state == State::Exited || a->state == State::Runnable) return true;
        if (a->op == OpNamedBarrier && (a->in[0] != b->in[0] || a->in[1] != b->in[1])) return false;
        if (a->op == OpMbarrierWait && (a->addr != b->addr || a->in[0] != b->in[0])) return false;
        return a->op == b->op && a->sub == b->sub && a->mask == b->mask && same_site(a, b);
    };
    for (unsigned i = 0; i < L->total;) {
        unsigned j = i + 1;
        while (j < L->total && key_equal(L->fibers[i], L->fibers[j])) ++j;
        const Fiber* f = L->fibers[i];
        char what[256];
        if (f->state == State::Exited) snprintf(what, sizeof what, "exited");
        else if (f->state == State::Runnable) snprintf(what, sizeof what, "runnable");
        else if (f->state == State::AtBlockBarrier || f->state == State::AtCluster) snprintf(what, sizeof what, "waiting at %s (%s:%d)", op_name(f->op, f->sub), base_name(f->file), f->line);
        else if (f->op == OpNamedBarrier)
            snprintf(what, sizeof what, "waiting at %s(%u, %u) (%s:%d%s)", op_name(f->op, f->sub), f->in[0], f->in[1], base_name(f->file), f->line,
                     f->state == State::AtWarp ? ", for the rest of its warp" : "");
        else if (f->op == OpMbarrierWait)
            snprintf(what, sizeof what, "waiting at mbarrier_try_wait(shared+0x%llx, parity %u) (%s:%d)", shared_offset(L, f->cta, reinterpret_cast<const void*>(f->addr), 8), f->in[0],
                     base_name(f->file), f->line);
        else snprintf(what, sizeof what, "waiting at %s (%s:%d, mask 0x%08x)", op_name(f->op, f->sub), base_name(f->file), f->line, f->mask);
        int w;
        if (++groups > 12) {
            w = snprintf(out + n, cap - n, "; ...");
            n += w > 0 ? (size_t)w : 0;
            break;
        }
        char cta[32] = "";
        if (L->ncta > 1) snprintf(cta, sizeof cta, "CTA %u ", f->cta);
        const unsigned a = i % L->nthreads, b = (j - 1) % L->nthreads;
        if (j - i == 1) w = snprintf(out + n, cap - n, "%s%sthread %u: %s", n ? "; " : "", cta, a, what);
        else w = snprintf(out + n, cap - n, "%s%sthreads %u-%u: %s", n ? "; " : "", cta, a, b, what);
        if (w < 0 || (size_t)w >= cap - n) break;
        n += (size_t)w;
        i = j;
    }
}

// The named barriers with arrivals and the mbarriers with waiting threads (after describe_threads
// in deadlock reports): "; named barrier 1 (256 threads): 4 of 8 warps arrived (warps 0x0000000f,
// first at fa.cu:80); mbarrier shared+0x10 (count 1, init at fa.cu:60): phase 0 (parity 0)
// lacks 1 of 1 arrivals and 4096 transaction bytes".
inline void describe_sync_objects(Launch* L, char* out, size_t cap) {
    size_t n = strlen(out);
    for (unsigned r = 0; r < L->ncta; ++r)
        for (unsigned id = 1; id < 16; ++id) {
            const NamedBarrier& B = L->named[r][id];
            if (B.arrivals == 0 || n >= cap) continue;
            char cta[32] = "";
            if (L->ncta > 1) snprintf(cta, sizeof cta, " of CTA %u", r);
            const int w = snprintf(out + n, cap - n, "; named barrier %u%s (%u threads): %u of %u warps arrived (warps 0x%08x, first at %s:%d)", id, cta, B.count, B.arrivals,
                                   B.count / 32, B.warps, base_name(B.file), B.line);
            n += w > 0 ? (size_t)w : 0;
        }
    for (unsigned i = 0; i < L->nmbars && n < cap; ++i) {
        const Mbarrier& m = L->mbars[i];
        unsigned waiters = 0;
        for (unsigned k = 0; k < L->nthreads; ++k) {
            const Fiber* f = L->fibers[(size_t)m.cta * L->nthreads + k];
            waiters += f->state == State::AtMbarrier && f->addr == reinterpret_cast<uint64_t>(m.addr);
        }
        if (!waiters) continue;
        char cta[32] = "";
        if (L->ncta > 1) snprintf(cta, sizeof cta, " of CTA %u", m.cta);
        const int w = snprintf(out + n, cap - n, "; mbarrier shared+0x%llx%s (count %u, init at %s:%d): phase %u (parity %u) lacks %u of %u arrivals and %lld transaction bytes; %u threads wait for it",
                               shared_offset(L, m.cta, m.addr, 8), cta, m.count, base_name(m.file), m.line, m.phase, m.phase & 1u, m.pending, m.count, m.tx, waiters);
        n += w > 0 ? (size_t)w : 0;
    }
}

// Sets the launch error for a state where no thread can proceed.
inline void deadlock_error(Launch* L) {
    char states[6144];
    describe_threads(L, states, sizeof states);
    describe_sync_objects(L, states, sizeof states);
    set_error(L, "deadlock: %s", states);
}

inline uint16_t half_at(uint64_t row_addr, unsigned k) { return reinterpret_cast<const uint16_t*>(row_addr)[k]; }

// Completes a collective whose lanes (mask `m` of warp `w`) all wait at it: computes every lane's
// result from all lanes' inputs. False (with the launch error set) on a fault.
inline bool complete_collective(Launch* L, unsigned w, unsigned m) {
    unsigned nl_unused;
    Fiber** lanes = warp_lanes(L, w, nl_unused);
    make_live(L, lanes[__builtin_ctz(m)]->cta);  // ldmatrix reads this CTA's shared memory
    const Fiber* first = lanes[__builtin_ctz(m)];
    const int op = first->op, sub = first->sub;
    switch (op) {
    case OpSyncWarp: break;
    case OpShfl:
        for (unsigned i = 0; i < 32; ++i) {
            if (!((m >> i) & 1u)) continue;
            Fiber* f = lanes[i];
            const unsigned width = f->in[3], b = f->in[2] & 31u;
            const unsigned segmask = (32u - width) & 31u;
            const unsigned cval = sub == ShflUp ? 0u : 31u;
            const int max_lane = (int)((i & segmask) | (cval & ~segmask)), min_lane = (int)(i & segmask);
            int j;
            bool ok;
            switch (sub) {
            case ShflUp: j = (int)i - (int)b; ok = j >= max_lane; break;
            case ShflDown: j = (int)i + (int)b; ok = j <= max_lane; break;
            case ShflXor: j = (int)(i ^ b); ok = j <= max_lane; break;
            default: j = min_lane | (int)(b & ~segmask); ok = j <= max_lane; break;
            }
            if (!ok) j = (int)i;
            if (!((m >> j) & 1u)) {
                set_error(L, "%s (%s:%d, mask 0x%08x): lane %u of warp %u reads lane %d, which is not in the mask", op_name(op, sub), base_name(f->file), f->line, m, i, w, j);
                return false;
            }
            f->out[0] = lanes[j]->in[0];
            f->out[1] = lanes[j]->in[1];
        }
        break;
    case OpVote: {
        unsigned ballot = 0;
        for (unsigned i = 0; i < 32; ++i)
            if (((m >> i) & 1u) && lanes[i]->in[0]) ballot |= 1u << i;
        const unsigned r = sub == VoteBallot ? ballot : sub == VoteAny ? (ballot != 0) : sub == VoteAll ? (ballot == m) : (ballot == 0 || ballot == m);
        for (unsigned i = 0; i < 32; ++i)
            if ((m >> i) & 1u) lanes[i]->out[0] = r;
        break;
    }
    case OpReduce: {
        unsigned r = sub == ReduceMinU ? 0xffffffffu : sub == ReduceMinI ? 0x7fffffffu : sub == ReduceMaxI ? 0x80000000u : sub == ReduceAnd ? 0xffffffffu : 0u;
        for (unsigned i = 0; i < 32; ++i) {
            if (!((m >> i) & 1u)) continue;
            const unsigned v = lanes[i]->in[0];
            switch (sub) {
            case ReduceAddU: r += v; break;
            case ReduceMinU: r = v < r ? v : r; break;
            case ReduceMaxU: r = v > r ? v : r; break;
            case ReduceMinI: r = (int)v < (int)r ? v : r; break;
            case ReduceMaxI: r = (int)v > (int)r ? v : r; break;
            case ReduceAnd: r &= v; break;
            case ReduceOr: r |= v; break;
            default: r ^= v; break;
            }
        }
        for (unsigned i = 0; i < 32; ++i)
            if ((m >> i) & 1u) lanes[i]->out[0] = r;
        break;
    }
    case OpMma: {
        // Fragments (PTX ISA, mma.m16n8k16 with 16-bit A/B, f32 C/D), lane = 4 g + t.
        float A[16][16], B[16][8], C[16][8];
        auto h = [sub](uint32_t v, int hi) {
            const uint16_t x = (uint16_t)(hi ? v >> 16 : v & 0xffffu);
            return sub == 0 ? bf16_bits_to_f32(x) : f16_bits_to_f32(x);
        };
        for (unsigned l = 0; l < 32; ++l) {
            const uint32_t* in = lanes[l]->in;
            const unsigned g = l >> 2, t = l & 3;
            for (int k = 0; k < 2; ++k) {
                A[g][2 * t + k] = h(in[0], k);
                A[g + 8][2 * t + k] = h(in[1], k);
                A[g][2 * t + 8 + k] = h(in[2], k);
                A[g + 8][2 * t + 8 + k] = h(in[3], k);
                B[2 * t + k][g] = h(in[4], k);
                B[2 * t + 8 + k][g] = h(in[5], k);
            }
            C[g][2 * t] = bits_f32(in[6]);
            C[g][2 * t + 1] = bits_f32(in[7]);
            C[g + 8][2 * t] = bits_f32(in[8]);
            C[g + 8][2 * t + 1] = bits_f32(in[9]);
        }
        // f32 accumulation in k order; products of 16-bit values are exact in f32.
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                float acc = C[i][j];
                for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
                C[i][j] = acc;
            }
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l >> 2, t = l & 3;
            uint32_t* out = lanes[l]->out;
            out[0] = f32_bits(C[g][2 * t]);
            out[1] = f32_bits(C[g][2 * t + 1]);
            out[2] = f32_bits(C[g + 8][2 * t]);
            out[3] = f32_bits(C[g + 8][2 * t + 1]);
        }
        break;
    }
    case OpLdmatrix: {
        // Matrix i's rows 0..7 come from lanes 8i..8i+7 (16 bytes each, 16-byte aligned).
        const unsigned count = sub & 7;
        const bool trans = (sub & 16) != 0;
        uint64_t rows[4][8];
        for (unsigned mi = 0; mi < count; ++mi)
            for (unsigned r = 0; r < 8; ++r) {
                const Fiber* f = lanes[8 * mi + r];
                if (f->addr % 16 != 0 || f->addr == 0) {
                    set_error(L, "%s (%s:%d): row address %p from lane %u is not 16-byte aligned", op_name(op, sub), base_name(f->file), f->line, (void*)f->addr, 8 * mi + r);
                    return false;
                }
                rows[mi][r] = f->addr;
            }
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l >> 2, t = l & 3;
            for (unsigned mi = 0; mi < count; ++mi) {
                uint32_t lo, hi;
                if (trans) {
                    lo = half_at(rows[mi][2 * t], g);
                    hi = half_at(rows[mi][2 * t + 1], g);
                } else {
                    lo = half_at(rows[mi][g], 2 * t);
                    hi = half_at(rows[mi][g], 2 * t + 1);
                }
                lanes[l]->out[mi] = lo | (hi << 16);
            }
        }
        break;
    }
    default: break;
    }
    for (unsigned i = 0; i < 32; ++i)
        if ((m >> i) & 1u) lanes[i]->state = State::Runnable;
    return true;
}

// ---- warpgroup MMA (wgmma, mma.cuh "Hopper warpgroup MMA") -------------------------------------
// wgmma.fence / commit_group / wait_group / mma_async are .sync.aligned over the warpgroup (the
// 128 threads 128 g .. 128 g + 127): each is a rendezvous of all 128 threads at one call site.
// mma_async is asynchronous: at the issue the A registers (wgmma_rs) and the old accumulator
// (scale_d) are captured and every thread's accumulator is filled with kWgmmaPoison (a NaN); the
// product is computed when a wgmma_wait retires its group, reading shared memory then, and
// written into each thread's accumulator array (its address is kept: the array lives on the
// fiber's stack). A wgmma into an accumulator that a pending wgmma also writes (the k steps of
// one tile) takes that one's result as its D, as the hardware chains them.
// sub of OpWarpgroup: kind (bits 0-2) | f16 << 4 | rs << 5 | trans_b << 6 | N << 8.
// WgSetmaxnreg: sub = 4 | inc << 5 | N << 8; nothing to compute (the emulator has no register
// file), but every warp of the warpgroup must execute the same one.
enum WarpgroupKind : int { WgFence = 0, WgCommit = 1, WgWait = 2, WgMma = 3, WgSetmaxnreg = 4 };
constexpr uint32_t kWgmmaPoison = 0x7fc0deadu;

struct WgmmaOp {
    int f16, n;  // n: the N of m64nNk16
    bool rs, trans_b, scale_d;
    uint64_t a_desc, b_desc;
    const char* file;
    int line;
    float* d[128];          // each thread's accumulator array
    uint32_t a[128][4];     // wgmma_rs: each thread's A registers
    // Each thread's D input: 0 = zero (scale_d false), 1 = old[i] (captured, or written by the
    // pending wgmma this one chains onto), and the later pending wgmma that chains onto this
    // one's result for thread i (it gets the result instead of the accumulator).
    unsigned char src[128];
    WgmmaOp* next[128];
    float old[];            // [128][n / 2]
};

inline void reset_warpgroup(WarpgroupState* s) {
    for (unsigned i = 0; i < s->nops; ++i) free(s->ops[i]);
    s->nops = 0;
    s->ngroups = 0;
}

inline void warpgroup_op(int sub, float* d, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, bool scale_d, unsigned wait_n, const char* file, int line) {
    Fiber* f = self();
    f->addr = reinterpret_cast<uint64_t>(d);
    for (int i = 0; i < 4; ++i) f->in[i] = a ? a[i] : 0;
    f->in[4] = scale_d;
    f->in[5] = (uint32_t)a_desc;
    f->in[6] = (uint32_t)(a_desc >> 32);
    f->in[7] = (uint32_t)b_desc;
    f->in[8] = (uint32_t)(b_desc >> 32);
    f->in[9] = wait_n;
    wait_at(f, State::AtWarp, OpWarpgroup, sub, 0xffffffffu, file, line);
}

// The descriptor of a matrix at p in this CTA's shared memory; the start address is p's offset in
// the CTA's shared window (static shared memory at 0, dynamic at L->dyn_window).
inline uint64_t wgmma_desc(const void* p, unsigned lbo, unsigned sbo, unsigned swizzle, const char* file, int line) {
    Fiber* f = self();
    Launch* L = f->launch;
    const unsigned char* a = static_cast<const unsigned char*>(p);
    uint64_t off;
    if (L->tls_size && a >= L->tls_base && a < L->tls_base + L->tls_size) off = (uint64_t)(a - L->tls_base);
    else if (L->dyn_bytes && a >= L->dyn_shared[f->cta] && a < L->dyn_shared[f->cta] + L->dyn_bytes) off = L->dyn_window + (uint64_t)(a - L->dyn_shared[f->cta]);
    else thread_error(f, "wgmma_desc at %s:%d: %p is not in this CTA's shared memory", base_name(file), line, p);
    if (off >= (1u << 18)) thread_error(f, "wgmma_desc at %s:%d: shared-memory offset 0x%llx is past the descriptor's 18-bit address range", base_name(file), line, (unsigned long long)off);
    if (swizzle > 3) thread_error(f, "wgmma_desc at %s:%d: swizzle mode %u is not a WgmmaSwizzle", base_name(file), line, swizzle);
    return (off >> 4) | ((uint64_t)((lbo >> 4) & 0x3fff) << 16) | ((uint64_t)((sbo >> 4) & 0x3fff) << 32) | ((uint64_t)swizzle << 62);
}

// The host address of element (mn, k) (k in 0..15) of the matrix that `desc` describes, by the
// canonical layouts (mma.cuh) and the swizzle on the shared-window offset; null with `err` set
// when the layout is broken or the element lies outside this CTA's shared memory.
inline const uint16_t* wgmma_element(Launch* L, unsigned cta, uint64_t desc, bool mn_major, unsigned mn, unsigned k, char* err, size_t cap) {
    const uint32_t start = (uint32_t)(desc & 0x3fff) << 4, lbo = (uint32_t)((desc >> 16) & 0x3fff) << 4, sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
    const unsigned swz = (unsigned)(desc >> 62), base_offset = (unsigned)((desc >> 49) & 7);
    const uint32_t w = swz == 1 ? 128 : swz == 2 ? 64 : swz == 3 ? 32 : 16;
    if (base_offset != 0) {
        snprintf(err, cap, "descriptor 0x%016llx has base offset %u (the emulator supports 0: atoms aligned to their repeat)", (unsigned long long)desc, base_offset);
        return nullptr;
    }
    uint32_t off;
    if (!mn_major) {
        if (swz == 0) off = start + (mn % 8) * 16 + (mn / 8) * sbo + (k / 8) * lbo + 2 * (k % 8);
        else off = start + (mn % 8) * w + (mn / 8) * sbo + 2 * k;
    } else {
        if (swz == 0) off = start + 2 * (mn % 8) + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo;
        else off = start + 2 * (mn % (w / 2)) + (mn / (w / 2)) * lbo + (k % 8) * w + (k / 8) * sbo;
    }
    if (swz != 0) off ^= (off >> 3) & (swz == 1 ? 0x70u : swz == 2 ? 0x30u : 0x10u);
    if (L->tls_size && off + 2 <= L->tls_size) return reinterpret_cast<const uint16_t*>(static_shared_of(L, cta) + off);
    if (L->dyn_bytes && off >= L->dyn_window && off + 2 <= L->dyn_window + L->dyn_bytes) return reinterpret_cast<const uint16_t*>(L->dyn_shared[cta] + (off - L->dyn_window));
    snprintf(err, cap, "descriptor 0x%016llx: element (%u, k %u) at shared offset 0x%x is outside this CTA's shared memory (static 0x0-0x%zx, dynamic 0x%x-0x%x)",
             (unsigned long long)desc, mn, k, off, L->tls_size, L->dyn_window, L->dyn_window + L->dyn_bytes);
    return nullptr;
}

// The layout checks of a descriptor that covers `extent` MN rows: swizzled atoms (8 rows of W
// bytes) must start at a multiple of 8 W (the swizzle works on the absolute address), their
// strides must keep that, and a K-major k16 slice (32 bytes) must lie inside its W-byte row.
inline bool wgmma_check_desc(uint64_t desc, bool mn_major, unsigned extent, char* err, size_t cap) {
    const uint32_t start = (uint32_t)(desc & 0x3fff) << 4, lbo = (uint32_t)((desc >> 16) & 0x3fff) << 4, sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
    const unsigned swz = (unsigned)(desc >> 62);
    if (swz == 0) return true;
    const uint32_t w = swz == 1 ? 128 : swz == 2 ? 64 : 32, repeat = 8 * w;
    const char* name = swz == 1 ? "128B" : swz == 2 ? "64B" : "32B";
    if ((start - start % w) % repeat != 0) {
        snprintf(err, cap, "%s-swizzled descriptor 0x%016llx: the atom at shared offset 0x%x is not aligned to %u bytes (the swizzle uses the absolute address)", name,
                 (unsigned long long)desc, start - start % w, repeat);
        return false;
    }
    if (!mn_major && start % w + 32 > w) {
        snprintf(err, cap, "%s-swizzled K-major descriptor 0x%016llx: the k16 slice at byte %u of a %u-byte row crosses the row", name, (unsigned long long)desc, start % w, w);
        return false;
    }
    const bool lbo_used = mn_major && extent > w / 2;
    if ((extent > 8 && sbo % repeat != 0 && !mn_major) || (mn_major && sbo % repeat != 0) || (lbo_used && lbo % repeat != 0)) {
        snprintf(err, cap, "%s-swizzled descriptor 0x%016llx: stride byte offsets (LBO %u, SBO %u) must be multiples of %u bytes", name, (unsigned long long)desc, lbo, sbo, repeat);
        return false;
    }
    return true;
}

// Reads operand `desc` (extent x 16) into m[mn * 16 + k]; false with err set on a fault.
inline bool wgmma_read_operand(Launch* L, unsigned cta, uint64_t desc, bool mn_major, unsigned extent, int f16, float* m, char* err, size_t cap) {
    if (!wgmma_check_desc(desc, mn_major, extent, err, cap)) return false;
    for (unsigned r = 0; r < extent; ++r)
        for (unsigned k = 0; k < 16; ++k) {
            const uint16_t* e = wgmma_element(L, cta, desc, mn_major, r, k, err, cap);
            if (!e) return false;
            m[r * 16 + k] = f16 ? f16_bits_to_f32(*e) : bf16_bits_to_f32(*e);
        }
    return true;
}

// Computes a retired wgmma and writes its D (into the accumulators, or into the D input of the
// wgmma that chains onto it).
inline bool wgmma_execute(Launch* L, unsigned cta, WgmmaOp* op) {
    const unsigned n = (unsigned)op->n, nr = n / 2;
    float A[64 * 16], B[256 * 16];  // [row][k], [n][k] (not thread_local: the TLS block is shared memory)
    char err[512];
    if (op->rs) {
        // Warp w's mma.m16n8k16 A fragment of rows 16 w .. 16 w + 15.
        for (unsigned i = 0; i < 128; ++i) {
            const unsigned w = i / 32, g = (i % 32) / 4, t = i % 4, r0 = 16 * w + g;
            for (int h = 0; h < 2; ++h) {
                auto cv = [&](uint32_t v) { const uint16_t x = (uint16_t)(h ? v >> 16 : v & 0xffffu); return op->f16 ? f16_bits_to_f32(x) : bf16_bits_to_f32(x); };
                A[r0 * 16 + 2 * t + h] = cv(op->a[i][0]);
                A[(r0 + 8) * 16 + 2 * t + h] = cv(op->a[i][1]);
                A[r0 * 16 + 2 * t + 8 + h] = cv(op->a[i][2]);
                A[(r0 + 8) * 16 + 2 * t + 8 + h] = cv(op->a[i][3]);
            }
        }
    } else if (!wgmma_read_operand(L, cta, op->a_desc, false, 64, op->f16, A, err, sizeof err)) {
        set_error(L, "%s (%s:%d): A: %s", op_name(OpWarpgroup, WgMma | op->f16 << 4 | op->rs << 5), base_name(op->file), op->line, err);
        return false;
    }
    if (!wgmma_read_operand(L, cta, op->b_desc, op->trans_b, n, op->f16, B, err, sizeof err)) {
        set_error(L, "%s (%s:%d): B: %s", op_name(OpWarpgroup, WgMma | op->f16 << 4 | op->rs << 5), base_name(op->file), op->line, err);
        return false;
    }
    for (unsigned i = 0; i < 128; ++i) {
        const unsigned w = i / 32, g = (i % 32) / 4, t = i % 4;
        float* out = op->next[i] ? op->next[i]->old + (size_t)i * nr : op->d[i];
        const float* c = op->old + (size_t)i * nr;
        for (unsigned j = 0; j < n / 8; ++j)
            for (unsigned q = 0; q < 4; ++q) {
                const unsigned row = 16 * w + g + 8 * (q / 2), col = 8 * j + 2 * t + (q % 2);
                // Products of 16-bit values are exact in f32; f32 accumulation in k order.
                float acc = op->src[i] ? c[4 * j + q] : 0.0f;
                for (unsigned k = 0; k < 16; ++k) acc += A[row * 16 + k] * B[col * 16 + k];
                out[4 * j + q] = acc;
            }
        if (op->next[i]) op->next[i]->src[i] = op->next[i]->scale_d;
    }
    return true;
}

// Completes a warpgroup collective whose 128 threads th[0..127] all wait at it.
inline bool complete_warpgroup(Launch* L, unsigned cta, WarpgroupState* s, Fiber** th) {
    const Fiber* f0 = th[0];
    const int kind = f0->sub & 7;
    const char* what = op_name(OpWarpgroup, f0->sub);
    if (kind == WgCommit) {
        if (s->ngroups == s->groups_cap) {
            s->groups_cap = s->groups_cap ? 2 * s->groups_cap : 8;
            s->group_end = static_cast<unsigned*>(realloc(s->group_end, s->groups_cap * sizeof(unsigned)));
            if (!s->group_end) abort();
        }
        s->group_end[s->ngroups++] = s->nops;
    } else if (kind == WgWait) {
        const unsigned keep = f0->in[9];
        if (s->ngroups > keep) {
            const unsigned groups = s->ngroups - keep, done = s->group_end[groups - 1];
            for (unsigned i = 0; i < done; ++i)
                if (!wgmma_execute(L, cta, s->ops[i])) return false;
            for (unsigned i = 0; i < done; ++i) free(s->ops[i]);
            memmove(s->ops, s->ops + done, (s->nops - done) * sizeof(WgmmaOp*));
            s->nops -= done;
            for (unsigned g = groups; g < s->ngroups; ++g) s->group_end[g - groups] = s->group_end[g] - done;
            s->ngroups -= groups;
        }
    } else if (kind == WgMma) {
        const int n = f0->sub >> 8, nr = n / 2;
        const uint64_t a_desc = f0->in[5] | (uint64_t)f0->in[6] << 32, b_desc = f0->in[7] | (uint64_t)f0->in[8] << 32;
        const bool rs = (f0->sub >> 5) & 1, trans_b = (f0->sub >> 6) & 1;
        for (unsigned i = 1; i < 128; ++i) {
            const Fiber* o = th[i];
            if ((!rs && (o->in[5] != f0->in[5] || o->in[6] != f0->in[6])) || o->in[7] != f0->in[7] || o->in[8] != f0->in[8] || o->in[4] != f0->in[4]) {
                set_error(L, "%s (%s:%d): thread %u of the warpgroup gives other descriptors or scale_d than thread 0 (they must be warpgroup-uniform)", what, base_name(f0->file), f0->line, i);
                return false;
            }
        }
        // Layout and address faults show at the issue (the data is read at the retiring wait).
        char err[512];
        if (!rs && !wgmma_check_desc(a_desc, false, 64, err, sizeof err)) {
            set_error(L, "%s (%s:%d): A: %s", what, base_name(f0->file), f0->line, err);
            return false;
        }
        if (!wgmma_check_desc(b_desc, trans_b, (unsigned)n, err, sizeof err)) {
            set_error(L, "%s (%s:%d): B: %s", what, base_name(f0->file), f0->line, err);
            return false;
        }
        for (unsigned r = 0; r < (unsigned)n; ++r)
            for (unsigned k = 0; k < 16; ++k) {
                const bool a_ok = r >= 64 || rs || wgmma_element(L, cta, a_desc, false, r, k, err, sizeof err);
                if (!a_ok || !wgmma_element(L, cta, b_desc, trans_b, r, k, err, sizeof err)) {
                    set_error(L, "%s (%s:%d): %s: %s", what, base_name(f0->file), f0->line, a_ok ? "B" : "A", err);
                    return false;
                }
            }
        WgmmaOp* op = static_cast<WgmmaOp*>(calloc(1, sizeof(WgmmaOp) + sizeof(float) * 128 * (size_t)nr));
        if (!op) abort();
        op->f16 = (f0->sub >> 4) & 1;
        op->n = n;
        op->rs = rs;
        op->trans_b = trans_b;
        op->a_desc = a_desc;
        op->b_desc = b_desc;
        op->file = f0->file;
        op->line = f0->line;
        const bool scale_d = f0->in[4] != 0;
        op->scale_d = scale_d;
        for (unsigned i = 0; i < 128; ++i) {
            float* d = reinterpret_cast<float*>(th[i]->addr);
            op->d[i] = d;
            for (int q = 0; q < 4; ++q) op->a[i][q] = th[i]->in[q];
            // The latest pending wgmma into the same accumulator: this one chains onto it.
            WgmmaOp* prev = nullptr;
            for (unsigned p = s->nops; p-- > 0;)
                if (s->ops[p]->d[i] == d) {
                    prev = s->ops[p];
                    break;
                }
            if (prev) {
                if (prev->n != n) {
                    set_error(L, "%s (%s:%d): thread %u's accumulator is also that of a pending wgmma with N = %d (%s:%d)", what, base_name(f0->file), f0->line, i, prev->n, base_name(prev->file), prev->line);
                    return false;
                }
                for (int q = 0; q < nr; ++q)
                    if (f32_bits(d[q]) != kWgmmaPoison) {
                        set_error(L, "%s (%s:%d): thread %u's accumulator was written while the wgmma at %s:%d into it is pending (missing wgmma_wait)", what, base_name(f0->file), f0->line, i,
                                  base_name(prev->file), prev->line);
                        return false;
                    }
                // prev's result becomes this one's D input when prev retires (src = scale_d then).
                prev->next[i] = op;
                op->src[i] = 0;
            } else {
                op->src[i] = scale_d;
                if (scale_d) memcpy(op->old + (size_t)i * nr, d, sizeof(float) * nr);
            }
            // Until the wait that retires it, the accumulator is undefined.
            for (int q = 0; q < nr; ++q) d[q] = bits_f32(kWgmmaPoison);
        }
        if (s->nops == s->ops_cap) {
            s->ops_cap = s->ops_cap ? 2 * s->ops_cap : 8;
            s->ops = static_cast<WgmmaOp**>(realloc(s->ops, s->ops_cap * sizeof(WgmmaOp*)));
            if (!s->ops) abort();
        }
        s->ops[s->nops++] = op;
    }
    return true;
}

// Releases the warpgroup collective that the thread `f` of warp `w` waits at, once all 128
// threads of its warpgroup are there. An incomplete warpgroup, an exited thread or threads at
// different warpgroup call sites are errors.
inline bool resolve_warpgroup(Launch* L, unsigned w, const Fiber* f, bool& released) {
    const unsigned cta = w / L->nwarps, group = (w % L->nwarps) / 4;
    const char* what = op_name(f->op, f->sub);
    if (128 * group + 128 > L->nthreads) {
        set_error(L, "%s (%s:%d): warpgroup %u (threads %u-%u) is incomplete: the block has %u threads", what, base_name(f->file), f->line, group, 128 * group, 128 * group + 127, L->nthreads);
        return false;
    }
    Fiber** th = L->fibers + (size_t)cta * L->nthreads + 128 * group;
    bool all_here = true;
    for (unsigned i = 0; i < 128; ++i) {
        const Fiber* o = th[i];
        if (o->state == State::Exited) {
            set_error(L, "%s (%s:%d): thread %u of warpgroup %u has exited, so the warpgroup collective cannot complete", what, base_name(f->file), f->line, 128 * group + i, group);
            return false;
        }
        if (o->state == State::AtWarp && o->op == OpWarpgroup) {
            if (!same_site(o, f) || o->sub != f->sub) {
                set_error(L, "warpgroup %u at different call sites of its .sync.aligned collectives: thread %u at %s (%s:%d), thread %u at %s (%s:%d)", group, f->linear, what,
                          base_name(f->file), f->line, o->linear, op_name(o->op, o->sub), base_name(o->file), o->line);
                return false;
            }
        } else {
            all_here = false;
        }
    }
    if (!all_here) return true;
    make_live(L, cta);  // the wgmma reads this CTA's shared memory
    if (!complete_warpgroup(L, cta, &L->wgs[cta * L->nwg + group], th)) return false;
    for (unsigned i = 0; i < 128; ++i) th[i]->state = State::Runnable;
    released = true;
    return true;
}

// The warp arrival at a named barrier, once every non-exited lane of warp `w` waits at the same
// named_barrier_sync / _arrive (f: one of them): the warp counts 32 threads towards the count
// that the phase's first warp gave (another count is an error); arrive resumes the warp at once,
// sync parks it (AtNamed) until the phase completes, which resumes every parked warp.
inline bool resolve_named_barrier(Launch* L, unsigned w, const Fiber* f, bool& released) {
    unsigned nl;
    Fiber** lanes = warp_lanes(L, w, nl);
    const char* what = op_name(f->op, f->sub);
    for (unsigned j = 0; j < nl; ++j) {
        const Fiber* o = lanes[j];
        if (o->state == State::Exited) continue;
        if (o->state != State::AtWarp || o->op != OpNamedBarrier) return true;  // not all here yet
        if (o->sub != f->sub || o->in[0] != f->in[0] || o->in[1] != f->in[1] || !same_site(o, f)) {
            set_error(L, "warp %u at different named barriers (bar.sync / bar.arrive are .aligned: the whole warp executes one): thread %u at %s(%u, %u) (%s:%d), thread %u at %s(%u, %u) (%s:%d)",
                      w % L->nwarps, f->linear, what, f->in[0], f->in[1], base_name(f->file), f->line, o->linear, op_name(o->op, o->sub), o->in[0], o->in[1], base_name(o->file), o->line);
            return false;
        }
    }
    const unsigned cta = w / L->nwarps, wl = w % L->nwarps, id = f->in[0], count = f->in[1];
    NamedBarrier& B = L->named[cta][id];
    if (B.arrivals == 0) {
        B.count = count;
        B.first_warp = wl;
        B.file = f->file;
        B.line = f->line;
    } else if (B.count != count) {
        set_error(L, "named barrier %u: warp %u arrives at %s (%s:%d) for %u threads, but warp %u arrived at %s:%d for %u threads in the same phase (every participant must give the same count)",
                  id, wl, what, base_name(f->file), f->line, count, B.first_warp, base_name(B.file), B.line, B.count);
        return false;
    }
    B.arrivals++;
    B.warps |= 1u << wl;
    for (unsigned j = 0; j < nl; ++j)
        if (lanes[j]->state != State::Exited) lanes[j]->state = f->sub == NamedSync ? State::AtNamed : State::Runnable;
    if (f->sub == NamedArrive) released = true;
    if (32 * B.arrivals >= B.count) {
        Fiber** fibers = L->fibers + (size_t)cta * L->nthreads;
        for (unsigned i = 0; i < L->nthreads; ++i)
            if (fibers[i]->state == State::AtNamed && fibers[i]->in[0] == id) fibers[i]->state = State::Runnable;
        B = NamedBarrier{};
        released = true;
    }
    return true;
}

// Releases the collectives of warp `w` that every lane of their mask has reached. Sets `released`;
// false (with the launch error set) on an error.
inline bool resolve_warp(Launch* L, unsigned w, bool& released) {
    unsigned nl;
    Fiber** lanes = warp_lanes(L, w, nl);
    bool warpgroup_tried = false, named_tried = false;
    for (unsigned i = 0; i < nl; ++i) {
        Fiber* f = lanes[i];
        if (f->state != State::AtWarp) continue;
        if (f->op == OpNamedBarrier) {
            if (!named_tried && !resolve_named_barrier(L, w, f, released)) return false;
            named_tried = true;
            continue;
        }
        if (f->op == OpWarpgroup) {
            // A warpgroup collective: the 128 threads of the warpgroup, not the lanes of a mask.
            if (!warpgroup_tried && !resolve_warpgroup(L, w, f, released)) return false;
            warpgroup_tried = true;
            continue;
        }
        const unsigned m = f->mask;
        const char* what = op_name(f->op, f->sub);
        if (!((m >> i) & 1u)) {
            set_error(L, "%s (%s:%d): mask 0x%08x of lane %u of warp %u does not include the lane itself", what, base_name(f->file), f->line, m, i, w);
            return false;
        }
        bool all_here = true;
        unsigned arrived = 0;  // the lanes the collective releases
        for (unsigned j = 0; j < 32 && all_here; ++j) {
            if (!((m >> j) & 1u)) continue;
            // __syncwarp waits for the non-exited lanes of its mask only (bar.warp.sync); the
            // data-exchanging collectives need every lane of the mask.
            if (f->op == OpSyncWarp && (j >= nl || lanes[j]->state == State::Exited)) continue;
            if (j >= nl) {
                set_error(L, "%s (%s:%d, mask 0x%08x): lane %u of warp %u does not exist (the block has %u threads)", what, base_name(f->file), f->line, m, j, w, L->nthreads);
                return false;
            }
            const Fiber* o = lanes[j];
            if (o->state == State::Exited) {
                set_error(L, "%s (%s:%d, mask 0x%08x): lane %u of warp %u has exited, so the collective cannot complete", what, base_name(f->file), f->line, m, j, w);
                return false;
            }
            // Shuffles, votes and __syncwarp match by kind and mask (divergent call sites may
            // meet, as on sm_70+); mma and ldmatrix are .aligned: one instruction for all lanes.
            const bool aligned = f->op == OpMma || f->op == OpLdmatrix;
            all_here = o->state == State::AtWarp && o->op == f->op && o->sub == f->sub && o->mask == m && (!aligned || same_site(o, f));
            arrived |= 1u << j;
        }
        if (!all_here) continue;
        if (!complete_collective(L, w, arrived)) return false;
        released = true;
    }
    return true;
}

// Releases the block barrier when every live thread waits at the same one.
inline bool resolve_block_barrier(Launch* L, unsigned cta, bool& released) {
    const Fiber* first = nullptr;
    unsigned count = 0, live = 0;
    Fiber** fibers = L->fibers + (size_t)cta * L->nthreads;
    for (unsigned i = 0; i < L->nthreads; ++i) {
        const Fiber* f = fibers[i];
        if (f->state == State::Exited) continue;
        if (f->state != State::AtBlockBarrier) return true;
        ++live;
        count += f->in[0];
        if (!first) {
            first = f;
        } else if (!same_site(first, f) || first->sub != f->sub) {
            char states[4096];
            describe_threads(L, states, sizeof states);
            describe_sync_objects(L, states, sizeof states);
            set_error(L, "deadlock: threads wait at different block barriers: %s", states);
            return false;
        }
    }
    if (!first) return true;
    const unsigned r = first->sub == BarrierCount ? count : first->sub == BarrierAnd ? (count == live) : first->sub == BarrierOr ? (count != 0) : 0;
    for (unsigned i = 0; i < L->nthreads; ++i) {
        Fiber* f = fibers[i];
        if (f->state == State::AtBlockBarrier) {
            f->out[0] = r;
            f->state = State::Runnable;
            ++f->block_syncs;
        }
    }
    released = true;
    return true;
}

// Releases the threads waiting at the cluster barrier whose arrival every non-exited thread of
// the cluster has matched.
inline void resolve_cluster_barrier(Launch* L, bool& released) {
    unsigned min_arrives = UINT_MAX;
    bool any_waiting = false;
    for (unsigned i = 0; i < L->total; ++i) {
        const Fiber* f = L->fibers[i];
        if (f->state == State::Exited) continue;
        if (f->arrives < min_arrives) min_arrives = f->arrives;
        any_waiting |= f->state == State::AtCluster;
    }
    if (!any_waiting) return;
    for (unsigned i = 0; i < L->total; ++i) {
        Fiber* f = L->fibers[i];
        if (f->state == State::AtCluster && f->waits <= min_arrives) {
            f->state = State::Runnable;
            ++f->block_syncs;
            released = true;
        }
    }
}

// Every CTA's block barrier and the cluster barrier; false on an error.
inline bool resolve_barriers(Launch* L, bool& released) {
    for (unsigned r = 0; r < L->ncta; ++r)
        if (!resolve_block_barrier(L, r, released)) return false;
    resolve_cluster_barrier(L, released);
    return true;
}

// Runs the runnable lanes of warp w once each (lane order, or reversed), each until its next
// synchronisation point or its exit. False when the launch failed.
inline bool run_warp_lanes(Launch* L, unsigned w, bool reverse) {
    unsigned nl;
    Fiber** lanes = warp_lanes(L, w, nl);
    for (unsigned k = 0; k < nl; ++k) {
        Fiber* f = lanes[reverse ? nl - 1 - k : k];
        if (f->state != State::Runnable) continue;
        enter_fiber(L, f);
        if (L->failed) return false;
    }
    return true;
}

// Runs warp w alone for up to `steps` steps (0: no limit), a step being its runnable lanes to
// their next sync point and then its collectives resolved; it stops early when no collective is
// released (every lane waits at a block barrier, has exited, or waits at a collective that other
// lanes cannot reach). False when the launch failed.
inline bool run_warp(Launch* L, unsigned w, bool reverse, unsigned steps) {
    for (unsigned s = 0; steps == 0 || s < steps; ++s) {
        if (!run_warp_lanes(L, w, reverse)) return false;
        bool released = false;
        if (!resolve_warp(L, w, released)) return false;
        if (!released) break;
    }
    return true;
}

// When no thread can run: 0 when every thread has exited, 1 when the block barrier was released,
// -1 on an error (a deadlock, or threads at different barriers; the launch error is set).
inline int release_block_barrier(Launch* L) {
    bool any_live = false;
    for (unsigned i = 0; i < L->total; ++i) any_live |= L->fibers[i]->state != State::Exited;
    if (!any_live) return deliver_pending(L, true) ? 0 : -1;  // loads nobody waits for still land (and fault)
    bool released = false;
    if (!resolve_barriers(L, released)) return -1;
    if (released) return 1;
    // Nothing can run: the copies and arrivals in flight land now (far-apart: as late as possible,
    // all of them in issue order; random: one picked at random).
    if (L->nasync) return deliver_pending(L, L->schedule != ScheduleRandom) ? 1 : -1;
    deadlock_error(L);
    return -1;
}

inline bool run_round_robin(Launch* L) {
    for (;;) {
        bool any_live = false;
        for (unsigned i = 0; i < L->total; ++i) {
            Fiber* f = L->fibers[i];
            if (f->state == State::Runnable) {
                enter_fiber(L, f);
                if (L->failed) return false;
            }
            any_live |= f->state != State::Exited;
        }
        if (!any_live) return deliver_pending(L, true);
        // The copies and arrivals issued in this round land at its end.
        if (!deliver_pending(L, true)) return false;
        bool released = false;
        for (unsigned w = 0; w < L->ncta * L->nwarps; ++w)
            if (!resolve_warp(L, w, released)) return false;
        if (!released && !resolve_barriers(L, released)) return false;
        // Threads that an mbarrier phase resumed (from a thread or a landed copy) run next round.
        for (unsigned i = 0; i < L->total && !released; ++i) released = L->fibers[i]->state == State::Runnable;
        if (!released) {
            deadlock_error(L);
            return false;
        }
    }
}

// A warp that syncs more often than this without reaching a block barrier hands over to the next
// one (and runs on in a later pass): a warp spinning on a flag another warp sets, with warp
// collectives in the loop, then still gets its flag. Real kernels stay far below it.
constexpr unsigned kFarApartMaxSteps = 1u << 16;

// Far-apart over a cluster: one CTA runs as far as it can (its warps far apart, its block
// barriers released as they fill) before the next CTA starts; the CTA order alternates at every
// cluster barrier. Without clusters this is one warp after another within the block.
inline bool run_far_apart(Launch* L, bool forward) {
    bool cta_forward = forward;
    for (;;) {
        for (unsigned k = 0; k < L->ncta; ++k) {
            const unsigned r = cta_forward ? k : L->ncta - 1 - k;
            for (;;) {
                bool runnable = true;
                while (runnable) {
                    for (unsigned j = 0; j < L->nwarps; ++j)
                        if (!run_warp(L, r * L->nwarps + (forward ? j : L->nwarps - 1 - j), !forward, kFarApartMaxSteps)) return false;
                    runnable = false;
                    for (unsigned i = 0; i < L->nthreads && !runnable; ++i) runnable = L->fibers[(size_t)r * L->nthreads + i]->state == State::Runnable;
                }
                bool released = false;
                if (!resolve_block_barrier(L, r, released)) return false;
                if (!released) break;
                forward = !forward;
            }
        }
        // A thread of a CTA whose turn has passed may have been resumed since by a later CTA (an
        // arrival on its mbarrier through mbarrier_arrive_cluster): another pass.
        bool resumed = false;
        for (unsigned i = 0; i < L->total && !resumed; ++i) resumed = L->fibers[i]->state == State::Runnable;
        if (resumed) continue;
        // Every CTA waits at the cluster barrier, a block barrier it cannot pass, or has exited.
        const int r = release_block_barrier(L);
        if (r <= 0) return r == 0;
        cta_forward = !cta_forward;
    }
}

// splitmix64
inline uint64_t next_random(Launch* L) {
    uint64_t z = (L->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

inline bool run_random(Launch* L) {
    for (;;) {
        unsigned ready[16 * 32], n = 0;
        for (unsigned w = 0; w < L->ncta * L->nwarps; ++w) {
            unsigned nl;
            Fiber** lanes = warp_lanes(L, w, nl);
            for (unsigned i = 0; i < nl; ++i)
                if (lanes[i]->state == State::Runnable) {
                    ready[n++] = w;
                    break;
                }
        }
        if (n == 0) {
            const int r = release_block_barrier(L);
            if (r <= 0) return r == 0;
            continue;
        }
        // One in eight picks completes a copy or arrival in flight instead (a random one).
        if (L->nasync && next_random(L) % 8 == 0) {
            if (!deliver_pending(L, false)) return false;
            continue;
        }
        const uint64_t x = next_random(L);
        // Runs of 1 .. 256 steps, log-uniform: both fine interleavings and warps far apart.
        const unsigned w = ready[x % n];
        if (!run_warp(L, w, (x >> 32) & 1, 1u << ((x >> 40) % 9))) return false;
        // A CTA passes its block barrier as soon as it fills (the other CTAs of a cluster need
        // not be there).
        bool released = false;
        if (L->ncta > 1 && !resolve_block_barrier(L, w / L->nwarps, released)) return false;
    }
}

// Runs the cluster whose first CTA is L->block_idx (a cluster of one CTA without clusters).
inline bool run_cluster(Launch* L) {
    const unsigned bx = L->block.x, by = L->block.y, cx = L->cluster.x, cy = L->cluster.y;
    for (unsigned k = 0; k < L->total; ++k) {
        Fiber* f = L->fibers[k];
        const unsigned i = k % L->nthreads, r = k / L->nthreads;
        f->launch = L;
        f->tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
        f->cta = r;
        // %cluster_ctarank: x fastest within the cluster.
        f->block_idx = uint3{L->block_idx.x + r % cx, L->block_idx.y + (r / cx) % cy, L->block_idx.z + r / (cx * cy)};
        f->arrives = 0;
        f->waits = 0;
        f->linear = i;
        f->lane = i & 31;
        f->warp = i >> 5;
        f->state = State::Runnable;
        f->op = OpNone;
        f->ncopies = 0;
        f->ngroups = 0;
        f->copy_seq = 0;
        f->bulk_groups = 0;
        f->block_syncs = 0;
        reset_stack(f);
    }
    // Shared memory starts as 0xff bytes (NaN in f32 / bf16 / f16): reads of never-written
    // shared memory show.
    for (unsigned r = 0; r < L->ncta; ++r) {
        if (L->dyn_bytes) memset(L->dyn_shared[r], 0xff, L->dyn_bytes);
        L->exited[r] = 0;
    }
    if (L->tls_size) {
        memset(L->tls_base, 0xff, L->tls_size);
        memset(L->tls_save, 0xff, L->tls_size * L->ncta);
    }
    L->live_cta = 0;
    for (unsigned g = 0; g < L->ncta * L->nwg; ++g) reset_warpgroup(&L->wgs[g]);
    memset(L->named, 0, sizeof L->named);
    L->nmbars = 0;
    L->nasync = 0;
    switch (L->schedule) {
    case ScheduleFarApart: {
        // Odd clusters (blocks) start in reverse order: both orders even in a kernel without a barrier.
        const uint64_t linear = (((uint64_t)L->block_idx.z / L->cluster.z * (L->grid.y / L->cluster.y) + L->block_idx.y / L->cluster.y) * (L->grid.x / L->cluster.x)) + L->block_idx.x / L->cluster.x;
        return run_far_apart(L, linear % 2 == 0);
    }
    case ScheduleRandom: return run_random(L);
    default: return run_round_robin(L);
    }
}

// Fiber regions of this module, grown on demand and kept for later launches.
struct FiberPool {
    Fiber* fibers[16 * 1024];
    unsigned count;
};
inline FiberPool g_pool;
inline pthread_mutex_t g_launch_mutex = PTHREAD_MUTEX_INITIALIZER;

// Unmaps the fibers when the module is unloaded (tests load and drop modules many times).
__attribute__((destructor)) static void free_fiber_pool() {
    for (unsigned i = 0; i < g_pool.count; ++i) {
        free(g_pool.fibers[i]->copies);
        free(g_pool.fibers[i]->group_end);
        munmap(g_pool.fibers[i], kRegion);
    }
    g_pool.count = 0;
}

inline Fiber* new_fiber() {
    const size_t size = 2 * kRegion;
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(m), base = (start + kRegion - 1) & ~(kRegion - 1);
    if (base > start) munmap(m, base - start);
    if (start + size > base + kRegion) munmap(reinterpret_cast<void*>(base + kRegion), start + size - (base + kRegion));
    // Guard below the stack: an overflow faults instead of overwriting the header.
    mprotect(reinterpret_cast<void*>(base + kHeader), 65536, PROT_NONE);
    Fiber* f = reinterpret_cast<Fiber*>(base);
    memset(f, 0, sizeof(Fiber));
    f->magic = kMagic;
    return f;
}

// Touched before a launch so that this thread has the module's TLS block (static shared memory;
// allocated on first use in modules loaded with dlopen).
inline thread_local volatile unsigned char tls_anchor;

// The calling thread's TLS block of this module and its size (null, 0 when it has none).
struct TlsBlock {
    unsigned char* base;
    size_t size;
};
inline int find_tls_block(dl_phdr_info* info, size_t, void* data) {
    const uintptr_t here = reinterpret_cast<uintptr_t>(&find_tls_block);
    bool ours = false;
    const ElfW(Phdr)* tls = nullptr;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && here >= info->dlpi_addr + ph.p_vaddr && here < info->dlpi_addr + ph.p_vaddr + ph.p_memsz) ours = true;
        if (ph.p_type == PT_TLS) tls = &ph;
    }
    if (!ours) return 0;
    TlsBlock* t = static_cast<TlsBlock*>(data);
    if (tls && info->dlpi_tls_data) {
        t->base = static_cast<unsigned char*>(info->dlpi_tls_data);
        t->size = tls->p_memsz;
    }
    return 1;
}

}  // namespace lookahead_emu

namespace lookahead_emu {
// Calls kernel `f` with the arguments `params` points at, one pointer per parameter (the
// kernelParams of cuLaunchKernel): the emulated CUDA driver (kernels/emu/driver) launches kernels
// through the lookahead_emu_params_NAME entry point the build appends for every kernel.
template <class... A, size_t... I>
void call_with_params(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}
template <class... A>
void call_with_params(void (*f)(A...), void** params) {
    call_with_params(f, params, std::index_sequence_for<A...>{});
}
}  // namespace lookahead_emu

// Runs kernel `kernel_fn` (named `kernel`, for messages) over grid x block threads: every thread
// calls thread_fn(ctx, kernel_fn), which invokes the kernel with its arguments. `cluster` gives
// the thread-block cluster dims ((1,1,1): no clusters); the CTAs of a cluster run together (their
// threads interleaved by the schedule), clusters one after another. `schedule` is a Schedule,
// `seed` the random schedule's seed (ignored by the others). Returns 0 when the launch
// completed, 1 on an error (message in err), 2 when thread_fn reported a failure (a Rust panic:
// the caller resumes it).
extern "C" __attribute__((visibility("default"))) int lookahead_emu_run(const char* kernel, const void* kernel_fn, const unsigned* grid, const unsigned* block,
                                                                        const unsigned* cluster, unsigned shared_bytes, int schedule, uint64_t seed,
                                                                        int (*thread_fn)(void*, const void*), void* ctx, char* err, size_t err_len) {
    using namespace lookahead_emu;
    auto fail = [&](const char* msg) {
        if (err_len) snprintf(err, err_len, "%s", msg);
        return 1;
    };
    char buf[256];
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > 1024) {
        snprintf(buf, sizeof buf, "bad block (%u,%u,%u): each size >= 1, x, y <= 1024, z <= 64, at most 1024 threads", block[0], block[1], block[2]);
        return fail(buf);
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 2147483647u || grid[1] > 65535 || grid[2] > 65535) {
        snprintf(buf, sizeof buf, "bad grid (%u,%u,%u): each size >= 1, x < 2^31, y, z <= 65535", grid[0], grid[1], grid[2]);
        return fail(buf);
    }
    const uint64_t ncta = (uint64_t)cluster[0] * cluster[1] * cluster[2];
    if (cluster[0] == 0 || cluster[1] == 0 || cluster[2] == 0 || ncta > 16 || grid[0] % cluster[0] || grid[1] % cluster[1] || grid[2] % cluster[2]) {
        snprintf(buf, sizeof buf, "bad cluster (%u,%u,%u) for grid (%u,%u,%u): each size >= 1, at most 16 CTAs, the grid a multiple of it", cluster[0], cluster[1],
                 cluster[2], grid[0], grid[1], grid[2]);
        return fail(buf);
    }
    if (schedule != ScheduleRoundRobin && schedule != ScheduleFarApart && schedule != ScheduleRandom) {
        snprintf(buf, sizeof buf, "unknown schedule %d", schedule);
        return fail(buf);
    }
    if (shared_bytes > 227 * 1024) {
        snprintf(buf, sizeof buf, "dynamic shared memory of %u bytes is over the 227 KiB a block can have", shared_bytes);
        return fail(buf);
    }
    pthread_mutex_lock(&g_launch_mutex);
    const unsigned total = (unsigned)(threads * ncta);
    Launch* L = static_cast<Launch*>(calloc(1, sizeof(Launch)));
    Fiber** fibers = static_cast<Fiber**>(calloc(total, sizeof(Fiber*)));
    while (L && fibers && g_pool.count < total) {
        Fiber* f = new_fiber();
        if (!f) break;
        g_pool.fibers[g_pool.count++] = f;
    }
    if (!L || !fibers || g_pool.count < total) {
        pthread_mutex_unlock(&g_launch_mutex);
        free(L);
        free(fibers);
        return fail("out of memory for the emulated threads' stacks");
    }
    for (unsigned i = 0; i < total; ++i) fibers[i] = g_pool.fibers[i];
    L->kernel = kernel;
    L->schedule = schedule;
    L->rng = seed;
    L->grid = uint3{grid[0], grid[1], grid[2]};
    L->block = uint3{block[0], block[1], block[2]};
    L->cluster = uint3{cluster[0], cluster[1], cluster[2]};
    L->nthreads = (unsigned)threads;
    L->nwarps = (L->nthreads + 31) / 32;
    L->ncta = (unsigned)ncta;
    L->total = total;
    L->fibers = fibers;
    L->thread_fn = thread_fn;
    L->ctx = ctx;
    L->kernel_fn = kernel_fn;
    L->dyn_bytes = shared_bytes;
    // Static shared memory: this thread's TLS block of the module, a saved copy per CTA.
    tls_anchor = 0;
    TlsBlock tls{nullptr, 0};
    dl_iterate_phdr(find_tls_block, &tls);
    L->tls_base = tls.base;
    L->tls_size = tls.size;
    L->tls_save = tls.size ? static_cast<unsigned char*>(malloc(tls.size * ncta)) : nullptr;
    // Dynamic shared memory, per CTA, ends at an inaccessible page: an access past the launch's
    // size faults (a crash of the test, not silent corruption). With 0 bytes the pointer is that page.
    // Its base is 1024-byte aligned (as a kernel aligning 128B-swizzled wgmma atoms expects of
    // the shared window): up to 1038 bytes past the launch size may then be accessible.
    const size_t dyn_rounded = (shared_bytes + 15) / 16 * 16, dyn_map = (dyn_rounded + 1024 + 4095) / 4096 * 4096 + 4096;
    void* dyn_region[16] = {};
    L->dyn_window = (unsigned)((tls.size + 1023) / 1024 * 1024);
    L->nwg = (L->nthreads + 127) / 128;
    L->wgs = static_cast<WarpgroupState*>(calloc((size_t)ncta * L->nwg, sizeof(WarpgroupState)));
    bool ok = (tls.size == 0 || L->tls_save) && L->wgs;
    for (unsigned r = 0; r < ncta && ok; ++r) {
        void* m = mmap(nullptr, dyn_map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            ok = false;
            break;
        }
        dyn_region[r] = m;
        mprotect(static_cast<unsigned char*>(m) + dyn_map - 4096, 4096, PROT_NONE);
        L->dyn_shared[r] = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(m) + dyn_map - 4096 - dyn_rounded) & ~uintptr_t(1023));
    }
    int rc = 0;
    if (!ok) {
        rc = fail("out of memory for shared memory");
    } else {
        for (unsigned z = 0; z < grid[2] && !L->failed; z += cluster[2])
            for (unsigned y = 0; y < grid[1] && !L->failed; y += cluster[1])
                for (unsigned x = 0; x < grid[0] && !L->failed; x += cluster[0]) {
                    L->block_idx = uint3{x, y, z};
                    run_cluster(L);
                }
        if (L->failed) {
            rc = L->callback_panicked ? 2 : 1;
            if (err_len) snprintf(err, err_len, "%s", L->msg);
        }
    }
    for (unsigned r = 0; r < ncta; ++r)
        if (dyn_region[r]) munmap(dyn_region[r], dyn_map);
    if (L->wgs)
        for (unsigned g = 0; g < ncta * L->nwg; ++g) {
            reset_warpgroup(&L->wgs[g]);
            free(L->wgs[g].ops);
            free(L->wgs[g].group_end);
        }
    free(L->wgs);
    free(L->mbars);
    free(L->async);
    free(L->tls_save);
    free(L);
    free(fibers);
    pthread_mutex_unlock(&g_launch_mutex);
    return rc;
}

// ---- built-in variables --------------------------------------------------------------------------
#define threadIdx (::lookahead_emu::self()->tid)
#define blockIdx (::lookahead_emu::self()->block_idx)
#define blockDim (::lookahead_emu::self()->launch->block)
#define gridDim (::lookahead_emu::self()->launch->grid)

// ---- synchronisation and warp intrinsics ---------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::block_barrier(lookahead_emu::BarrierPlain, 0, file, line); }
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)lookahead_emu::block_barrier(lookahead_emu::BarrierCount, pred, file, line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)lookahead_emu::block_barrier(lookahead_emu::BarrierAnd, pred, file, line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)lookahead_emu::block_barrier(lookahead_emu::BarrierOr, pred, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::Fiber* f = lookahead_emu::self();
    lookahead_emu::wait_at(f, lookahead_emu::State::AtWarp, lookahead_emu::OpSyncWarp, 0, mask, file, line);
}
template <typename T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::from_bits64<T>(lookahead_emu::shfl(lookahead_emu::ShflIdx, mask, lookahead_emu::to_bits64(var), src_lane, width, file, line));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::from_bits64<T>(lookahead_emu::shfl(lookahead_emu::ShflUp, mask, lookahead_emu::to_bits64(var), (int)delta, width, file, line));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::from_bits64<T>(lookahead_emu::shfl(lookahead_emu::ShflDown, mask, lookahead_emu::to_bits64(var), (int)delta, width, file, line));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::from_bits64<T>(lookahead_emu::shfl(lookahead_emu::ShflXor, mask, lookahead_emu::to_bits64(var), lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::vote(lookahead_emu::VoteBallot, mask, pred, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return (int)lookahead_emu::vote(lookahead_emu::VoteAny, mask, pred, file, line); }
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return (int)lookahead_emu::vote(lookahead_emu::VoteAll, mask, pred, file, line); }
inline int __uni_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return (int)lookahead_emu::vote(lookahead_emu::VoteUni, mask, pred, file, line); }
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return lookahead_emu::warp_reduce(lookahead_emu::ReduceAddU, mask, v, file, line); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return lookahead_emu::warp_reduce(lookahead_emu::ReduceMinU, mask, v, file, line); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return lookahead_emu::warp_reduce(lookahead_emu::ReduceMaxU, mask, v, file, line); }
inline int __reduce_add_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return (int)lookahead_emu::warp_reduce(lookahead_emu::ReduceAddU, mask, (unsigned)v, file, line); }
inline int __reduce_min_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return (int)lookahead_emu::warp_reduce(lookahead_emu::ReduceMinI, mask, (unsigned)v, file, line); }
inline int __reduce_max_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return (int)lookahead_emu::warp_reduce(lookahead_emu::ReduceMaxI, mask, (unsigned)v, file, line); }
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return lookahead_emu::warp_reduce(lookahead_emu::ReduceAnd, mask, v, file, line); }
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return lookahead_emu::warp_reduce(lookahead_emu::ReduceOr, mask, v, file, line); }
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { return lookahead_emu::warp_reduce(lookahead_emu::ReduceXor, mask, v, file, line); }
// The lanes of the calling thread's warp that have not exited.
inline unsigned __activemask() {
    lookahead_emu::Fiber* f = lookahead_emu::self();
    lookahead_emu::Launch* L = f->launch;
    unsigned m = 0;
    unsigned nl;
    lookahead_emu::Fiber** lanes = lookahead_emu::warp_lanes(L, f->cta * L->nwarps + f->warp, nl);
    for (unsigned i = 0; i < nl; ++i)
        if (lanes[i]->state != lookahead_emu::State::Exited) m |= 1u << i;
    return m;
}
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() {
    lookahead_emu::Fiber* f = lookahead_emu::self();
    lookahead_emu::thread_error(f, "%s", "__trap()");
}
inline long long clock64() {
    static long long t = 0;
    return t += 1;
}

// ---- memory access hints -------------------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---- atomics: one emulated thread runs at a time, so plain read-modify-write is atomic ------------
template <typename T> inline T atomicAdd(T* p, std::type_identity_t<T> v) { T o = *p; *p = o + v; return o; }
template <typename T> inline T atomicSub(T* p, std::type_identity_t<T> v) { T o = *p; *p = o - v; return o; }
template <typename T> inline T atomicExch(T* p, std::type_identity_t<T> v) { T o = *p; *p = v; return o; }
template <typename T> inline T atomicMin(T* p, std::type_identity_t<T> v) { T o = *p; *p = v < o ? v : o; return o; }
template <typename T> inline T atomicMax(T* p, std::type_identity_t<T> v) { T o = *p; *p = v > o ? v : o; return o; }
template <typename T> inline T atomicAnd(T* p, std::type_identity_t<T> v) { T o = *p; *p = o & v; return o; }
template <typename T> inline T atomicOr(T* p, std::type_identity_t<T> v) { T o = *p; *p = o | v; return o; }
template <typename T> inline T atomicXor(T* p, std::type_identity_t<T> v) { T o = *p; *p = o ^ v; return o; }
template <typename T> inline T atomicCAS(T* p, std::type_identity_t<T> cmp, std::type_identity_t<T> v) { T o = *p; if (o == cmp) *p = v; return o; }
inline unsigned atomicInc(unsigned* p, unsigned v) { unsigned o = *p; *p = o >= v ? 0 : o + 1; return o; }
inline unsigned atomicDec(unsigned* p, unsigned v) { unsigned o = *p; *p = (o == 0 || o > v) ? v : o - 1; return o; }

// ---- min / max (CUDA's overloads: the usual arithmetic conversions, fmin/fmax for floats) ------------
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return fmin((C)a, (C)b);
    else return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return fmax((C)a, (C)b);
    else return (C)b > (C)a ? (C)b : (C)a;
}

// ---- float and integer intrinsics ----------------------------------------------------------------
inline float __int_as_float(int v) { return __builtin_bit_cast(float, v); }
inline int __float_as_int(float v) { return __builtin_bit_cast(int, v); }
inline float __uint_as_float(unsigned v) { return __builtin_bit_cast(float, v); }
inline unsigned __float_as_uint(float v) { return __builtin_bit_cast(unsigned, v); }
inline double __longlong_as_double(long long v) { return __builtin_bit_cast(double, v); }
inline long long __double_as_longlong(double v) { return __builtin_bit_cast(long long, v); }
// The MUFU approximations (ex2 / lg2 of a scaled argument) as their f32 formulas: the rounding of
// the scaled argument, the main error of __expf on large arguments, is the same.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return exp2f(x * 3.3219280948873623f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log2f(x) * 0.3010299956639812f; }
inline float __powf(float x, float y) { return exp2f(y * log2f(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline double rsqrt(double a) { return 1.0 / sqrt(a); }
inline float rcbrtf(float a) { return 1.0f / cbrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : x > 0.0f ? x : 0.0f; }
inline float sinpif(float x) { return sinf(x * 3.14159265358979f); }
inline float cospif(float x) { return cosf(x * 3.14159265358979f); }
// cvt.rni / rzi / rmi / rpi to integers: NaN -> 0, saturating.
template <typename I> inline I la_emu_float_to_int(float r) {
    if (r != r) return 0;
    if (r >= (float)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
    if (r <= (float)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
    return (I)r;
}
inline int __float2int_rn(float x) { return la_emu_float_to_int<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return la_emu_float_to_int<int>(truncf(x)); }
inline int __float2int_rd(float x) { return la_emu_float_to_int<int>(floorf(x)); }
inline int __float2int_ru(float x) { return la_emu_float_to_int<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return la_emu_float_to_int<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return la_emu_float_to_int<unsigned>(truncf(x)); }
inline long long __float2ll_rn(float x) { return la_emu_float_to_int<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return la_emu_float_to_int<long long>(truncf(x)); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) { return (unsigned long long)(((unsigned __int128)a * b) >> 64); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) { return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32)); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) { return (unsigned)(((((unsigned long long)hi << 32) | lo) << (s & 31)) >> 32); }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) { return (unsigned)((((unsigned long long)hi << 32) | lo) >> (s & 31)); }
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned s) { return s >= 32 ? lo : __funnelshift_l(lo, hi, s); }
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned s) { return s >= 32 ? hi : __funnelshift_r(lo, hi, s); }

// ---- dynamic shared memory (common.cuh leaves LA_DYNAMIC_SHARED to the emulator) -------------------
#define LA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::lookahead_emu::dynamic_shared())

// ---- the tensor-core wrappers of mma.cuh, by their PTX ISA definitions ------------------------------
// Shared-memory "address": the emulator keeps generic pointers, so this is only the low bits.
inline unsigned smem_u32(const void* p) { return (unsigned)reinterpret_cast<uintptr_t>(p); }

template <typename T>
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const char* file = __builtin_FILE(), int line = __builtin_LINE());
template <> inline void mma_16816<bf16>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const char* file, int line) {
    lookahead_emu::mma_16816(0, d, a, b, file, line);
}
template <> inline void mma_16816<f16>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const char* file, int line) {
    lookahead_emu::mma_16816(1, d, a, b, file, line);
}

inline void ldmatrix_x4(unsigned (&r)[4], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::ldmatrix<4>(r, row, false, file, line); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::ldmatrix<4>(r, row, true, file, line); }
inline void ldmatrix_x2(unsigned (&r)[2], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::ldmatrix<2>(r, row, false, file, line); }
inline void ldmatrix_x2_trans(unsigned (&r)[2], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::ldmatrix<2>(r, row, true, file, line); }

inline void cp_async_16(void* dst, const void* src, bool full, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::cp_async_16(dst, src, full, file, line); }
inline void cp_async_8(void* dst, const void* src, bool full, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::cp_async_8(dst, src, full, file, line); }
inline void cp_async_commit() { lookahead_emu::cp_async_commit(); }
// cp.async.wait_group N: retires the oldest committed groups until at most N are in flight.
template <int N> inline void cp_async_wait() { lookahead_emu::cp_async_wait(N); }

// ---- the thread-block cluster wrappers of cluster.cuh ---------------------------------------------
inline unsigned cluster_rank() { return lookahead_emu::self()->cta; }
inline void cluster_arrive(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::cluster_arrive(file, line); }
inline void cluster_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::cluster_wait(file, line); }
inline float cluster_load_remote(const float* p, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::cluster_load_remote(p, rank, file, line);
}

// ---- the warpgroup MMA wrappers of mma.cuh (sm_90a wgmma), as warpgroup collectives ---------------
inline unsigned long long wgmma_desc(const void* smem, unsigned leading_byte_offset, unsigned stride_byte_offset, unsigned swizzle, const char* file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
    return lookahead_emu::wgmma_desc(smem, leading_byte_offset, stride_byte_offset, swizzle, file, line);
}
template <typename T> constexpr int la_emu_wgmma_f16() {
    static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "wgmma: T is bf16 or f16");
    return std::is_same_v<T, f16> ? 1 : 0;
}
template <int N> constexpr bool la_emu_wgmma_n = N == 64 || N == 96 || N == 128 || N == 160 || N == 192 || N == 256;
template <typename T, int N, bool TRANS_B>
inline void wgmma_ss(float (&d)[N / 2], unsigned long long a_desc, unsigned long long b_desc, bool scale_d, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(la_emu_wgmma_n<N>, "wgmma_ss: N is 64, 96, 128, 160, 192 or 256");
    lookahead_emu::warpgroup_op(lookahead_emu::WgMma | la_emu_wgmma_f16<T>() << 4 | (TRANS_B ? 64 : 0) | N << 8, d, nullptr, a_desc, b_desc, scale_d, 0, file, line);
}
template <typename T, int N, bool TRANS_B>
inline void wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long b_desc, bool scale_d, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(la_emu_wgmma_n<N>, "wgmma_rs: N is 64, 96, 128, 160, 192 or 256");
    lookahead_emu::warpgroup_op(lookahead_emu::WgMma | la_emu_wgmma_f16<T>() << 4 | 32 | (TRANS_B ? 64 : 0) | N << 8, d, a, 0, b_desc, scale_d, 0, file, line);
}
inline void wgmma_fence(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::warpgroup_op(lookahead_emu::WgFence, nullptr, nullptr, 0, 0, false, 0, file, line); }
inline void wgmma_commit(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::warpgroup_op(lookahead_emu::WgCommit, nullptr, nullptr, 0, 0, false, 0, file, line); }
// wgmma.wait_group N: retires the oldest committed groups of the warpgroup until at most N are pending.
template <int N> inline void wgmma_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    lookahead_emu::warpgroup_op(lookahead_emu::WgWait, nullptr, nullptr, 0, 0, false, N, file, line);
}
// fence.proxy.async: a no-op here (the emulator has one proxy; a missing proxy fence is not detected).
inline void fence_proxy_async() {}

// ---- the pipeline wrappers of pipeline.cuh (sm_90a named barriers, mbarriers, TMA, setmaxnreg) ---
// Named barriers (bar.sync / bar.arrive id, threads): ids 1..15, threads a positive multiple of
// 32; every non-exited lane of a warp executes the same one (a warp-level rendezvous), and the
// warp then counts 32 threads. The phase completes when count / 32 warp arrivals (sync or
// arrive) have happened; sync waits for that, arrive does not. All participants of a phase must
// give the same count (an error otherwise).
inline void named_barrier_sync(unsigned id, unsigned threads, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::named_barrier(lookahead_emu::NamedSync, id, threads, file, line);
}
inline void named_barrier_arrive(unsigned id, unsigned threads, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::named_barrier(lookahead_emu::NamedArrive, id, threads, file, line);
}
// mbarriers: see lookahead_emu::Mbarrier and kernels/emu/README.md. Use before init, re-init while
// in use, an arrival beyond the count and more transaction bytes than announced are errors.
inline void mbarrier_init(unsigned long long* bar, unsigned count, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::mbarrier_init(bar, count, file, line); }
// fence.mbarrier_init.release.cluster: the emulator has one proxy, so locally a no-op (the
// __syncthreads after it is still needed); it records the inits this thread made, which other
// CTAs of the cluster may use (mbarrier_arrive_cluster, tma_load_2d_multicast) after their next
// cluster barrier.
inline void fence_mbarrier_init() { lookahead_emu::fence_mbarrier_init(); }
// One arrival on the mbarrier at bar's offset in cluster CTA `rank` (mapa + remote arrive).
inline void mbarrier_arrive_cluster(unsigned long long* bar, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::mbarrier_arrive_cluster(bar, rank, file, line);
}
inline void mbarrier_arrive(unsigned long long* bar, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::mbarrier_arrive(bar, 0, false, file, line); }
inline void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::mbarrier_arrive(bar, bytes, true, file, line);
}
inline bool mbarrier_try_wait(unsigned long long* bar, unsigned parity, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return lookahead_emu::mbarrier_try_wait(bar, parity, file, line);
}
inline void mbarrier_wait(unsigned long long* bar, unsigned parity, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    while (!lookahead_emu::mbarrier_try_wait(bar, parity, file, line)) {
    }
}
inline void cp_async_mbarrier_arrive(unsigned long long* bar, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { lookahead_emu::cp_async_mbarrier_arrive(bar, file, line); }
// setmaxnreg: no register file to resize, but it is .sync.aligned over the warpgroup: all 128
// threads meet at the same call (a warpgroup collective; other sites or another N are errors).
template <unsigned N> inline void setmaxnreg_inc(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: N is 24..256, a multiple of 8");
    lookahead_emu::warpgroup_op(lookahead_emu::WgSetmaxnreg | 32 | (int)N << 8, nullptr, nullptr, 0, 0, false, 0, file, line);
}
template <unsigned N> inline void setmaxnreg_dec(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: N is 24..256, a multiple of 8");
    lookahead_emu::warpgroup_op(lookahead_emu::WgSetmaxnreg | (int)N << 8, nullptr, nullptr, 0, 0, false, 0, file, line);
}
// TMA (see lookahead_emu::tma_load_2d and the TensorMap layout above kTensorMapMagic): the load
// writes the box into shared memory at a later scheduling point the schedule picks (the box holds
// 0xff bytes until then) and completes box bytes of transactions on `bar`; the store reads the box
// from shared memory at some point before the tma_store_wait that covers its bulk group.
inline void tma_prefetch_descriptor(const TensorMap*) {}
inline void tma_load_2d(void* dst, const TensorMap* map, int x, int y, unsigned long long* bar, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::tma_load_2d(dst, map, x, y, bar, file, line);
}
inline void tma_load_4d(void* dst, const TensorMap* map, int x, int y, int z, int w, unsigned long long* bar, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::tma_load_4d(dst, map, x, y, z, w, bar, file, line);
}
inline void tma_store_2d(const TensorMap* map, int x, int y, const void* src, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::tma_store_2d(map, x, y, src, file, line);
}
// The load multicast to the CTAs of `mask` (bit r: cluster rank r): one copy per destination,
// at dst's offset in its shared memory, completing on the mbarrier at bar's offset there.
// (The mask is taken wider than the GPU's 16 bits, so that a wider one shows as an error.)
inline void tma_load_2d_multicast(void* dst, const TensorMap* map, int x, int y, unsigned long long* bar, unsigned mask, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    lookahead_emu::tma_load_2d_multicast(dst, map, x, y, bar, mask, file, line);
}
inline void tma_store_commit() { lookahead_emu::self()->bulk_groups++; }
template <int N> inline void tma_store_wait() {
    static_assert(N >= 0, "cp.async.bulk.wait_group takes N >= 0");
    lookahead_emu::tma_store_wait(N);
}
