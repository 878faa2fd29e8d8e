// Tensor-core INT4 decode kernel for M = 2..8 tokens (int4 x fp16/bf16), one wave of warps.
//
//     y[m, n] = sum_{k < K} x[m, k] * (q[n, k] - z[n, k/g]) * s[n, k/g]  +  bias[n]
//
// straight from the NK_U8 layout (docs/format.md), without repacking.
//
// Why this shape (benchmarks/cuda/mem_patterns.cu, csrc/NOTES.md "Register-streaming tensor-core
// kernel"): on an H200 a bare 16-byte-load walk over a 117 MB weight reads at 3.2-3.4 TB/s with
// 32 warps a SM, 3.0-3.2 with 16 and 2.3-2.6 with 8, whatever the row order, burst length or
// prefetch depth. So: <= 64 registers (4 blocks of 8 warps a SM), loads straight into registers
// and the other warps hide the latency (a register ring or a cp.async ring cost occupancy and
// measured slower), and one wave: K is split across warps until tiles x splits fill the resident
// warps, so no SM idles in a tail.
//
// Mapping. A warp owns a tile of 16 output rows and a range of K. In a step, lane (g, t) =
// (lane / 4, lane % 4) loads U chunks of 16 bytes (32 k each) of row g and of row g + 8; chunk u
// is 4 * (U * step + u) + t, so an instruction covers 64 contiguous bytes of 8 rows and a step
// 64 * U. mma.m16n8k16 ("swap AB": weights are A, tokens the 8 columns of B) sums over 16
// k-slots, and any permutation of k works as long as A and B agree: slots (2t, 2t + 1) of mma
// 2j + h take the weight pair (8j + 2h, 8j + 2h + 4) of lane t's chunk and slots (2t + 8, 2t + 9)
// the pair (8j + 2h + 1, 8j + 2h + 5), which is what one LOP3 extracts from word j (dequant8 in
// int4_common.cuh). The B fragment of lane (g, t) is token g's x over the same 32 k (16-byte
// loads, one PRMT per pair), so every lane reads only its own weights and no shared memory is
// used until the K-split sums.
//
// Numerics: dequant8 rounds (q - z) * s once to T (bit-identical to quant.dequantize in T); the
// tensor cores multiply and accumulate in fp32 (two independent chains); K-split partials are
// added in a fixed order (deterministic, no atomics).
//
// Measured (csrc/NOTES.md): 5-15% faster than the cp.async mma kernel at M = 2..8 for N <= 8192,
// slower for N = 28672 and at M = 1 (the CUDA-core GEMV), so _cuda.py dispatches it only there.
// Limitations: N * Kp / 2 < 2^31; qweight 16-byte aligned; x read with 16-byte loads only when
// K % 8 == 0 and x is 16-byte aligned (else element by element). Only sm_90 was run.
#include <algorithm>

#include "int4_common.cuh"

namespace awq {
namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kMaxM = 8;

struct TcArgs : Int4Operands {
  int M, N, K, Kp, groups, log2g, nchunks;
  int ksplit;       // warps per tile (K ranges), a power of two <= kWarps
  int steps_warp;   // steps per K range
  bool x_vec;
};

// Token row xr's 8 activations at k (zero beyond K), as 4 registers of 2 values.
template <typename T>
__device__ __forceinline__ uint4 load_x8(const T* xr, int k, const TcArgs& a) {
  if (a.x_vec && k + 8 <= a.K) return __ldg(reinterpret_cast<const uint4*>(xr + k));
  uint16_t v[8];
  const uint16_t* xu = reinterpret_cast<const uint16_t*>(xr);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = k + i < a.K ? xu[k + i] : 0;
  return make_uint4(v[0] | (uint32_t)v[1] << 16, v[2] | (uint32_t)v[3] << 16, v[4] | (uint32_t)v[5] << 16,
                    v[6] | (uint32_t)v[7] << 16);
}

// The raw scale and zero of each of a step's chunks, rows g and g + 8.
template <int U>
struct ScaleZero {
  uint32_t s0[U], s1[U], z0[U], z1[U];
};

template <int U>
__device__ __forceinline__ void load_sz(ScaleZero<U>& sz, const TcArgs& a, uint32_t goff0, uint32_t goff1,
                                        int chunk0) {
  const uint16_t* s = static_cast<const uint16_t*>(a.scales);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int chunk = min(chunk0 + 4 * u, a.nchunks - 1);  // past Kp: any valid group, x is 0
    const uint32_t gi = (uint32_t)(chunk * 32) >> a.log2g;
    sz.s0[u] = __ldg(s + goff0 + gi);
    sz.s1[u] = __ldg(s + goff1 + gi);
    sz.z0[u] = __ldg(a.zeros + goff0 + gi);
    sz.z1[u] = __ldg(a.zeros + goff1 + gi);
  }
}

// c[h] += the step's products; h = 0 / 1 are two independent mma chains. xr: this lane's token
// row (lane / 4), xv: whether that token exists (x is taken as 0 otherwise).
template <typename T, int U>
__device__ __forceinline__ void compute_step(float (&c)[2][4], const uint4 (&w0)[U], const uint4 (&w1)[U],
                                             const ScaleZero<U>& sz, const TcArgs& a, const T* xr, bool xv,
                                             int chunk0) {
  constexpr uint32_t kMagic = Half2Traits<T>::kMagic;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int chunk = chunk0 + 4 * u;
    const bool valid = chunk < a.nchunks;
    const uint32_t ss0 = sz.s0[u] * 0x10001u, ss1 = sz.s1[u] * 0x10001u;
    const uint32_t zz0 = (kMagic | sz.z0[u]) * 0x10001u, zz1 = (kMagic | sz.z1[u]) * 0x10001u;
    const uint32_t q0[4] = {w0[u].x, w0[u].y, w0[u].z, w0[u].w};
    const uint32_t q1[4] = {w1[u].x, w1[u].y, w1[u].z, w1[u].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint4 xw = make_uint4(0u, 0u, 0u, 0u);  // past Kp or past M: x = 0, whatever W holds there
      if (xv && valid) xw = load_x8<T>(xr, chunk * 32 + 8 * j, a);
      mma_word<T>(c, q0[j], q1[j], zz0, ss0, zz1, ss1, xw);
    }
  }
}

// Shared memory of a block: the K-split partial sums, [warp][e][lane].
constexpr size_t kSmemBytes = (size_t)kWarps * 4 * 32 * sizeof(float);

// Whether the launch of M tokens also takes programmatic dependent launch where pdl_enabled would
// not: M <= n where $AWQ_PDL_TC=n (default kTcPdlMaxM; 0 for never; read on every call). The tc
// kernel serves 7B's o projection at M = 2..8, which follows our decode attention (it lets its
// dependents launch at once), so that launch requests its first step's weights during the
// attention. H200 (session 18): 7B decode at batch 8 +2.1%, 13B +0.9%; batch 1 unchanged.
// Only for weights of at most kTcPdlMaxBytes packed bytes: on larger ones it costs more than it
// saves. H200, session 21, M = 2 / 4 / 8, the same kernel with and without it: graph-timed (20
// launches a graph) 4096x4096 8.2-8.5 against 9.5-9.7 us, 8192x8192 21.2-23.1 against
// 20.5-22.5, 28672x8192 65.9 / 69.2 / 85.9 against 59.6 / 62.2 / 68.8; do_bench 8192x8192
// 27.6-29.6 against 24.6-27.1, 28672x8192 74.7 / 77.8 / 93.4 against 65.1 / 69.6 / 75.7.
// 7B's and 13B's o projections (8 and 12.5 MiB) keep it.
constexpr long kTcPdlMaxM = 8;
constexpr long long kTcPdlMaxBytes = 16ll << 20;
bool tc_pdl_enabled(const DeviceSmem& d, int m, long long weight_bytes) {
  return d.major >= 9 && m <= env_long("AWQ_PDL_TC", kTcPdlMaxM) && weight_bytes <= kTcPdlMaxBytes;
}

template <typename T, int U, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) gemv_tc_kernel(const TcArgs a) {
  extern __shared__ float4 smem[];  // the K-split partials
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x * (kWarps / a.ksplit) + warp / a.ksplit, part = warp % a.ksplit;
  const int row0 = tile * 16 + g, row1 = row0 + 8;
  const uint32_t r0 = min(row0, a.N - 1), r1 = min(row1, a.N - 1);
  const uint8_t* q0 = a.qweight + (size_t)r0 * (a.Kp / 2);
  const uint8_t* q1 = a.qweight + (size_t)r1 * (a.Kp / 2);
  const uint32_t goff0 = r0 * (uint32_t)a.groups, goff1 = r1 * (uint32_t)a.groups;
  const bool xv = g < a.M;  // the token of this lane's B fragment
  const T* xr = static_cast<const T*>(a.x) + (size_t)min(g, a.M - 1) * a.K;
  float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const int s0 = part * a.steps_warp, n = max(0, min(a.steps_warp, (a.nchunks + 4 * U - 1) / (4 * U) - s0));
  uint4 w0[U], w1[U];
  ScaleZero<U> sz;
  auto load = [&](int i) {  // step i's weights, scales and zeros (graph constants)
    const int chunk0 = 4 * U * (s0 + i) + t;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = min(chunk0 + 4 * u, a.nchunks - 1);  // past Kp: x is 0 there
      w0[u] = ld_stream(q0 + chunk * 16);
      w1[u] = ld_stream(q1 + chunk * 16);
    }
    load_sz<U>(sz, a, goff0, goff1, chunk0);
  };
  // The first step's loads go out before the wait (pdl_wait() in step 0): with programmatic
  // dependent launch, while the kernel before (whose output x is) still runs. At 7B's o
  // projection and M = 8 a warp has two steps (8 K splits of 16 steps), so that is half of its
  // weights.
  if (n == 0) {
    pdl_wait();
    pdl_trigger();
  }
  for (int i = 0; i < n; ++i) {  // load, then compute: the other warps hide the latency
    load(i);
    if (i == 0) {
      pdl_wait();
      pdl_trigger();
    }
    compute_step<T, U>(c, w0, w1, sz, a, xr, xv, 4 * U * (s0 + i) + t);
  }

  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int e = 0; e < 4; ++e) red[(warp * 4 + e) * 32 + lane] = c[0][e] + c[1][e];
  __syncthreads();
  if (part != 0) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float v = 0.f;
    for (int w = warp; w < warp + a.ksplit; ++w) v += red[(w * 4 + e) * 32 + lane];
    // c0, c1: row g, tokens 2t, 2t + 1; c2, c3: row g + 8.
    const int row = e < 2 ? row0 : row1, tok = 2 * t + (e & 1);
    if (row < a.N && tok < a.M) {
      if (a.bias) v += Half2Traits<T>::to_float(static_cast<const T*>(a.bias)[row]);
      static_cast<T*>(a.y)[(size_t)tok * a.N + row] = Half2Traits<T>::from_float(v);
    }
  }
}

// Picks the K split: the smallest power of two that, with the tiles, fills the resident warps
// (one wave), but no more splits than leave each warp at least one step.
template <typename T, int U, int MINB>
int launch_cfg(TcArgs a, cudaStream_t stream) {
  auto kernel = gemv_tc_kernel<T, U, MINB>;
  constexpr size_t smem = kSmemBytes;
  static int occ[64] = {};  // blocks per SM, per device
  static int sms[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return check_launch("cudaGetDevice");
  if (occ[dev & 63] == 0) {
    const DeviceSmem* d = nullptr;
    if (int e = device_smem(d)) return e;
    // the opt-in maximum, not smem: spread_smem may pad a launch's request
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d->smem_optin) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ[dev & 63], kernel, kThreads, smem) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms[dev & 63], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return check_launch("gemv_tc setup");
    if (occ[dev & 63] == 0) return fail(AWQ_ERR_CUDA, "gemv_tc: %zu bytes of shared memory do not fit", smem);
  }
  const long long slots = (long long)sms[dev & 63] * occ[dev & 63] * kWarps;
  const int tiles = (a.N + 15) / 16, steps = (a.nchunks + 4 * U - 1) / (4 * U);
  int ks = 1;
  while (ks < kWarps && (long long)tiles * ks < slots && ks * 2 <= steps) ks *= 2;
  a.ksplit = ks;
  a.steps_warp = (steps + ks - 1) / ks;
  const int tiles_block = kWarps / ks;
  const DeviceSmem* d = nullptr;
  if (int e = device_smem(d)) return e;
  const int blocks = (tiles + tiles_block - 1) / tiles_block;
  const bool pdl = pdl_enabled(*d, a.M) || tc_pdl_enabled(*d, a.M, (long long)a.N * a.Kp / 2);
  const LaunchCfg l(blocks, kThreads, pdl ? spread_smem(*d, blocks, smem) : smem, stream, 1, pdl);
  cudaLaunchKernelEx(&l.cfg, kernel, a);
  return check_launch("gemv_tc_kernel");
}

// <U = 2 chunks a row a step, 4 blocks a SM>: measured against U = 1 and 4, 3 blocks a SM and
// the cp.async ring (csrc/NOTES.md).
template <typename T>
int launch(const TcArgs& a, cudaStream_t stream) {
  return launch_cfg<T, 2, 4>(a, stream);
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_int4_tc_max_m(void) { return awq::kMaxM; }

extern "C" int awq_int4_gemm_tc(const void* x, const uint8_t* qweight, const void* scales,
                                const uint8_t* zeros, const void* bias, void* y, int64_t M, int64_t N,
                                int64_t K, int64_t Kp, int group_size, int dtype, void* stream) {
  using namespace awq;
  const int log2g = check_gemv_sizes("awq_int4_gemm_tc", M, kMaxM, N, K, Kp, group_size, dtype);
  if (log2g < 0) return AWQ_ERR_ARG;
  if (!x || !qweight || !scales || !zeros || !y || ((uintptr_t)qweight & 15))
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_tc: null pointer or qweight not 16-byte aligned");
  TcArgs a{};
  a.x = x; a.qweight = qweight; a.scales = scales; a.zeros = zeros; a.bias = bias; a.y = y;
  a.M = (int)M; a.N = (int)N; a.K = (int)K; a.Kp = (int)Kp;
  a.groups = (int)(Kp / group_size);
  a.log2g = log2g;
  a.nchunks = (int)(Kp / 32);
  a.x_vec = (K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? launch<__nv_bfloat16>(a, s) : launch<__half>(a, s);
}
