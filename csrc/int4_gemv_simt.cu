// Weight-streaming INT4 x half/bf16 GEMV for M = 1..8 tokens (decode), on the CUDA cores (FFMA).
//
// Computes
//     y[m, n] = sum_{k < K} x[m, k] * (q[n, k] - z[n, k/g]) * s[n, k/g]  +  bias[n]
// with fp32 products and sums, directly from the NK_U8 layout (docs/format.md, csrc/awq_int4.h):
//     qweight uint8 [N, Kp/2] (k = 2b low nibble, 2b+1 high), scales T [N, Kp/g],
//     zeros uint8 [N, Kp/g], x T [M, K], y T [M, N], T = fp16 or bf16, g in {32, 64, 128}.
//
// Design. At M <= 8 the op is a stream of N*Kp/2 weight bytes with 2*M flops per weight: the
// goal is the DRAM floor, and the instructions per weight decide whether it is reachable
// (csrc/NOTES.md has the count).
//   * Per 16-byte chunk (32 k, always inside one group since g >= 32) a lane computes
//     A = sum_k (128 + q_k) * x_k in fp32, then acc += s * (A - (128 + z) * Sx), Sx = sum_k x_k
//     of the chunk, precomputed once per block. So the zero point and scale cost 2 FFMA per
//     chunk and token, not per weight.
//   * Nibble -> float is one PRMT per weight: masking a word with 0x0F0F0F0F (and its >> 4)
//     leaves one nibble per byte; PRMT moves byte i into bits 16-23 under the exponent byte of
//     128.0f (0x43000000), which reads as exactly 128 + q. No I2F, no FADD: 11 ALU instructions
//     per 8 weights, plus M FFMA per weight.
//   * Lane (rg, c8) = (lane / LK, lane % LK): per load instruction a warp reads 32 / LK rows x
//     16 * LK contiguous bytes (whole lines), and lanes with the same c8 read the same x. Each
//     lane keeps R rows and reuses its x registers across them (configurations: Cfg below).
//   * x is staged once per block as fp32 in shared memory, 36 floats per chunk (32 x, Sx, 3 pad:
//     chunks 8 apart land on distinct banks), zero beyond K: padded columns and clamped tail
//     loads contribute exactly 0, whatever the weight bytes there hold.
//   * Weights are streamed with cp.async (16 bytes a lane, L1 bypassed, L2 256-byte prefetch) into
//     a per-warp shared-memory ring of P steps (P - 1 in flight while a step computes); each lane
//     reads back only what it copied, so no barrier is needed. Scales and zeros ride in a
//     register ring beside it. The shared ring (instead of registers) is what lets 3 blocks a SM
//     fit at M <= 2 (csrc/NOTES.md, session 7: q/k/v 16.7 -> 14.4 us on an H100).
//   * Work: blocks of 8 warps; blockIdx.y is a K slice (as long as shared memory and the
//     parallelism target allow), each warp takes tiles of 4R rows strided over the slice's warps.
//     One slice: the epilogue writes y (+ bias). Several: fp32 partials per slice go to a
//     workspace and a second kernel sums them in slice order. No atomics: results are
//     bit-for-bit reproducible run to run.
//   * Up to 4 weights that read the same x (q/k/v, gate/up) run in one launch, their tiles
//     numbered one after another (awq_int4_gemm_simt_multi).
//
// Limitations:
//   1. Under CUDA graphs on an H100, M = 1: 53 us at 8192 x 28672 (77% of a 3.0 TB/s floor), 8.7
//      at 4096 x 4096 (33%); not the 85% target. Each extra token adds ~15 us, so _cuda.py sends
//      only M = 1 here. M <= 8 is accepted (awq_int4_simt_max_m) and tested.
//   2. N * Kp / 2 < 2^31 (32-bit row offsets are not used, but tile and chunk counts are int).
//   3. qweight's base pointer must be 16-byte aligned; x is read with 16-byte loads only if
//      K % 8 == 0 and x is 16-byte aligned, else element by element.
//   4. Only sm_90 was run; sm_80 builds the same code (shared memory budget read off the device).
//
// Tuning notes (csrc/NOTES.md, "SIMT decode kernel" and session 7): ~2.9 instructions per weight
// at M = 1. With the math cut to half (wrong results, timing only) 8192 x 28672 drops from 53 to
// 45 us, and a memory-only build runs at 43 us (95% of a copy): the math not hiding under the
// loads is what is missing. Deeper rings (P = 3..6) and longer row bursts did not help.
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "int4_common.cuh"

namespace awq {
namespace {

constexpr int kThreads = 256, kWarps = 8;  // 8 warps: x staging amortized over 8 * 4R rows
constexpr int kXStride = 36;               // floats per chunk in shared memory (32 x, Sx, pad)
constexpr uint32_t kMagic = 0x43000000u;   // 128.0f; a byte in bits 16-23 (< 16) adds exactly q
constexpr int kMaxM = 8;

// A kernel configuration.
//   LK: lanes along K per row, so 32 / LK rows per load instruction. LK = 32 reads a row as 512
//       contiguous bytes per instruction (long DRAM bursts), but an x load then serves 32 chunks
//       (4 shared-memory wavefronts); LK = 8 reads 4 rows x 128 B and an x load serves 8 chunks
//       (1 wavefront), which M >= 3 needs to stay under the shared-memory bandwidth.
//   R:  rows per lane; more rows share each x register (fewer shared loads per weight).
//   P:  ring depth (P - 1 steps of loads in flight while one step computes): the weights' ring
//       in shared memory, the scales' and zeros' in registers.
//   MINB: blocks per SM that ptxas must fit (caps registers) at M <= 2; 2 above, where the
//       accumulators need the registers (kernel_minb).
template <int LK_, int R_, int P_, int MINB_>
struct Cfg {
  static constexpr int LK = LK_, R = R_, P = P_, MINB = MINB_, RPI = 32 / LK_;
};
// The instantiated configurations (AWQ_SIMT_CFG=i picks one for experiments; default by M).
// Measured on an H200 (csrc/NOTES.md) against <32,2,3>, <8,4,2> and <8,2,3>, which were within
// 2-4% of these (M = 1: 55.5 us vs 56-58 for the R = 4 / P = 3 ones, 65 for R = 2 / LK = 8):
//   Cfg0: M <= 2, 4 rows per lane, 512-byte row reads (80 registers, 3 blocks per SM).
//   Cfg1: M >= 3, 2 rows per lane (R = 4 spills from M = 4 on), 1-wavefront x loads.
//   Cfg2: Cfg0 with a ring of 3 steps at 2 blocks a SM (experiments, session 18): under
//       programmatic dependent launch a warp then requests 2 steps before its wait instead of 1,
//       which at 7B's o projection at one token (2 steps a warp) is all of its weights, loaded
//       while our attention runs. Standalone, deeper rings did not help (above).
using Cfg0 = Cfg<32, 4, 2, 3>;
using Cfg1 = Cfg<8, 2, 2, 2>;
using Cfg2 = Cfg<32, 4, 3, 2>;
constexpr int kNumCfg = 3;
constexpr int default_cfg(int m) { return m <= 2 ? 0 : 1; }
template <class C, int M>
constexpr int kernel_minb() { return M <= 2 ? C::MINB : 2; }
// The weight ring in shared memory, per block: kWarps x P steps x R rows x 32 lanes x 16 bytes.
template <class C>
constexpr size_t ring_bytes() { return (size_t)kWarps * C::P * C::R * 32 * 16; }

struct SimtArgs {
  const void* x;
  Int4Seg seg[kMaxSeg];  // the weights (awq_int4_gemm_simt_multi)
  int nseg;
  float* ws;       // [n_ks, M, ws_rows] fp32 partials when n_ks > 1
  int ws_rows;     // N for one weight, else every tile's rows (tiles * rows a tile)
  int M, K, Kp, groups;
  int gshift;      // log2(g) - 5: chunk index -> group index
  int nchunks;     // Kp / 32
  int cps;         // chunks per K slice (multiple of 32); shared memory holds M * cps chunks
  int n_ks;        // K slices = gridDim.y
  int tiles;       // row tiles of RPI * R rows (one warp each), over all weights
  bool x_vec;
  bool partials_only;  // awq_int4_gemm_simt_partials: the slices' partials are the result
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 8 activations (16 bytes of T) -> fp32.
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8], __nv_bfloat16*) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = word(raw, i);
    v[2 * i] = __uint_as_float(w << 16);
    v[2 * i + 1] = __uint_as_float(w & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8], __half*) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = word(raw, i);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Stages x[:, chunks c0 .. c0+nck) as fp32 plus per-chunk sums; chunks nck .. cps-1 and columns
// >= K are zero. One thread per 8 activations; the 4 threads of a chunk are adjacent lanes.
template <typename T, int M>
__device__ void stage_x(float* xs, const SimtArgs& a, int c0, int nck) {
  const int units_tok = a.cps * 4, total = M * units_tok;
  const T* x = static_cast<const T*>(a.x);
  for (int base = 0; base < total; base += kThreads) {  // uniform trip count: shuffles below
    const int u = base + threadIdx.x;
    const int m = u / units_tok, rem = u - m * units_tok, ch = rem >> 2, q4 = rem & 3;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (u < total && ch < nck) {
      const int k = (c0 + ch) * 32 + q4 * 8;
      const T* xr = x + (size_t)m * a.K;
      if (a.x_vec && k + 8 <= a.K) {
        unpack8(*reinterpret_cast<const uint4*>(xr + k), v, static_cast<T*>(nullptr));
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (k + i < a.K) v[i] = Half2Traits<T>::to_float(xr[k + i]);
      }
    }
    float s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if (u < total) {
      float* d = xs + (m * a.cps + ch) * kXStride;
      reinterpret_cast<float4*>(d + q4 * 8)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(d + q4 * 8)[1] = make_float4(v[4], v[5], v[6], v[7]);
      if (q4 == 0) d[32] = s;
    }
  }
}

// What a lane keeps in registers of a pipeline stage: the scales and zeros of its R rows (their
// 16-byte weight chunks are in the shared ring until the step computes).
template <int R>
struct Stage {
  uint32_t s[R], z[R];
};

// A lane's rows as 32-bit offsets (N * Kp / 2 < 2^31): 2 registers per row, not 6 for
// pointers. In a multi-weight launch (MULTI) the tile's weight base pointers come along; a
// single-weight launch reads them from the kernel parameters, as they are the same for all tiles.
template <int R>
struct TileRows {
  const uint8_t* qweight;
  const uint16_t* scales;
  const uint8_t* zeros;
  uint32_t w[R];  // row * Kp / 2
  uint32_t g[R];  // row * groups
};

// Requests a step: the weights into this lane's slots of a ring stage (slot[r * 32 + lane]), the
// scales and zeros into st; one cp.async group a step.
template <int R, bool MULTI>
__device__ __forceinline__ void issue(Stage<R>& st, uint4* slot, const TileRows<R>& tr, const SimtArgs& a,
                                      int chunk) {
  const uint32_t c = min(chunk, a.nchunks - 1);  // tail lanes reload a valid chunk; x is 0 there
  const uint32_t gi = c >> a.gshift;
  const uint8_t* qw = MULTI ? tr.qweight : a.seg[0].qweight;
  const uint16_t* sc = MULTI ? tr.scales : static_cast<const uint16_t*>(a.seg[0].scales);
  const uint8_t* zp = MULTI ? tr.zeros : a.seg[0].zeros;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    cp_async16(slot + r * 32 + (threadIdx.x & 31), qw + (tr.w[r] + c * 16));
    st.s[r] = __ldg(sc + (tr.g[r] + gi));
    st.z[r] = __ldg(zp + (tr.g[r] + gi));
  }
  cp_async_commit();
}

// acc[r][m] += s * (sum_k (128 + q) x - (128 + z) * Sx) over one chunk; wc: the R rows' 16-byte
// chunks, xc: this chunk's x.
template <typename T, int M, int R>
__device__ __forceinline__ void compute(float (&acc)[R][M], const uint4 (&wc)[R], const Stage<R>& st,
                                        const float* xc, int tok_stride) {
  float A[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) A[r][m] = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float4 xa[M], xb[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      xa[m] = *reinterpret_cast<const float4*>(xc + m * tok_stride + 8 * j);
      xb[m] = *reinterpret_cast<const float4*>(xc + m * tok_stride + 8 * j + 4);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t w = word(wc[r], j);
      const uint32_t t0 = w & 0x0F0F0F0Fu, t1 = (w >> 4) & 0x0F0F0F0Fu;
      float f[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {  // byte b of t0 / t1: k = 8j + 2b / 8j + 2b + 1
        f[2 * b] = __uint_as_float(__byte_perm(t0, kMagic, 0x7044 | (b << 8)));
        f[2 * b + 1] = __uint_as_float(__byte_perm(t1, kMagic, 0x7044 | (b << 8)));
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        A[r][m] = fmaf(f[0], xa[m].x, A[r][m]);
        A[r][m] = fmaf(f[1], xa[m].y, A[r][m]);
        A[r][m] = fmaf(f[2], xa[m].z, A[r][m]);
        A[r][m] = fmaf(f[3], xa[m].w, A[r][m]);
        A[r][m] = fmaf(f[4], xb[m].x, A[r][m]);
        A[r][m] = fmaf(f[5], xb[m].y, A[r][m]);
        A[r][m] = fmaf(f[6], xb[m].z, A[r][m]);
        A[r][m] = fmaf(f[7], xb[m].w, A[r][m]);
      }
    }
  }
  float sx[M];
#pragma unroll
  for (int m = 0; m < M; ++m) sx[m] = xc[m * tok_stride + 32];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float sf = scale_to_float(st.s[r], static_cast<T*>(nullptr));
    const float zf = __uint_as_float(__byte_perm(st.z[r], kMagic, 0x7044));  // 128 + z
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = fmaf(sf, fmaf(-zf, sx[m], A[r][m]), acc[r][m]);
  }
}

template <typename T, int M, class C, bool MULTI>
__global__ void __launch_bounds__(kThreads, (kernel_minb<C, M>())) gemv_simt_kernel(const SimtArgs a) {
  constexpr int R = C::R, P = C::P, LK = C::LK, RPI = C::RPI, TR = RPI * R;
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  const int lane = threadIdx.x & 31, rg = lane / LK, c8 = lane % LK;
  const int ks = blockIdx.y, c0 = ks * a.cps, nck = min(a.cps, a.nchunks - c0);
  const int nsteps = (nck + LK - 1) / LK, tok_stride = a.cps * kXStride;
  const int slice_warps = gridDim.x * kWarps;
  int tile = blockIdx.x * kWarps + (threadIdx.x >> 5);
  auto seg = [&](int t) { return MULTI ? seg_of(a.seg, a.nseg, t) : 0; };

  TileRows<R> tr;
  auto set_rows = [&](int t) {
    const Int4Seg& sg = a.seg[seg(t)];
    tr.qweight = sg.qweight;
    tr.scales = static_cast<const uint16_t*>(sg.scales);
    tr.zeros = sg.zeros;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t row = min((t - sg.tile0) * TR + RPI * r + rg, sg.N - 1);
      tr.w[r] = row * (uint32_t)(a.Kp / 2);
      tr.g[r] = row * (uint32_t)a.groups;
    }
  };
  Stage<R> ring[P];
  // This warp's ring, after x. Every step commits one cp.async group, empty past the end, so
  // "step s has landed" is cp.async.wait_group(P - 1) once the P - 1 steps after it are requested.
  uint4* wring = reinterpret_cast<uint4*>(xs + M * a.cps * kXStride) + (threadIdx.x >> 5) * (P * R * 32);
  auto request = [&](int q, int slot, int chunk) {
    if (q < nsteps) issue<R, MULTI>(ring[slot], wring + slot * R * 32, tr, a, chunk);
    else cp_async_commit();
  };
  auto prime = [&](int t) {  // a tile's first P - 1 steps
    set_rows(t);
#pragma unroll
    for (int q = 0; q < P - 1; ++q) request(q, q, c0 + q * LK + c8);
  };
  // The first tile's loads are requested before x is staged, so the two latencies overlap; with
  // programmatic dependent launch, before the kernel this one depends on has finished.
  if (tile < a.tiles) prime(tile);
  pdl_wait();
  pdl_trigger();
  stage_x<T, M>(xs, a, c0, nck);
  __syncthreads();

  for (; tile < a.tiles; tile += slice_warps) {
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int s = 0; s < nsteps; s += P) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        // The slot refilled here was read (into registers, consumed) by the step before.
        request(s + p + P - 1, (p + P - 1) % P, c0 + (s + p + P - 1) * LK + c8);
        if (s + p < nsteps) {
          cp_async_wait<P - 1>();
          uint4 wc[R];
#pragma unroll
          for (int r = 0; r < R; ++r) wc[r] = wring[(p * R + r) * 32 + lane];
          compute<T, M, R>(acc, wc, ring[p], xs + ((s + p) * LK + c8) * kXStride, tok_stride);
        }
      }
    }
    // Sum the LK lanes of each row (fixed butterfly order), then lane c8 == 0 stores.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = acc[r][m];
#pragma unroll
        for (int o = 1; o < LK; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[r][m] = v;
      }
    const int sg_i = seg(tile), next = tile + slice_warps;
    const int row0 = (tile - a.seg[sg_i].tile0) * TR + rg;
    if (next < a.tiles) prime(next);  // next tile's loads before this tile's stores
    if (c8 == 0) {
      const Int4Seg& sg = a.seg[sg_i];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = row0 + RPI * r;
        if (row >= sg.N) continue;
        const float b = (a.n_ks == 1 && sg.bias) ? Half2Traits<T>::to_float(static_cast<const T*>(sg.bias)[row]) : 0.f;
        const int wrow = tile * TR + RPI * r + rg;  // the row in the workspace (= row for one weight)
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (a.n_ks == 1)
            static_cast<T*>(sg.y)[(size_t)m * sg.N + row] = Half2Traits<T>::from_float(acc[r][m] + b);
          else
            a.ws[((size_t)ks * M + m) * a.ws_rows + wrow] = acc[r][m];
        }
      }
    }
  }
}

// y = sum over slices (in slice order) + bias, rounded to T: one weight.
template <typename T>
__global__ void simt_finalize(const float* ws, const T* bias, T* y, int64_t total, int N, int n_ks) {
  pdl_wait();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int k = 0; k < n_ks; ++k) v += ws[k * total + i];
    if (bias) v += Half2Traits<T>::to_float(bias[i % N]);
    y[i] = Half2Traits<T>::from_float(v);
  }
}

// The same for several weights (int4_common.cuh, sum_slices).
template <typename T, int TR>
__global__ void simt_finalize_multi(const SimtArgs a) {
  pdl_wait();
  sum_slices<T, TR>(a.seg, a.nseg, a.ws, a.ws_rows, a.M, a.n_ks);
}

struct Plan {
  int n_ks = 0, cps = 0, tiles = 0, blocks = 0;
  int tile0[kMaxSeg] = {};
  size_t smem = 0;
};

// Slices K only as far as shared memory needs and parallelism wants: each extra slice adds a
// partial write/read of M*N floats and a second launch. The target is half the resident warps
// busy (1 tile each), or slices no shorter than 64 chunks. (Splitting a tile's K over the warps
// of one block instead, summed in shared memory in one launch, measured no faster at 4096x4096
// and 5% slower at 11008x4096 on an H100: csrc/NOTES.md, session 5.)
Plan make_plan(const SimtArgs& a, const DeviceSmem& d, int reg_occ, int rows_per_tile, int minb, size_t ring) {
  Plan p;
  for (int i = 0; i < a.nseg; ++i) {
    p.tile0[i] = p.tiles;
    p.tiles += (a.seg[i].N + rows_per_tile - 1) / rows_per_tile;
  }
  const size_t per_chunk = (size_t)a.M * kXStride * sizeof(float);
  // A block's share of shared memory at minb blocks a SM, or at fewer where the ring and 32
  // chunks of x do not fit that share (100 KB a SM on sm_86/89: a third leaves ~300 bytes
  // beside configuration 0's 32 KB ring).
  size_t share = 0;
  for (int b = minb; b >= 1 && share < ring + 32 * per_chunk; --b)
    share = std::min<size_t>(d.smem_optin, d.smem_sm / b - d.smem_reserved);
  if (share < ring + 32 * per_chunk) return p;
  const int max_cps = (int)((share - ring) / per_chunk) & ~31;
  auto round32 = [](int c) { return (c + 31) & ~31; };
  int n = (a.nchunks + max_cps - 1) / max_cps, occ = 1;
  for (;; ++n) {
    p.cps = std::min(round32((a.nchunks + n - 1) / n), max_cps);
    p.n_ks = (a.nchunks + p.cps - 1) / p.cps;
    p.smem = per_chunk * p.cps + ring;
    occ = std::max(1, std::min<int>(reg_occ, (int)(d.smem_sm / (p.smem + d.smem_reserved))));
    const long long slots = (long long)d.sms * occ * kWarps;
    if ((long long)p.tiles * p.n_ks * 2 >= slots || p.cps <= 64) break;
  }
  const long long slice_slots = std::max(1LL, (long long)d.sms * occ * kWarps / p.n_ks);
  const long long per_warp = (p.tiles + slice_slots - 1) / slice_slots;
  const long long warps = (p.tiles + per_warp - 1) / per_warp;
  p.blocks = (int)((warps + kWarps - 1) / kWarps);
  return p;
}

template <typename T, int M, class C, int CI>
int plan_for(const SimtArgs& a, int dtype, Plan& p) {
  const DeviceSmem* d = nullptr;
  if (int e = device_smem(d)) return e;
  const bool multi = a.nseg > 1;
  static int reg_occ[64][2][kMaxM + 1][kNumCfg][2];  // blocks per SM allowed by registers: (device, dtype, M, config, multi)
  int& occ = reg_occ[d->dev & 63][dtype][M][CI][multi];
  if (occ == 0) {
    auto kernel = multi ? gemv_simt_kernel<T, M, C, true> : gemv_simt_kernel<T, M, C, false>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d->smem_optin) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, 0) != cudaSuccess)
      return check_launch("gemv_simt setup");
  }
  p = make_plan(a, *d, occ, C::RPI * C::R, kernel_minb<C, M>(), ring_bytes<C>());
  if (p.n_ks == 0)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_simt: M=%d needs %d bytes of shared memory per 32 chunks, "
                "the device grants %d", a.M, a.M * kXStride * 4 * 32, d->smem_optin);
  return AWQ_OK;
}

// Workspace rows of a launch (SimtArgs::ws_rows) and the floats of workspace a plan needs.
int ws_rows(const SimtArgs& a, const Plan& p, int rows_per_tile) {
  return a.nseg == 1 ? a.seg[0].N : p.tiles * rows_per_tile;
}
int64_t ws_need(const SimtArgs& a, const Plan& p, int rows_per_tile) {
  return p.n_ks > 1 ? (int64_t)p.n_ks * a.M * ws_rows(a, p, rows_per_tile) : 0;
}

template <typename T, int M, class C, int CI>
int launch(SimtArgs a, int dtype, int64_t ws_floats, cudaStream_t stream) {
  constexpr int TR = C::RPI * C::R;
  Plan p;
  if (int e = plan_for<T, M, C, CI>(a, dtype, p)) return e;
  a.cps = p.cps; a.n_ks = p.n_ks; a.tiles = p.tiles;
  for (int i = 0; i < a.nseg; ++i) a.seg[i].tile0 = p.tile0[i];
  a.ws_rows = ws_rows(a, p, TR);
  const int64_t need = ws_need(a, p, TR);
  if (a.partials_only && p.n_ks < 2)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_simt_partials: M=%d N=%d K=%d is not split into K slices on this device",
                a.M, a.seg[0].N, a.K);
  if (need > 0 && (a.ws == nullptr || ws_floats < need))
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_simt: %d K slices need a workspace of %lld floats, got %lld",
                p.n_ks, (long long)need, (long long)ws_floats);
  const DeviceSmem* d = nullptr;
  if (int e = device_smem(d)) return e;
  const bool pdl = pdl_enabled(*d, a.M);
  {
    const size_t smem = pdl ? spread_smem(*d, (long long)p.blocks * p.n_ks, p.smem) : p.smem;
    const LaunchCfg l(dim3(p.blocks, p.n_ks), kThreads, smem, stream, 1, pdl);
    if (a.nseg > 1)
      cudaLaunchKernelEx(&l.cfg, gemv_simt_kernel<T, M, C, true>, a);
    else
      cudaLaunchKernelEx(&l.cfg, gemv_simt_kernel<T, M, C, false>, a);
  }
  if (int e = check_launch("gemv_simt_kernel")) return e;
  if (a.partials_only) return AWQ_OK;
  if (p.n_ks > 1 && a.nseg == 1) {
    const int64_t total = (int64_t)a.M * a.ws_rows;
    const LaunchCfg l((unsigned)std::min<int64_t>((total + 255) / 256, 4096), 256, 0, stream, 1, pdl);
    cudaLaunchKernelEx(&l.cfg, simt_finalize<T>, (const float*)a.ws, static_cast<const T*>(a.seg[0].bias),
                       static_cast<T*>(a.seg[0].y), total, a.ws_rows, p.n_ks);
  } else if (p.n_ks > 1) {
    const LaunchCfg l(dim3(std::min((a.ws_rows + 255) / 256, 1024), a.M), 256, 0, stream, 1, pdl);
    cudaLaunchKernelEx(&l.cfg, simt_finalize_multi<T, TR>, a);
  }
  return p.n_ks > 1 ? check_launch("simt_finalize") : AWQ_OK;
}

// Read on every call (a getenv costs ~100 ns), so a benchmark can switch configurations in-process.
int cfg_override() {
  const char* e = getenv("AWQ_SIMT_CFG");
  return e && *e ? atoi(e) : -1;
}

// Runs F<T, M, Cfg_i, i>::run for the configuration in use.
template <typename T, int M, template <typename, int, class, int> class F, typename... Args>
int by_cfg(Args&&... args) {
  const int o = cfg_override(), cfg = o >= 0 && o < kNumCfg ? o : default_cfg(M);
  switch (cfg) {
    case 0: return F<T, M, Cfg0, 0>::run(args...);
    case 2: return F<T, M, Cfg2, 2>::run(args...);
    default: return F<T, M, Cfg1, 1>::run(args...);
  }
}

template <typename T, int M, class C, int CI>
struct LaunchC {
  static int run(const SimtArgs& a, int dtype, int64_t ws, cudaStream_t s) { return launch<T, M, C, CI>(a, dtype, ws, s); }
};
template <typename T, int M, class C, int CI>
struct NeedC {
  static int run(const SimtArgs& a, int dtype, int64_t* out) {
    Plan p;
    if (int e = plan_for<T, M, C, CI>(a, dtype, p)) return e;
    *out = ws_need(a, p, C::RPI * C::R);
    return AWQ_OK;
  }
};
template <typename T, int M>
struct Launch {
  static int run(const SimtArgs& a, int dtype, int64_t ws, cudaStream_t s) { return by_cfg<T, M, LaunchC>(a, dtype, ws, s); }
};
template <typename T, int M>
struct Need {
  static int run(const SimtArgs& a, int dtype, int64_t* out) { return by_cfg<T, M, NeedC>(a, dtype, out); }
};

// One instance per M: the accumulators and the x registers are arrays sized by M.
template <typename T, template <typename, int> class F, typename... Args>
int by_m(int m, Args&&... args) {
  switch (m) {
    case 1: return F<T, 1>::run(args...);
    case 2: return F<T, 2>::run(args...);
    case 3: return F<T, 3>::run(args...);
    case 4: return F<T, 4>::run(args...);
    case 5: return F<T, 5>::run(args...);
    case 6: return F<T, 6>::run(args...);
    case 7: return F<T, 7>::run(args...);
    default: return F<T, 8>::run(args...);
  }
}

int make_args(SimtArgs& a, int nseg, const int64_t* Ns, int64_t M, int64_t K, int64_t Kp, int group_size,
              int dtype) {
  const int log2g = check_segs("awq_int4_gemm_simt", a.seg, nseg, Ns, M, kMaxM, K, Kp, group_size, dtype);
  if (log2g < 0) return AWQ_ERR_ARG;
  a.nseg = nseg;
  a.M = (int)M; a.K = (int)K; a.Kp = (int)Kp;
  a.groups = (int)(Kp / group_size);
  a.gshift = log2g - 5;
  a.nchunks = (int)(Kp / 32);
  return AWQ_OK;
}

// Sets x and the workspace, and launches (the C entries below).
int run(SimtArgs& a, const void* x, float* ws, int64_t ws_floats, int dtype, void* stream) {
  a.x = x;
  a.ws = ws;
  a.x_vec = (a.K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? by_m<__nv_bfloat16, Launch>(a.M, a, dtype, ws_floats, s)
                                 : by_m<__half, Launch>(a.M, a, dtype, ws_floats, s);
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_int4_simt_max_m(void) { return awq::kMaxM; }

extern "C" int64_t awq_int4_gemm_simt_multi_workspace(int nseg, const int64_t* Ns, int64_t M, int64_t K,
                                                      int64_t Kp, int group_size, int dtype) {
  using namespace awq;
  SimtArgs a{};
  if (make_args(a, nseg, Ns, M, K, Kp, group_size, dtype)) return -1;
  int64_t need = 0;
  const int e = dtype == AWQ_DTYPE_BF16 ? by_m<__nv_bfloat16, Need>(a.M, a, dtype, &need)
                                        : by_m<__half, Need>(a.M, a, dtype, &need);
  return e ? -1 : need;
}

extern "C" int awq_int4_gemm_simt_multi(const void* x, int nseg, const uint8_t* const* qweights,
                                        const void* const* scales, const uint8_t* const* zeros,
                                        const void* const* biases, void* const* ys, const int64_t* Ns,
                                        float* workspace, int64_t workspace_floats, int64_t M, int64_t K,
                                        int64_t Kp, int group_size, int dtype, void* stream) {
  using namespace awq;
  SimtArgs a{};
  if (int e = make_args(a, nseg, Ns, M, K, Kp, group_size, dtype)) return e;
  if (int e = set_seg_pointers("awq_int4_gemm_simt", a.seg, nseg, x, qweights, scales, zeros, biases, ys)) return e;
  return run(a, x, workspace, workspace_floats, dtype, stream);
}

extern "C" int64_t awq_int4_gemm_simt_workspace(int64_t M, int64_t N, int64_t K, int64_t Kp,
                                                int group_size, int dtype) {
  return awq_int4_gemm_simt_multi_workspace(1, &N, M, K, Kp, group_size, dtype);
}

extern "C" int awq_int4_gemm_simt(const void* x, const uint8_t* qweight, const void* scales,
                                  const uint8_t* zeros, const void* bias, void* y, float* workspace,
                                  int64_t workspace_floats, int64_t M, int64_t N, int64_t K,
                                  int64_t Kp, int group_size, int dtype, void* stream) {
  return awq_int4_gemm_simt_multi(x, 1, &qweight, &scales, &zeros, &bias, &y, &N, workspace, workspace_floats,
                                  M, K, Kp, group_size, dtype, stream);
}

extern "C" int awq_int4_gemm_simt_partials(const void* x, const uint8_t* qweight, const void* scales,
                                           const uint8_t* zeros, float* partials, int64_t partials_floats, int64_t M,
                                           int64_t N, int64_t K, int64_t Kp, int group_size, int dtype, void* stream) {
  using namespace awq;
  SimtArgs a{};
  if (int e = make_args(a, 1, &N, M, K, Kp, group_size, dtype)) return e;
  const void* bias = nullptr;
  void* y = partials;  // never written: with two or more slices the kernel writes only partials
  if (int e = set_seg_pointers("awq_int4_gemm_simt_partials", a.seg, 1, x, &qweight, &scales, &zeros, &bias, &y))
    return e;
  a.partials_only = true;
  return run(a, x, partials, partials_floats, dtype, stream);
}
