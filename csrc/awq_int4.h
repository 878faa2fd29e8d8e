// C ABI of the awq_compile INT4 kernels (libawq_int4.so), loaded by awq_compile/_cuda.py with
// ctypes. A plain C interface keeps the library independent of torch's C++ ABI: one build serves
// any torch version. Every launcher returns 0 on success, or an AWQ_ERR_* code; the message
// (with the shapes) is then available from awq_int4_last_error().
//
// Tensors use the NK_U8 layout of docs/format.md:
//   qweight uint8 [N, Kp/2]  byte b of row n: k = 2b in bits 0-3, k = 2b+1 in bits 4-7
//   scales  T     [N, Kp/g]  T = fp16 (dtype 0) or bf16 (dtype 1), the same T as x and y
//   zeros   uint8 [N, Kp/g]  0..15
//   bias    T     [N] or NULL
//   x       T     [M, K] row-major, K in (Kp - g, Kp]  (columns K..Kp-1 of W are never read as
//                 nonzero: x is taken as 0 there)
//   y       T     [M, N] row-major
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { AWQ_OK = 0, AWQ_ERR_ARG = 1, AWQ_ERR_CUDA = 2 };
enum { AWQ_DTYPE_F16 = 0, AWQ_DTYPE_BF16 = 1 };

// Version of this ABI; _cuda.py refuses a library whose version differs.
int awq_int4_abi_version(void);

// Message of the last failed call on this thread ("" if none).
const char* awq_int4_last_error(void);

// Largest M the tensor-core decode kernel accepts (token tiles are looped over the grid, so this
// is a sanity bound, not a performance threshold: the dispatcher lives in _cuda.py).
int64_t awq_int4_mma_max_m(void);

// Floats of workspace awq_int4_gemm_mma needs for these sizes on the current device (0 when it
// does not split K), or -1 for bad sizes (the message is in awq_int4_last_error()).
int64_t awq_int4_gemm_mma_workspace(int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size, int dtype);

// y = x @ W^T + bias through the weight-streaming tensor-core kernel (int4_gemv_mma.cu).
// workspace: float32, at least awq_int4_gemm_mma_workspace(...) floats (may be NULL when that is
// 0); its contents on entry do not matter and are left undefined. Deterministic at M <= 8: the K
// chunks' partials are summed in chunk order; above, they are added with atomics (the last bits
// vary run to run). stream: a cudaStream_t (NULL = legacy default stream).
int awq_int4_gemm_mma(const void* x, const uint8_t* qweight, const void* scales,
                      const uint8_t* zeros, const void* bias, void* y, float* workspace,
                      int64_t workspace_floats, int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size,
                      int dtype, void* stream);

// Largest M the CUDA-core decode kernel accepts (int4_gemv_simt.cu): 8.
int64_t awq_int4_simt_max_m(void);

// Floats of workspace awq_int4_gemm_simt needs for these sizes on the current device (0 when it
// does not split K), or -1 for bad sizes (the message is in awq_int4_last_error()).
int64_t awq_int4_gemm_simt_workspace(int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size,
                                     int dtype);

// y = x @ W^T + bias through the CUDA-core weight-streaming GEMV (int4_gemv_simt.cu), M <= 8.
// workspace: float32, at least awq_int4_gemm_simt_workspace(...) floats (may be NULL when that is
// 0); its contents on entry do not matter and are left undefined. Deterministic: no atomics.
int awq_int4_gemm_simt(const void* x, const uint8_t* qweight, const void* scales,
                       const uint8_t* zeros, const void* bias, void* y, float* workspace,
                       int64_t workspace_floats, int64_t M, int64_t N, int64_t K, int64_t Kp,
                       int group_size, int dtype, void* stream);

// The K-slice partials of awq_int4_gemm_simt, for a caller that sums them itself (the compile
// backend fuses the sum into the op that reads y): partials[s, m, n] = the fp32 sum over K slice
// s of x[m, k] * W[n, k], no bias, s < S = awq_int4_gemm_simt_workspace(...) / (M * N), which
// must be >= 2 (AWQ_ERR_ARG otherwise). Summed in slice order, + bias, rounded to x's type, they
// are what awq_int4_gemm_simt writes. partials: float32, partials_floats >= S * M * N.
int awq_int4_gemm_simt_partials(const void* x, const uint8_t* qweight, const void* scales,
                                const uint8_t* zeros, float* partials, int64_t partials_floats, int64_t M,
                                int64_t N, int64_t K, int64_t Kp, int group_size, int dtype, void* stream);

// ys[i] = x @ W_i^T + biases[i] for nseg (1..4) weights of Ns[i] rows that share x, K, Kp and
// group_size, in one launch of the CUDA-core GEMV, M <= 8. Arrays and workspace as in
// awq_int4_gemm_pc and awq_int4_gemm_simt; the workspace size comes from
// awq_int4_gemm_simt_multi_workspace (-1 for bad sizes). Deterministic (no atomics).
int64_t awq_int4_gemm_simt_multi_workspace(int nseg, const int64_t* Ns, int64_t M, int64_t K, int64_t Kp,
                                           int group_size, int dtype);
int awq_int4_gemm_simt_multi(const void* x, int nseg, const uint8_t* const* qweights, const void* const* scales,
                             const uint8_t* const* zeros, const void* const* biases, void* const* ys,
                             const int64_t* Ns, float* workspace, int64_t workspace_floats, int64_t M,
                             int64_t K, int64_t Kp, int group_size, int dtype, void* stream);

// The residual add + RMSNorm in front of awq_int4_gemm_fold_glu and awq_int4_gemm_fold_rope (their
// `norm` argument; NULL: none): x is not read but made as the kernel stages it, from
//   h = T(residual + d),  d = delta, or T(sum of partials[0..slices) in order + delta_bias),
//   x = T(weight * T(h * rsqrt(mean_k(h^2) + eps)))       (fp32 math; Llama's RMSNorm)
// and h is written. All [M, K] T row-major but partials (float32 [slices, M, K]) and weight,
// delta_bias ([K]); K % 8 == 0, every pointer 16-byte aligned. Only where the plan needs no
// workspace (the K slices' sums of h^2 are added in the cluster): else AWQ_ERR_ARG.
typedef struct {
  const void* residual;
  const void* delta;      // or NULL with partials
  const float* partials;  // or NULL with delta
  const void* delta_bias; // or NULL
  const void* weight;
  void* h;
  int64_t slices;
  float eps;
} awq_norm_in;

// q/k/v (3 weights of Ns rows, Ns[0] = heads * D, Ns[1] = Ns[2] = kv heads * D) in one launch of
// the folded GEMV (int4_gemv_fold.cu, M <= 16, group size 128), with awq_rope_cache's work in its
// epilogue: q rotated into q [M, Ns[0]], k rotated and v written into k_cache and v_cache
// [B, Ns[1] / D, L, D] at pos[s] of token m = b * S + s (cos, sin, pos as awq_rope_cache takes
// them). Bit-equal to awq_int4_gemm_fold over the three weights followed by awq_rope_cache.
// AWQ_ERR_ARG where the plan would sum K slices through a workspace (not in a cluster): the caller
// then takes those two launches. awq_int4_gemm_fold_rope_workspace says which: the floats of
// workspace the plan needs (0: the launch applies), or -1 for bad sizes.
int64_t awq_int4_gemm_fold_rope_workspace(const int64_t* Ns, int64_t M, int64_t K, int64_t Kp, int group_size,
                                          int dtype);
int awq_int4_gemm_fold_rope(const void* x, const uint8_t* const* qweights, const void* const* scales,
                            const uint8_t* const* zeros, const void* const* biases, void* q, const int64_t* Ns,
                            int64_t M, int64_t K, int64_t Kp, int group_size, int dtype, const void* cos,
                            const void* sin, int64_t cos_bstride, const int64_t* pos, void* k_cache, void* v_cache,
                            int64_t S, int64_t L, int64_t D, const awq_norm_in* norm, void* stream);

// A residual add and RMSNorm alone (add_rms_norm.cu): h (written to norm->h) and x [M, K] as the
// `norm` argument above defines them, one block a row. K % 8 == 0, K <= awq_add_rms_norm_max_k(),
// every pointer 16-byte aligned.
int64_t awq_add_rms_norm_max_k(void);
int awq_add_rms_norm(const awq_norm_in* norm, void* x, int64_t M, int64_t K, int dtype, void* stream);

// Rotary embedding and static KV-cache write after a q/k/v projection (rope_cache.cu):
// q [B*S, Hq*D] rotated in place; k and v [B*S, Hkv*D] (k rotated) written to k_cache and
// v_cache [B, Hkv, L, D] at sequence index pos[s] (int64 [S]; outside [0, L): not written);
// cos and sin [B or 1, S, D] with cos_bstride elements between batch rows (0: one row), rows
// contiguous. T = dtype for every tensor but pos. Llama's x * cos + rotate_half(x) * sin, in fp32,
// rounded once.
int awq_rope_cache(void* q, const void* k, const void* v, const void* cos, const void* sin, int64_t cos_bstride,
                   const int64_t* pos, void* k_cache, void* v_cache, int64_t B, int64_t S, int64_t Hq,
                   int64_t Hkv, int64_t D, int64_t L, int dtype, void* stream);

// Attention of a few query rows against a KV cache, for decode (decode_attention.cu):
//   out[b, h, s, :] = softmax_p(scale * q[b, h, s, :] . k[b, h / G, p, :] + mask[b, h, s, p]) @ v[b, h / G, :, :]
// G = Hq / Hkv (grouped-query attention), G * S <= awq_decode_attention_max_rows(), D = 64 or 128.
// q [B, Hq, S, D], k and v [B, Hkv, L, D] with element strides (b, h, s or p) and unit stride
// along D, 16-byte aligned (pointers and strides); out [B, Hq, S, D] contiguous. mask_kind: 0
// none, 1 bool (uint8, 0: masked), 2 additive in T, 3 additive in fp32; mask_strides (b, h, s, p)
// in elements, 0 along a broadcast dimension. Masked positions are not read; a row with every
// position masked is 0. splits: 0 lets the library choose how many blocks (a cluster, sm_90)
// share one (b, kv head)'s positions, 1..8 forces it. T = dtype for q, k, v and out. fp32 math.
int64_t awq_decode_attention_max_rows(void);
// Rounds of loads (positions a block over positions a round) the launch's plan gives one block on
// the current device, at splits = 0; -1 for bad sizes. The op serves only plans of few rounds.
int64_t awq_decode_attention_rounds(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t L, int64_t D);
int awq_decode_attention(const void* q, const void* k, const void* v, const void* mask, void* out,
                         const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                         const int64_t* mask_strides, int mask_kind, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                         int64_t L, int64_t D, float scale, int splits, int dtype, void* stream);

// Largest M the folded tensor-core decode kernel accepts (int4_gemv_fold.cu): 16 (8 with a norm
// argument to _glu or _rope).
int64_t awq_int4_fold_max_m(void);

// ys[i] = x @ W_i^T + biases[i] for nseg (1..4) weights that share x, as awq_int4_gemm_simt_multi,
// through the folded tensor-core decode kernel (int4_gemv_fold.cu): M <= 16, group_size 128 only.
// The workspace size comes from awq_int4_gemm_fold_workspace (-1 for bad sizes); its contents on
// entry do not matter. Deterministic (no atomics).
int64_t awq_int4_gemm_fold_workspace(int nseg, const int64_t* Ns, int64_t M, int64_t K, int64_t Kp,
                                     int group_size, int dtype);
int awq_int4_gemm_fold(const void* x, int nseg, const uint8_t* const* qweights, const void* const* scales,
                       const uint8_t* const* zeros, const void* const* biases, void* const* ys,
                       const int64_t* Ns, float* workspace, int64_t workspace_floats, int64_t M,
                       int64_t K, int64_t Kp, int group_size, int dtype, void* stream);

// y = silu(x @ Wg^T + bg) * (x @ Wu^T + bu) for a gated MLP's gate and up weights (qweights[0],
// qweights[1], both N rows; arrays of 2 as in awq_int4_gemm_fold), in one launch of the folded
// decode kernel: a tile is 8 rows of each, and each linear's result is rounded to x's type before
// the product is made in fp32 and rounded once. M <= 16, group size 128. Workspace as in
// awq_int4_gemm_fold, its size from awq_int4_gemm_fold_glu_workspace (-1 for bad sizes).
int64_t awq_int4_gemm_fold_glu_workspace(int64_t N, int64_t M, int64_t K, int64_t Kp, int group_size, int dtype);
int awq_int4_gemm_fold_glu(const void* x, const uint8_t* const* qweights, const void* const* scales,
                           const uint8_t* const* zeros, const void* const* biases, void* y, int64_t N, float* workspace,
                           int64_t workspace_floats, int64_t M, int64_t K, int64_t Kp, int group_size, int dtype,
                           const awq_norm_in* norm, void* stream);

// Largest M the register-streaming tensor-core decode kernel accepts (int4_gemv_tc.cu): 8.
int64_t awq_int4_tc_max_m(void);

// y = x @ W^T + bias through the register-streaming tensor-core decode kernel (int4_gemv_tc.cu),
// M <= 8. No workspace; deterministic (no atomics).
int awq_int4_gemm_tc(const void* x, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                     const void* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t Kp,
                     int group_size, int dtype, void* stream);

// Largest M the producer/consumer decode kernel accepts (int4_gemv_pc.cu): 8.
int64_t awq_int4_pc_max_m(void);

// ys[i] = x @ W_i^T + biases[i] for nseg (1..4) weights of Ns[i] rows that share x, K, Kp and
// group_size, in one launch, through the producer/consumer decode kernel (int4_gemv_pc.cu),
// M <= 8, sm_90 or newer only. Each array holds nseg entries (biases[i] may be NULL). No
// workspace; deterministic (no atomics).
int awq_int4_gemm_pc(const void* x, int nseg, const uint8_t* const* qweights, const void* const* scales,
                     const uint8_t* const* zeros, const void* const* biases, void* const* ys,
                     const int64_t* Ns, int64_t M, int64_t K, int64_t Kp, int group_size, int dtype,
                     void* stream);

// Number of tile configurations of the sm_90 prefill GEMM (0 when the library was built without
// an sm_90a target or CUTLASS support).
int awq_int4_gemm_sm90_configs(void);

// Bytes of workspace awq_int4_gemm_sm90 needs for these sizes and configuration, or -1 for bad
// sizes (the message is in awq_int4_last_error()).
int64_t awq_int4_gemm_sm90_workspace(int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size, int dtype,
                                     int config, int splits);

// y = x @ W^T + bias through the CUTLASS mixed-input GEMM (int4_gemm_sm90.cu), sm_90a only, for
// prefill. It reads qweight as is, and two derived tensors in place of scales and zeros:
//   scales_t  T [Kp/g, N] = scales^T;   szeros_t  T [Kp/g, N] = (-zeros * scales)^T.
// Needs N % 8 == 0, K % 32 == 0, group_size 64 or 128, 16-byte aligned pointers, and at least
// awq_int4_gemm_sm90_workspace(...) bytes of workspace (may be NULL when that is 0). config picks
// the tile (weight rows x tokens x K): 0..2 128x16x64, 128x64x64, 128x128x64; 3..5 256x16x64,
// 256x64x64, 256x128x64; 6 128x256x64 in CTA pairs; 7..10 256x16x128, 256x64x128, 128x64x128,
// 128x16x128 (group size 128 only). splits: 0 or 1 lets CUTLASS's stream-K scheduler choose,
// 2..64 forces a split-K into that many parts. Deterministic: split parts are reduced in a fixed
// order.
int awq_int4_gemm_sm90(const void* x, const uint8_t* qweight, const void* scales_t, const void* szeros_t,
                       const void* bias, void* y, void* workspace, int64_t workspace_bytes, int64_t M, int64_t N,
                       int64_t K, int64_t Kp, int group_size, int dtype, int config, int splits, void* stream);

// w[N, K] = (q - z) * s in T, rounded exactly as awq_compile.quant.dequantize does in T
// (int4_dequant.cu). Used by the large-M path (dequantize + cuBLAS).
int awq_int4_dequant(const uint8_t* qweight, const void* scales, const uint8_t* zeros, void* w,
                     int64_t N, int64_t K, int64_t Kp, int group_size, int dtype, void* stream);

#ifdef __cplusplus
}
#endif
