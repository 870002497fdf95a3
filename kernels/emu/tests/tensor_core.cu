// Test kernels of the CPU emulator's tensor-core wrappers (mma.cuh): one warp multiplies
// D (16 x 16, f32) = A (16 x 32) B (32 x 16) + C with two mma_16816 k-steps per 16x8 output tile,
// loading its operands through each ldmatrix variant, and a dump of the raw ldmatrix registers.
// Checked by tests/cuda_emulation.rs against a plain Rust matmul and the documented layouts.
#include "common.cuh"
#include "mma.cuh"

#define MT 16
#define NT 16
#define KT 32

// Writes a C/D fragment of output tile nt (columns 8 nt .. 8 nt + 7): c[0], c[1] = D[g][2t..],
// c[2], c[3] = D[g + 8][2t..].
__device__ __forceinline__ void load_acc(const float* c, u32 nt, float (&acc)[4]) {
    const u32 lane = threadIdx.x, g = lane / 4, t = lane % 4, col = nt * 8 + 2 * t;
    acc[0] = c[g * NT + col];
    acc[1] = c[g * NT + col + 1];
    acc[2] = c[(g + 8) * NT + col];
    acc[3] = c[(g + 8) * NT + col + 1];
}
__device__ __forceinline__ void store_acc(float* d, u32 nt, const float (&acc)[4]) {
    const u32 lane = threadIdx.x, g = lane / 4, t = lane % 4, col = nt * 8 + 2 * t;
    d[g * NT + col] = acc[0];
    d[g * NT + col + 1] = acc[1];
    d[(g + 8) * NT + col] = acc[2];
    d[(g + 8) * NT + col + 1] = acc[3];
}

// A row-major (m x k) through ldmatrix_x4, B row-major (k x n) through ldmatrix_x2_trans.
template <typename T>
__device__ __forceinline__ void matmul_row_major(const u16* a, const u16* b, const float* c, float* d) {
    __shared__ __align__(16) u16 sa[MT * KT];
    __shared__ __align__(16) u16 sb[KT * NT];
    const u32 lane = threadIdx.x;
    for (u32 i = lane; i < MT * KT; i += 32) sa[i] = a[i];
    for (u32 i = lane; i < KT * NT; i += 32) sb[i] = b[i];
    __syncwarp();
    for (u32 nt = 0; nt < NT / 8; ++nt) {
        float acc[4];
        load_acc(c, nt, acc);
        for (u32 ks = 0; ks < KT / 16; ++ks) {
            u32 fa[4], fb[2];
            // Lane l: row l % 16 of the 16x16 A tile, column half l / 16.
            ldmatrix_x4(fa, &sa[(lane % 16) * KT + ks * 16 + 8 * (lane / 16)]);
            // Lane l < 16: row k = l of the 16x8 B tile (lanes 16..31 are ignored by .x2).
            ldmatrix_x2_trans(fb, &sb[(ks * 16 + lane % 16) * NT + nt * 8]);
            mma_16816<T>(acc, fa, fb);
        }
        store_acc(d, nt, acc);
    }
}

// The same product from the transposed operands: At (k x m) through ldmatrix_x4_trans, Bt
// (n x k) through ldmatrix_x2.
template <typename T>
__device__ __forceinline__ void matmul_transposed(const u16* at, const u16* bt, const float* c, float* d) {
    __shared__ __align__(16) u16 sat[KT * MT];
    __shared__ __align__(16) u16 sbt[NT * KT];
    const u32 lane = threadIdx.x;
    for (u32 i = lane; i < KT * MT; i += 32) sat[i] = at[i];
    for (u32 i = lane; i < NT * KT; i += 32) sbt[i] = bt[i];
    __syncwarp();
    const u32 mi = lane / 8, r = lane % 8;
    for (u32 nt = 0; nt < NT / 8; ++nt) {
        float acc[4];
        load_acc(c, nt, acc);
        for (u32 ks = 0; ks < KT / 16; ++ks) {
            u32 fa[4], fb[2];
            // Matrix mi = (k half mi / 2, m half mi % 2): its row r is At[k][m0 .. m0 + 7].
            ldmatrix_x4_trans(fa, &sat[(ks * 16 + (mi / 2) * 8 + r) * MT + (mi % 2) * 8]);
            // Matrix mi < 2: rows n = 8 nt + r, k half mi.
            ldmatrix_x2(fb, &sbt[(nt * 8 + r) * KT + ks * 16 + (mi % 2) * 8]);
            mma_16816<T>(acc, fa, fb);
        }
        store_acc(d, nt, acc);
    }
}

extern "C" __global__ void mma_row_major_bf16(const u16* a, const u16* b, const float* c, float* d) { matmul_row_major<bf16>(a, b, c, d); }
extern "C" __global__ void mma_row_major_f16(const u16* a, const u16* b, const float* c, float* d) { matmul_row_major<f16>(a, b, c, d); }
extern "C" __global__ void mma_transposed_bf16(const u16* at, const u16* bt, const float* c, float* d) { matmul_transposed<bf16>(at, bt, c, d); }
extern "C" __global__ void mma_transposed_f16(const u16* at, const u16* bt, const float* c, float* d) { matmul_transposed<f16>(at, bt, c, d); }

// m: 32 rows of 8 u16 (four 8x8 matrices, matrix i = rows 8i .. 8i + 7), lane l points at row l.
// out[v][lane][reg], v = x4, x4_trans, x2, x2_trans (x2 writes regs 0, 1 only). Lanes 16..31 give
// misaligned addresses to the .x2 loads, which must ignore them.
extern "C" __global__ void ldmatrix_layouts(const u16* m, u32* out) {
    __shared__ __align__(16) u16 sm[32 * 8 + 8];
    const u32 lane = threadIdx.x;
    for (u32 i = lane; i < 32 * 8; i += 32) sm[i] = m[i];
    __syncwarp();
    u32 r4[4], r2[2];
    ldmatrix_x4(r4, &sm[lane * 8]);
    for (int i = 0; i < 4; ++i) out[(0 * 32 + lane) * 4 + i] = r4[i];
    ldmatrix_x4_trans(r4, &sm[lane * 8]);
    for (int i = 0; i < 4; ++i) out[(1 * 32 + lane) * 4 + i] = r4[i];
    const u16* row2 = lane < 16 ? &sm[lane * 8] : &sm[lane * 8 + 1];
    ldmatrix_x2(r2, row2);
    for (int i = 0; i < 2; ++i) out[(2 * 32 + lane) * 4 + i] = r2[i];
    ldmatrix_x2_trans(r2, row2);
    for (int i = 0; i < 2; ++i) out[(3 * 32 + lane) * 4 + i] = r2[i];
}
