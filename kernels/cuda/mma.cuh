// Tensor-core building blocks for sm_80+: the warp-level mma.sync m16n8k16 with 16-bit inputs and
// f32 accumulators, ldmatrix loads from shared memory, and cp.async global -> shared copies; and
// for sm_90a the warpgroup MMA (wgmma, section "Hopper warpgroup MMA" at the end).
// Kernels reach these instructions only through the functions below, so that the CPU emulator
// (kernels/emu) can replace each with its PTX ISA definition and run the kernels on the host.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", 16-bit types). lane = 4 g + t
// (g = lane / 4, t = lane % 4); each u32 holds two 16-bit values, the lower column / row in the low
// half.
//   A 16x16 row-major:  a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                       a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   B 16x8 (k x n):     b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C/D 16x8 f32:       c[0], c[1] = C[g][2t], C[g][2t+1]    c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// ldmatrix .x4 loads four 8x8 16-bit matrices: lanes 8i..8i+7 give the addresses of matrix i's
// rows 0..7 (16 contiguous bytes each, 16-byte aligned); register i receives matrix i's
// M[g][2t..2t+1], or with .trans M[2t][g] (low) and M[2t+1][g] (high). .x2 uses lanes 0..15 and
// matrices 0..1. So ldmatrix_x4 over a 16x16 row-major tile (lane l pointing at row l % 16, column
// 8 (l / 16)) yields exactly an A fragment, and ldmatrix_x2_trans over a 16x8 row-major k x n tile
// (lane l pointing at row l % 16) yields a B fragment.
#pragma once
#include "common.cuh"

#ifndef LOOKAHEAD_EMULATE

// Shared-memory address of a generic pointer into shared memory, as the instructions take it.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// d += a * b on one 16x8x16 tile; T is bf16 or f16 (the type the u32 halves hold).
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]);
template <> __device__ __forceinline__ void mma_16816<bf16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<f16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
}

// 16 bytes global -> shared without staging in registers; when !full the destination is
// zero-filled instead (out-of-range rows and columns of edge tiles). Both pointers 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(full ? 16 : 0));
}
// 8 bytes (the .ca form: .cg copies only 16); src and dst 8-byte aligned, src-size 0 zero-fills.
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, bool full) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(full ? 8 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most N of this thread's committed groups are still in flight (then
// __syncthreads before other threads read the data).
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

#endif  // LOOKAHEAD_EMULATE

// Two f32 values as one u32 of two T halves (lo in the low half), the A/B fragment element pair.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_f32<T>(lo).bits | ((u32)from_f32<T>(hi).bits << 16);
}

// ================================== Hopper warpgroup MMA ======================================
// wgmma.mma_async (sm_90a only; the contract other kernels rely on is documented here and in the
// PTX ISA sections "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" / "Matrix Descriptor
// Format"). A warpgroup is 4 consecutive warps whose first warp index is a multiple of 4 (threads
// 128 g .. 128 g + 127); every wgmma_* call is executed by all 128 threads of the warpgroup at the
// same call site (.sync.aligned).
//
// D (64 x N, f32) = A (64 x 16) * B (16 x N) + (scale_d ? D : 0), issued asynchronously:
//   wgmma_fence();                       // before the first wgmma, and before a wgmma whose
//                                        // accumulator / A registers other code wrote since
//   wgmma_ss<bf16, N, TRANS_B>(d, a_desc, b_desc, scale_d);   // several, e.g. one per k16 step
//   wgmma_commit();                      // the wgmmas issued since the last commit form a group
//   wgmma_wait<0>();                     // until at most 0 groups are pending: d is valid now
// Between the issue and the wait that retires its group, the accumulator registers (and for
// wgmma_rs the A registers) must not be read or written, and the shared memory it reads must not
// be overwritten. Consecutive wgmmas into the same accumulator need no fence or wait in between.
// fence_proxy_async() after generic-proxy writes of shared memory (st.shared, landed cp.async)
// that a wgmma will read, then a block barrier so every writer's fence is done.
//
// Accumulator (f32, N / 2 registers per thread): warp w of the warpgroup holds rows 16w..16w+15;
// for each 8-column block j (0 .. N/8 - 1), lane = 4 g + t:
//   d[4j + 0], d[4j + 1] = D[16w + g][8j + 2t], D[16w + g][8j + 2t + 1]
//   d[4j + 2], d[4j + 3] = D[16w + g + 8][8j + 2t], D[16w + g + 8][8j + 2t + 1]
// (the mma.m16n8 C layout, repeated over the 8-column blocks).
// wgmma_rs A registers: warp w gives the mma.m16n8k16 A fragment (top of this file) of rows
// 16w..16w+15: a[0] = A[16w + g][2t..], a[1] = A[16w + g + 8][2t..], a[2] = A[16w + g][2t + 8..],
// a[3] = A[16w + g + 8][2t + 8..].
//
// Shared-memory operands are given by descriptors (wgmma_desc): start address, leading-dimension
// byte offset (LBO), stride-dimension byte offset (SBO), swizzle mode. A (wgmma_ss) is always
// K-major (row-major [64][K]); B is K-major when TRANS_B = false (row-major [N][K], e.g. K for
// Q K^T or W[N][K] for x W^T) and MN-major when TRANS_B = true ([K][N], N contiguous, e.g. V).
// Canonical layouts (CUTLASS cute/atom/mma_traits_sm90_gmma.hpp make_gmma_desc; 16-bit elements,
// byte offsets before the swizzle; W = the swizzle's row width: 128, 64 or 32 bytes):
//   K-major, swizzled: MN row r (0..63 of A, 0..N-1 of B), k (0..15) at
//       start + (r % 8) * W + (r / 8) * SBO + 2 k          (LBO unused: set it to 16)
//     A dense tile [rows][W / 2 elements] therefore has SBO = 8 W; the next k16 step of the same
//     atom is start + 32 bytes (the swizzle then works on the absolute address).
//   K-major, no swizzle: 8x8 core matrices (8 rows of 16 contiguous bytes):
//       start + (r % 8) * 16 + (r / 8) * SBO + (k / 8) * LBO + 2 (k % 8)
//   MN-major, swizzled: n (0..N-1), k (0..15), with E = W / 2 elements per row:
//       start + 2 (n % E) + (n / E) * LBO + (k % 8) * W + (k / 8) * SBO
//     (LBO: between E-wide column chunks, unused when N <= E; SBO: between groups of 8 k-rows,
//     8 W for a dense [K][E] tile.)
//   MN-major, no swizzle: core matrices of 8 k-rows of 8 contiguous n:
//       start + 2 (n % 8) + (n / 8) * SBO + (k % 8) * 16 + (k / 8) * LBO
//     (LBO is along K and SBO along MN for both majors without swizzle.)
// Swizzle (Swizzle<3,4,3> for 128B): byte address bits [4:6] ^= bits [7:9]; 64B: [4:5] ^= [7:8];
// 32B: bit 4 ^= bit 7, applied to the absolute shared-memory address, so every swizzled atom
// (8 rows of W bytes) must start at a multiple of 8 W (1024 / 512 / 256 bytes): align the
// shared-memory tiles to 1024 bytes (base offset field 0).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(LOOKAHEAD_EMULATE)
#define LA_WGMMA 1
#else
#define LA_WGMMA 0
#endif

// Swizzle modes of the shared-memory matrix descriptor (bits 62-63).
enum WgmmaSwizzle : u32 { WGMMA_SWIZZLE_NONE = 0, WGMMA_SWIZZLE_128B = 1, WGMMA_SWIZZLE_64B = 2, WGMMA_SWIZZLE_32B = 3 };

#if !defined(LOOKAHEAD_EMULATE) && LA_WGMMA

// Descriptor of a matrix in shared memory: start address >> 4 (bits 0-13), LBO >> 4 (16-29),
// SBO >> 4 (32-45), base offset 0 (49-51), swizzle (62-63).
__device__ __forceinline__ u64 wgmma_desc(const void* smem, u32 leading_byte_offset, u32 stride_byte_offset, WgmmaSwizzle swizzle) {
    return (u64)((smem_u32(smem) & 0x3ffff) >> 4) | ((u64)((leading_byte_offset >> 4) & 0x3fff) << 16) | ((u64)((stride_byte_offset >> 4) & 0x3fff) << 32) |
           ((u64)swizzle << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// The operand lists of wgmma, generated: LA_WG_F8(b) is "+f"(d[b]) .. "+f"(d[b + 7]); the
// register strings "{%0,%1,...}" are built from ten-operand pieces ("%t0,...,%t9," for tens t).
#define LA_WG_F8(b) "+f"(d[(b) + 0]), "+f"(d[(b) + 1]), "+f"(d[(b) + 2]), "+f"(d[(b) + 3]), "+f"(d[(b) + 4]), "+f"(d[(b) + 5]), "+f"(d[(b) + 6]), "+f"(d[(b) + 7])
#define LA_WG_F32(b) LA_WG_F8(b), LA_WG_F8((b) + 8), LA_WG_F8((b) + 16), LA_WG_F8((b) + 24)
#define LA_WG_OUT_32 LA_WG_F32(0)
#define LA_WG_OUT_48 LA_WG_F32(0), LA_WG_F8(32), LA_WG_F8(40)
#define LA_WG_OUT_64 LA_WG_F32(0), LA_WG_F32(32)
#define LA_WG_OUT_80 LA_WG_F32(0), LA_WG_F32(32), LA_WG_F8(64), LA_WG_F8(72)
#define LA_WG_OUT_96 LA_WG_F32(0), LA_WG_F32(32), LA_WG_F32(64)
#define LA_WG_OUT_128 LA_WG_F32(0), LA_WG_F32(32), LA_WG_F32(64), LA_WG_F32(96)
#define LA_WG_TEN(t) "%" #t "0,%" #t "1,%" #t "2,%" #t "3,%" #t "4,%" #t "5,%" #t "6,%" #t "7,%" #t "8,%" #t "9,"
#define LA_WG_FIRST_TEN "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,"
#define LA_WG_REGS_32 "{" LA_WG_FIRST_TEN LA_WG_TEN(1) LA_WG_TEN(2) "%30,%31}"
#define LA_WG_REGS_48 "{" LA_WG_FIRST_TEN LA_WG_TEN(1) LA_WG_TEN(2) LA_WG_TEN(3) "%40,%41,%42,%43,%44,%45,%46,%47}"
#define LA_WG_REGS_64 "{" LA_WG_FIRST_TEN LA_WG_TEN(1) LA_WG_TEN(2) LA_WG_TEN(3) LA_WG_TEN(4) LA_WG_TEN(5) "%60,%61,%62,%63}"
#define LA_WG_REGS_80 "{" LA_WG_FIRST_TEN LA_WG_TEN(1) LA_WG_TEN(2) LA_WG_TEN(3) LA_WG_TEN(4) LA_WG_TEN(5) LA_WG_TEN(6) "%70,%71,%72,%73,%74,%75,%76,%77,%78,%79}"
#define LA_WG_REGS_96 "{" LA_WG_FIRST_TEN LA_WG_TEN(1) LA_WG_TEN(2) LA_WG_TEN(3) LA_WG_TEN(4) LA_WG_TEN(5) LA_WG_TEN(6) LA_WG_TEN(7) LA_WG_TEN(8) "%90,%91,%92,%93,%94,%95}"
#define LA_WG_REGS_128                                                                                                                              \
    "{" LA_WG_FIRST_TEN LA_WG_TEN(1) LA_WG_TEN(2) LA_WG_TEN(3) LA_WG_TEN(4) LA_WG_TEN(5) LA_WG_TEN(6) LA_WG_TEN(7) LA_WG_TEN(8) LA_WG_TEN(9) LA_WG_TEN(10) \
        LA_WG_TEN(11) "%120,%121,%122,%123,%124,%125,%126,%127}"
// The operands after the accumulators (numbered from NR = N / 2): SS: a_desc %NR, b_desc %NR+1,
// scale_d %NR+2. RS: a {%NR..%NR+3}, b_desc %NR+4, scale_d %NR+5.
#define LA_WG_SS_TAIL_32 "%32, %33", "%34"
#define LA_WG_SS_TAIL_48 "%48, %49", "%50"
#define LA_WG_SS_TAIL_64 "%64, %65", "%66"
#define LA_WG_SS_TAIL_80 "%80, %81", "%82"
#define LA_WG_SS_TAIL_96 "%96, %97", "%98"
#define LA_WG_SS_TAIL_128 "%128, %129", "%130"
#define LA_WG_RS_TAIL_32 "{%32,%33,%34,%35}, %36", "%37"
#define LA_WG_RS_TAIL_48 "{%48,%49,%50,%51}, %52", "%53"
#define LA_WG_RS_TAIL_64 "{%64,%65,%66,%67}, %68", "%69"
#define LA_WG_RS_TAIL_80 "{%80,%81,%82,%83}, %84", "%85"
#define LA_WG_RS_TAIL_96 "{%96,%97,%98,%99}, %100", "%101"
#define LA_WG_RS_TAIL_128 "{%128,%129,%130,%131}, %132", "%133"
// One wgmma statement (the accumulator operands last, as __VA_ARGS__): shape m64nNk16, type string, the imm-scale-a/b (1), imm-trans-a (0, SS
// only) and imm-trans-b immediates after the scale-d predicate p.
#define LA_WG_ASM_SS(SHAPE, TY, REGS, AB, SD, TB, ...)                                                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SD ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " REGS ", " AB \
                 ", p, 1, 1, 0, " TB ";\n}\n"                                                                                        \
                 : __VA_ARGS__                                                                                                          \
                 : "l"(a_desc), "l"(b_desc), "r"((u32)scale_d))
#define LA_WG_ASM_RS(SHAPE, TY, REGS, AB, SD, TB, ...)                                                                                                              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SD ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " REGS ", " AB ", p, 1, 1, " TB ";\n}\n" \
                 : __VA_ARGS__                                                                                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"((u32)scale_d))
// The four (type, trans-b) variants of one shape; FORM is SS or RS.
#define LA_WG_VARIANTS(FORM, NN, NR)                                                                                                 \
    if constexpr (N == NN) {                                                                                                         \
        if constexpr (wgmma_is_bf16<T>::value) {                                                                                     \
            if constexpr (TRANS_B) LA_WG_CALL(LA_WG_ASM_##FORM, ("m64n" #NN "k16", "bf16", LA_WG_REGS_##NR, LA_WG_##FORM##_TAIL_##NR, "1", LA_WG_OUT_##NR)); \
            else LA_WG_CALL(LA_WG_ASM_##FORM, ("m64n" #NN "k16", "bf16", LA_WG_REGS_##NR, LA_WG_##FORM##_TAIL_##NR, "0", LA_WG_OUT_##NR));                \
        } else {                                                                                                                     \
            if constexpr (TRANS_B) LA_WG_CALL(LA_WG_ASM_##FORM, ("m64n" #NN "k16", "f16", LA_WG_REGS_##NR, LA_WG_##FORM##_TAIL_##NR, "1", LA_WG_OUT_##NR));  \
            else LA_WG_CALL(LA_WG_ASM_##FORM, ("m64n" #NN "k16", "f16", LA_WG_REGS_##NR, LA_WG_##FORM##_TAIL_##NR, "0", LA_WG_OUT_##NR));                 \
        }                                                                                                                            \
    }
#define LA_WG_CALL(M, ARGS) M ARGS

template <typename T> struct wgmma_is_bf16 { static constexpr bool value = false; };
template <> struct wgmma_is_bf16<bf16> { static constexpr bool value = true; };

// D = A * B + (scale_d ? D : 0); A and B by descriptor. T: bf16 or f16; N: 64, 96, 128, 160, 192, 256 (another
// multiple of 8 up to 256 is one LA_WG_* line per list below).
template <typename T, int N, bool TRANS_B> __device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], u64 a_desc, u64 b_desc, bool scale_d) {
    static_assert(N == 64 || N == 96 || N == 128 || N == 160 || N == 192 || N == 256, "wgmma_ss: N is 64, 96, 128, 160, 192 or 256");
    LA_WG_VARIANTS(SS, 64, 32)
    LA_WG_VARIANTS(SS, 96, 48)
    LA_WG_VARIANTS(SS, 128, 64)
    LA_WG_VARIANTS(SS, 160, 80)
    LA_WG_VARIANTS(SS, 192, 96)
    LA_WG_VARIANTS(SS, 256, 128)
}
// The same with A from registers (each warp's mma.m16n8k16 A fragment of its 16 rows).
template <typename T, int N, bool TRANS_B> __device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 b_desc, bool scale_d) {
    static_assert(N == 64 || N == 96 || N == 128 || N == 160 || N == 192 || N == 256, "wgmma_rs: N is 64, 96, 128, 160, 192 or 256");
    LA_WG_VARIANTS(RS, 64, 32)
    LA_WG_VARIANTS(RS, 96, 48)
    LA_WG_VARIANTS(RS, 128, 64)
    LA_WG_VARIANTS(RS, 160, 80)
    LA_WG_VARIANTS(RS, 192, 96)
    LA_WG_VARIANTS(RS, 256, 128)
}

#endif  // !LOOKAHEAD_EMULATE && LA_WGMMA

// Keeps the compiler from moving reads or writes of these registers across a wgmma_wait: wgmma
// accumulators (and wgmma_rs's A registers) belong to the asynchronous MMA from its issue to the
// wait that retires it, which the compiler does not know (the wrappers' asm operands say "read
// and written at the issue"); without it an A register could be reused, or an accumulator read,
// before the MMA is done with it. An empty asm statement, no instruction (CUTLASS:
// warpgroup_fence_operand); the emulator captures operands at the issue and needs none. Note that
// ptxas may still hoist a wgmma_wait above independent work in the same basic block.
template <int N> __device__ __forceinline__ void wgmma_fence_operands(float (&r)[N]) {
#ifndef LOOKAHEAD_EMULATE
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int N> __device__ __forceinline__ void wgmma_fence_operands(u32 (&r)[N]) {
#ifndef LOOKAHEAD_EMULATE
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
#endif
}
template <int M> __device__ __forceinline__ void wgmma_fence_operands(u32 (&r)[M][4]) {
#pragma unroll
    for (int i = 0; i < M; ++i) wgmma_fence_operands(r[i]);
}

// pack2 as one cvt.rn.{bf16,f16}x2.f32: for values known not to be NaN (softmax probabilities,
// gradients of finite inputs), where pack2's bf16 path spends three more instructions a value
// carrying NaN payloads over as the CPU does. Same rounding (to nearest even); the emulator uses
// pack2.
template <typename T> __device__ __forceinline__ u32 pack2_rn(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2_rn<bf16>(float lo, float hi) {
#ifdef LOOKAHEAD_EMULATE
    return pack2<bf16>(lo, hi);
#else
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}
template <> __device__ __forceinline__ u32 pack2_rn<f16>(float lo, float hi) {
#ifdef LOOKAHEAD_EMULATE
    return pack2<f16>(lo, hi);
#else
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}
