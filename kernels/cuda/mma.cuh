// Tensor-core building blocks for sm_80+: the warp-level mma.sync m16n8k16 with 16-bit inputs and
// f32 accumulators, ldmatrix loads from shared memory, and cp.async global -> shared copies.
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
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most N of this thread's committed groups are still in flight (then
// __syncthreads before other threads read the data).
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

#endif  // LOOKAHEAD_EMULATE

// Two f32 values as one u32 of two T halves (lo in the low half), the A/B fragment element pair.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_f32<T>(lo).bits | ((u32)from_f32<T>(hi).bits << 16);
}
