// Helpers shared by the INT4 kernels: error reporting for the C ABI, the two activation types,
// and the nibble -> half/bf16 conversion used by every kernel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "awq_int4.h"

namespace awq {

struct Int4Operands {  // the op's tensors, as every kernel's arguments start
  const void* x;
  const uint8_t* qweight;
  const void* scales;
  const uint8_t* zeros;
  const void* bias;
  void* y;
};

// Multi-weight launches (the simt and pc kernels): weights that read the same x (q/k/v, gate/up)
// run in one launch, their row tiles numbered one after another.
constexpr int kMaxSeg = 4;
struct Int4Seg {
  const uint8_t* qweight;
  const void* scales;
  const uint8_t* zeros;
  const void* bias;
  void* y;
  int N;
  int tile0;  // this weight's first tile
};

// Which of a launch's nseg weights a tile belongs to.
__device__ __forceinline__ int seg_of(const Int4Seg (&seg)[kMaxSeg], int nseg, int tile) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < kMaxSeg; ++i) s += (i < nseg && tile >= seg[i].tile0);
  return s;
}

// Per-thread message so two host threads launching at once cannot garble each other's error.
char* error_buffer();

// Formats the message into the thread's buffer and returns `code`, so launchers can write
// `return fail(AWQ_ERR_ARG, "...", ...)`.
int fail(int code, const char* fmt, ...);

// The size checks the register-streaming launchers share (simt, tc): group_size in {32, 64,
// 128}, 1 <= M <= max_m, N >= 1, Kp a multiple of group_size, K in (Kp - group_size, Kp],
// N * Kp / 2 < 2^31 (32-bit byte offsets), dtype fp16 or bf16. Returns log2(group_size), or -1
// with the message "<who>: bad sizes M=... N=... ..." set.
int check_gemv_sizes(const char* who, int64_t M, int64_t max_m, int64_t N, int64_t K, int64_t Kp,
                     int group_size, int dtype);

// A multi-weight launch's checks (simt, pc), in two parts because a workspace query has sizes but
// no pointers. check_segs: 1..kMaxSeg weights, each passing check_gemv_sizes with its Ns[i]
// (stored in seg[i].N); returns log2(group_size), or -1 with the message set. set_seg_pointers:
// x and every weight's pointers non-null (biases may be), qweights 16-byte aligned, stored in
// seg[i]; returns AWQ_OK or AWQ_ERR_ARG with the message set.
int check_segs(const char* who, Int4Seg (&seg)[kMaxSeg], int nseg, const int64_t* Ns, int64_t M, int64_t max_m,
               int64_t K, int64_t Kp, int group_size, int dtype);
int set_seg_pointers(const char* who, Int4Seg (&seg)[kMaxSeg], int nseg, const void* x,
                     const uint8_t* const* qweights, const void* const* scales, const uint8_t* const* zeros,
                     const void* const* biases, void* const* ys);

// Checks the launch just made and converts a CUDA error into AWQ_ERR_CUDA with its name.
int check_launch(const char* what);

// What the decode kernels' plans read of the current device (simt, fold): its index, SM count,
// and shared memory a SM, a block (opt-in) and reserved a block. Read once per device.
struct DeviceSmem {
  int dev = 0, major = 0, sms = 0, smem_sm = 0, smem_optin = 0, smem_reserved = 0;
};
// Points `out` at the current device's limits; AWQ_OK, or the CUDA error with its message set.
int device_smem(const DeviceSmem*& out);

// Programmatic dependent launch (sm_90; csrc/NOTES.md, session 14). A decode kernel launched with
// it may start while the kernel before it in the stream is still running: it requests its first
// weights (constants of the graph), then pdl_wait() returns once that kernel has finished and its
// writes are visible. Nothing that another kernel writes may be read, and nothing at all written,
// before pdl_wait(). pdl_trigger() lets the next kernel start early in the same way. Both are
// no-ops where the launch had no such attribute, and below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether a decode kernel of m tokens launches with programmatic dependent launch: on an sm_90+
// device, at m <= kPdlMaxM, or m <= n where $AWQ_PDL=n (0: never; experiments). Read on every
// call, so a benchmark can compare settings in one process; a CUDA graph keeps the setting of its
// capture. kPdlMaxM is measured: on an H200, with it at every M (clusters excepted), 7B decode
// gained 4.2% at batch 1 and lost 1.1% at batch 8 (13B: +4.9%, -2.2%; benchmarks/RESULTS.md,
// section 3, session 14).
constexpr int kPdlMaxM = 1;
bool pdl_enabled(const DeviceSmem& d, int m);

// A decimal environment variable ($AWQ_* experiment switches, read on every call), or `dflt` where
// it is unset, empty or not a number.
long env_long(const char* name, long dflt);

// Whether a thread-block cluster of `size` blocks may launch with programmatic dependent launch
// (where pdl_enabled allows it at all): size <= kPdlMaxCluster, or size <= n where
// $AWQ_PDL_CLUSTER=n (0: never; experiments; read on every call). Measured on an H200 (7B decode,
// RESULTS.md section 3, session 17): clusters of 2 (q/k/v at one token, whose plan is 2 K slices)
// gain 1.8-3.1% at batch 1 (two calls); up to 8 (the attention's too): -0.3% against none. Launched early, a
// larger cluster waits for `size` free SMs of one GPC while the kernel before it drains (7B's down
// projection at batch 8, clusters of 5: 22.4 us instead of 15.6; csrc/NOTES.md, session 14).
constexpr int kPdlMaxCluster = 2;
bool pdl_cluster_enabled(int size);

// Under programmatic dependent launch a grid's blocks are placed as the kernel before it frees its
// SMs, so a grid of fewer blocks than the SMs hold would crowd onto the SMs freed first (3 a SM
// where 1.5 was the plan: csrc/NOTES.md, session 14). Returns the dynamic shared memory (>= smem)
// that keeps every SM to ceil(blocks / SMs) blocks of a kernel with no static shared memory.
size_t spread_smem(const DeviceSmem& d, long long blocks, size_t smem);

// A launch's configuration for cudaLaunchKernelEx: grid, block, dynamic shared memory and stream,
// plus a cluster of cluster_y blocks along y where cluster_y > 1, and programmatic dependent launch
// where pdl. Not copyable: cfg points at attr.
struct LaunchCfg {
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = {};
  LaunchCfg(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int cluster_y, bool pdl) {
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    if (cluster_y > 1) {
      attr[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
      attr[cfg.numAttrs].val.clusterDim.x = 1;
      attr[cfg.numAttrs].val.clusterDim.y = cluster_y;
      attr[cfg.numAttrs].val.clusterDim.z = 1;
      ++cfg.numAttrs;
    }
    if (pdl) {
      attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[cfg.numAttrs].val.programmaticStreamSerializationAllowed = 1;
      ++cfg.numAttrs;
    }
  }
  LaunchCfg(const LaunchCfg&) = delete;
  LaunchCfg& operator=(const LaunchCfg&) = delete;
};

// The two activation types. kMagic is the 16-bit pattern whose low mantissa bits a nibble can
// be OR-ed into to read as (kBase + q) exactly: bf16 128.0 has a 7-bit mantissa of ulp 1, fp16
// 1024.0 a 10-bit one of ulp 1. That turns int -> float into one LOP3 per two weights.
template <typename T> struct Half2Traits;
template <> struct Half2Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x4300u;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <> struct Half2Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x6400u;
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};

// silu(g) * u of one activation in fp32, rounded once to T, as a fused elementwise kernel makes
// it (the folded GEMV's pair mode: a gated MLP's gate and up projections in one launch).
template <typename T>
__device__ __forceinline__ T silu_mul(T g, T u) {
  const float a = Half2Traits<T>::to_float(g);
  return Half2Traits<T>::from_float(a / (1.f + expf(-a)) * Half2Traits<T>::to_float(u));
}

// Llama's rotary embedding of one pair (x0, x1) = (t[j], t[j + D/2]) with (c0, c1), (s0, s1) the
// cos and sin at j and j + D/2: y0 = x0 c0 - x1 s0, y1 = x1 c1 + x0 s1 in fp32, each product and
// the sum rounded as torch's fp32 ops round them (no FMA), then once to T (awq_rope_cache and the
// folded GEMV's rope mode, which must agree bit for bit).
template <typename T>
__device__ __forceinline__ void rotate_pair(T x0, T x1, T c0, T c1, T s0, T s1, T& y0, T& y1) {
  auto f = [](T v) { return Half2Traits<T>::to_float(v); };
  y0 = Half2Traits<T>::from_float(__fsub_rn(__fmul_rn(f(x0), f(c0)), __fmul_rn(f(x1), f(s0))));
  y1 = Half2Traits<T>::from_float(__fadd_rn(__fmul_rn(f(x1), f(c1)), __fmul_rn(f(x0), f(s1))));
}

// (a & b) | c in one instruction; the LUT byte is (0xF0 & 0xCC) | 0xAA.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// Dequantizes the 8 nibbles of one 32-bit word (nibble i = weight k0 + i) into four half2
// registers p[i] = ((q_i - z) * s, (q_{i+4} - z) * s). The pairing (i, i+4) is what one mask
// extracts per shift; kernels pair activations the same way instead of reordering weights.
// (q + kBase) - (z + kBase) is an exact small integer, so the only rounding is the multiply by s:
// the result equals awq_compile.quant.dequantize computed in T, bit for bit.
// zz: (kMagic | z) in both halves; ss: the scale's bits in both halves.
template <typename T>
__device__ __forceinline__ void dequant8(uint32_t w, uint32_t zz, uint32_t ss, uint32_t (&p)[4]) {
  using T2 = typename Half2Traits<T>::T2;
  constexpr uint32_t kMagic2 = Half2Traits<T>::kMagic * 0x10001u;
  const T2 z2 = *reinterpret_cast<const T2*>(&zz);
  const T2 s2 = *reinterpret_cast<const T2*>(&ss);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t v = and_or(w >> (4 * i), 0x000F000Fu, kMagic2);
    T2 d = __hmul2(__hsub2(*reinterpret_cast<T2*>(&v), z2), s2);
    p[i] = *reinterpret_cast<uint32_t*>(&d);
  }
}

// 16-byte streaming load of weights (read once: no L1 allocation). L2_256 also asks the L2 for the
// whole 256-byte run (the CUDA-core GEMV reads rows in such runs).
template <bool L2_256 = false>
__device__ __forceinline__ uint4 ld_stream(const uint8_t* p) {
  uint4 v;
  if (L2_256)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// d += A B on the tensor cores, m16n8k16, fp32 accumulate, A and B in T (fragments as registers).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1);

// volatile keeps ptxas from hoisting every dequantized fragment ahead of its mma (which blows
// the register budget); the order inside the warp is what the data dependencies need anyway.
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                        uint32_t a2, uint32_t a3, uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                 uint32_t a2, uint32_t a3, uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The tensor-core step of the decode kernels that feed mma.m16n8k16 "swap AB" (weights are A, the
// tokens the 8 columns of B): c[h] += word j of one 32-k chunk of rows g (q0) and g + 8 (q1) times
// the lane's token's 8 activations of that word (v); h = 0 / 1 are two independent mma chains.
// zz*, ss*: zero and scale as dequant8 takes them. The k permutation this implies is described in
// int4_gemv_pc.cu.
template <typename T>
__device__ __forceinline__ void mma_word(float (&c)[2][4], uint32_t q0, uint32_t q1, uint32_t zz0, uint32_t ss0,
                                         uint32_t zz1, uint32_t ss1, const uint4& v) {
  uint32_t p0[4], p1[4];  // pairs (k_i, k_{i+4}) of the word, rows g and g + 8
  dequant8<T>(q0, zz0, ss0, p0);
  dequant8<T>(q1, zz1, ss1, p1);
  const uint32_t xp[4] = {__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                          __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632)};
#pragma unroll
  for (int h = 0; h < 2; ++h)
    mma16816<T>(c[h], p0[2 * h], p1[2 * h], p0[2 * h + 1], p1[2 * h + 1], xp[2 * h], xp[2 * h + 1]);
}


// 16-byte cp.async global -> shared (L1 bypassed, L2 asked for the 256-byte run), its commit and
// wait: the weight rings of the simt and fold kernels.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
               ::"r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// A scale's raw 16 bits (the low half of `raw`) as fp32.
__device__ __forceinline__ float scale_to_float(uint32_t raw, __nv_bfloat16*) { return __uint_as_float(raw << 16); }
__device__ __forceinline__ float scale_to_float(uint32_t raw, __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
}

// The split-K sum of the multi-weight decode kernels (simt, fold), run by a second launch with
// blockIdx.y the token: y = the n_ks slices' fp32 partials (ws[n_ks][M][rows]) summed in slice
// order, + bias, rounded to T. Workspace rows are tile rows (TR a tile): a weight's rows start at
// its first tile, and rows past its N are skipped.
template <typename T, int TR>
__device__ __forceinline__ void sum_slices(const Int4Seg (&seg)[kMaxSeg], int nseg, const float* ws, int rows,
                                           int M, int n_ks) {
  const int m = blockIdx.y;
  const size_t slice = (size_t)M * rows;
  for (int wrow = blockIdx.x * blockDim.x + threadIdx.x; wrow < rows; wrow += gridDim.x * blockDim.x) {
    const Int4Seg& sg = seg[seg_of(seg, nseg, wrow / TR)];
    const int row = wrow - sg.tile0 * TR;
    if (row >= sg.N) continue;
    const float* p = ws + (size_t)m * rows + wrow;
    float v = 0.f;
    for (int k = 0; k < n_ks; ++k) v += p[k * slice];
    if (sg.bias) v += Half2Traits<T>::to_float(static_cast<const T*>(sg.bias)[row]);
    static_cast<T*>(sg.y)[(size_t)m * sg.N + row] = Half2Traits<T>::from_float(v);
  }
}

// A residual add + RMSNorm (awq_norm_in): h = T(res + d) with d = delta, or the K-slice partials
// summed in order + part_bias rounded to T, and x = T(gamma * T(h * rsqrt(mean(h^2) + eps))).
// Made in front of a projection (awq_int4_gemm_fold_glu / _rope with a norm: x is not read but
// made while it is staged, and the blocks of column 0 write h) or alone (awq_add_rms_norm).
// K % 8 == 0, every pointer 16-byte aligned.
struct NormIn {
  const void* res;
  const void* delta;
  const float* part;
  const void* part_bias;
  const void* gamma;  // null: no norm
  void* h;
  int slices;
  float eps;
};

// The checked NormIn of an awq_norm_in for rows of K (AWQ_ERR_ARG with a message naming `who`).
int norm_in(NormIn& out, const awq_norm_in* nm, int K, const char* who);

// h = T(res + d) for the 8 k from k of token m (NormIn): d = delta, or the partials of the K
// slices summed in slice order, + part_bias, rounded to T (int4_linear_partials' graph sum).
template <typename T>
__device__ __forceinline__ uint4 load_h_word(const NormIn& nm, int M, int K, int m, int k) {
  const size_t off = (size_t)m * K + k;
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(nm.res) + off));
  float d[8];
  if (nm.part) {
#pragma unroll
    for (int i = 0; i < 8; ++i) d[i] = 0.f;
    for (int sl = 0; sl < nm.slices; ++sl) {
      const float4* p = reinterpret_cast<const float4*>(nm.part + ((size_t)sl * M + m) * K + k);
      const float4 lo = __ldg(p), hi = __ldg(p + 1);
      d[0] += lo.x; d[1] += lo.y; d[2] += lo.z; d[3] += lo.w;
      d[4] += hi.x; d[5] += hi.y; d[6] += hi.z; d[7] += hi.w;
    }
    uint4 bw = make_uint4(0u, 0u, 0u, 0u);
    if (nm.part_bias) bw = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(nm.part_bias) + k));
    const T* bb = reinterpret_cast<const T*>(&bw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (nm.part_bias) d[i] += Half2Traits<T>::to_float(bb[i]);
      d[i] = Half2Traits<T>::to_float(Half2Traits<T>::from_float(d[i]));
    }
  } else {
    const uint4 dv = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(nm.delta) + off));
    const T* dd = reinterpret_cast<const T*>(&dv);
#pragma unroll
    for (int i = 0; i < 8; ++i) d[i] = Half2Traits<T>::to_float(dd[i]);
  }
  const T* rr = reinterpret_cast<const T*>(&r);
  uint4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = Half2Traits<T>::from_float(Half2Traits<T>::to_float(rr[i]) + d[i]);
  return out;
}

// x = T(gamma * T(h * r)) for a word of 8 values (r = 1 / rms of h's row): the norm's output, as
// the folded GEMV's prologue and awq_add_rms_norm make it.
template <typename T>
__device__ __forceinline__ uint4 norm_word(const uint4& hw, const uint4& gw, float r) {
  const T* h = reinterpret_cast<const T*>(&hw);
  const T* g = reinterpret_cast<const T*>(&gw);
  uint4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const T n = Half2Traits<T>::from_float(Half2Traits<T>::to_float(h[i]) * r);
    o[i] = Half2Traits<T>::from_float(Half2Traits<T>::to_float(g[i]) * Half2Traits<T>::to_float(n));
  }
  return out;
}
}  // namespace awq
