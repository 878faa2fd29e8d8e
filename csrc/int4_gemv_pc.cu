// Producer/consumer INT4 decode kernel for M = 1..8 tokens on sm_90 (int4 x fp16/bf16).
//
//     y_s[m, n] = sum_{k < K} x[m, k] * (q_s[n, k] - z_s[n, k/g]) * s_s[n, k/g]  +  bias_s[n]
//
// for up to kMaxSeg weights s that read the same x (q/k/v, gate/up: one launch for all), straight
// from the NK_U8 layout (docs/format.md), without repacking.
//
// Why (csrc/NOTES.md): a warp that computes has no loads in flight, and registers cap the warps
// that could cover it. Here one producer warp per block keeps
// a ring of shared-memory stages full with bulk copies (cp.async.bulk, the TMA engine: one
// instruction a row, no registers, completion counted on an mbarrier) whatever the consumers are
// doing, and C consumer warps dequantize and multiply out of the ring. Everything the consumers
// read comes from shared memory: the weights and x slice of each stage, and each tile's scales
// and zeros (a global load next to the math costs its full latency: the ring leaves the L1 little
// room, so x would come from the L2).
//
// Work: a tile is 16 H output rows of one weight (H = 2 by default: each x fragment feeds 4
// mmas); blocks loop over tiles (persistent grid, one wave). A stage holds the tile's rows x KS k
// (KS = 256 C) and x[:, k0 : k0 + KS]; consumer warp w takes chunks (32 k, 16 bytes) 8w .. 8w + 7
// of each row, lane (g, t) = (lane / 4, lane % 4) chunks 8w + t and 8w + 4 + t of rows 16h + g
// and 16h + g + 8 (h < H), copies them to registers, frees
// the slot and feeds mma.m16n8k16 "swap AB" (weights are A, the tokens the 8 columns of B). mma
// sums over 16 k-slots, and any permutation of k works as long as A and B agree: slots (2t,
// 2t + 1) of mma 2j + h take the weight pair (8j + 2h, 8j + 2h + 4) of the lane's chunk and slots
// (2t + 8, 2t + 9) the pair (8j + 2h + 1, 8j + 2h + 5), which is what one LOP3 extracts from word
// j (dequant8 in int4_common.cuh); the B fragment of lane (g, t) is token g's x over the same k.
// Shared-memory rows are padded by 16 bytes, which makes the 16-byte reads conflict-free. The C
// partial sums of a tile are added in a fixed order (deterministic, no atomics).
//
// Numerics: dequant8 rounds (q - z) * s once to T (bit-identical to quant.dequantize in T); the
// tensor cores multiply and accumulate in fp32.
//
// Fallbacks (uniform branches): scales and zeros from global memory one stage ahead when N is
// not a multiple of the tile, they are unaligned or K is too large; x through the L1 for M > 4,
// or unaligned. Limitations: sm_90 only (the launcher refuses older devices; _cuda.py dispatches
// around it); N * Kp / 2 < 2^31 per weight; qweight 16-byte aligned. Run on H100 and H200 only.
#include <algorithm>
#include <cstdlib>

#include "int4_common.cuh"
#include "sm90_async.cuh"

namespace awq {
namespace {

constexpr int kMaxM = 8;

struct PcArgs {
  const void* x;
  Int4Seg seg[kMaxSeg];
  int nseg, M, K, Kp, groups, log2g, nchunks, tiles, stages_tile;
  int stages;       // ring depth
  int stage_bytes;  // weights (a tile's rows) + x (M rows) of a stage
  bool sz_smem;     // scales and zeros staged per tile (every N a multiple of the tile, aligned)
  bool x_vec;       // K % 8 == 0 and x 16-byte aligned: 16-byte loads and bulk copies of x
  bool x_smem;      // x staged per stage (x_vec and M <= kMaxXSmemM)
};

// Largest shared-memory copy of two tiles' scales and zeros (6 bytes a row and group: with 32
// rows, K <= 43690 at g = 128). Beyond, consumers read them from global memory.
constexpr int kMaxSzSmem = 64 << 10;
constexpr int kMaxStages = 8;
// x is staged with the weights up to this M; beyond, its slice outgrows the stage's weights and
// the ring gets too shallow (measured: csrc/NOTES.md), so consumers read x through the L1.
constexpr int kMaxXSmemM = 4;

template <int C, int H>
struct PcLayout {
  static constexpr int kTileRows = 16 * H;              // a warp's rows: H halves of 16
  static constexpr int kKs = 256 * C;                   // k per stage
  static constexpr int kRowStride = kKs / 2 + 16;       // bytes a weight row takes in a stage
  static constexpr int kXStride = 2 * kKs + 16;         // bytes an x row takes in a stage
  static constexpr int kWBytes = kTileRows * kRowStride;
  static constexpr int kRedBytes = 2 * C * 4 * H * 32 * 4;  // partials, double-buffered by tile
  static constexpr int kBarBytes = (2 * kMaxStages + 4) * 8;
  static int stage_bytes(int m, bool x_smem) { return kWBytes + (x_smem ? m * kXStride : 0); }
  // The ring, the partials, with sz_smem two tiles' scales (2 B a row and group) and zeros
  // (1 B), then the barriers.
  static size_t bytes(int stages, int stage, int groups, bool sz_smem) {
    return (size_t)stages * stage + kRedBytes + (sz_smem ? (size_t)6 * kTileRows * groups : 0) + kBarBytes;
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// The raw scale and zero of a lane's two chunks (chunk0, chunk0 + 4), rows g and g + 8.
struct ScaleZero {
  uint32_t s0[2], s1[2], z0[2], z1[2];
};

// From global memory; goff0 / goff1: the first group of rows g / g + 8.
__device__ __forceinline__ void load_sz(ScaleZero& sz, const PcArgs& a, const Int4Seg& sg, uint32_t goff0,
                                        uint32_t goff1, int chunk0) {
  const uint16_t* s = static_cast<const uint16_t*>(sg.scales);
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int chunk = min(chunk0 + 4 * u, a.nchunks - 1);  // past Kp: any valid group, x is 0
    const uint32_t gi = (uint32_t)(chunk * 32) >> a.log2g;
    sz.s0[u] = __ldg(s + goff0 + gi);
    sz.s1[u] = __ldg(s + goff1 + gi);
    sz.z0[u] = __ldg(sg.zeros + goff0 + gi);
    sz.z1[u] = __ldg(sg.zeros + goff1 + gi);
  }
}

// From a tile's copy in shared memory (ss: [16][groups] raw scales, zs: [16][groups] zeros).
__device__ __forceinline__ void load_sz_smem(ScaleZero& sz, const PcArgs& a, const uint16_t* ss,
                                             const uint8_t* zs, int g, int chunk0) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int chunk = min(chunk0 + 4 * u, a.nchunks - 1);
    const int gi = (chunk * 32) >> a.log2g;
    sz.s0[u] = ss[g * a.groups + gi];
    sz.s1[u] = ss[(g + 8) * a.groups + gi];
    sz.z0[u] = zs[g * a.groups + gi];
    sz.z1[u] = zs[(g + 8) * a.groups + gi];
  }
}

// x of this lane's token for its two chunks (4 x 8 values each), 0 for a missing token (xv
// false) and past K. xs: the token's row in the stage (x_smem), else xr: its row in global
// memory, 16 bytes at a time where x_vec allows, else element by element.
template <typename T>
__device__ __forceinline__ void load_x(uint4 (&xw)[2][4], const PcArgs& a, const T* xs, const T* xr, bool xv,
                                       int chunk0, int kst) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = (chunk0 + 4 * u) * 32 + 8 * j;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (a.x_vec) {
        if (xv && k + 8 <= a.K)
          v = a.x_smem ? *reinterpret_cast<const uint4*>(xs + (k - kst)) : __ldg(reinterpret_cast<const uint4*>(xr + k));
      } else if (xv && k < a.K) {  // K % 8 != 0 or x unaligned: element by element
        uint16_t e[8];
        const uint16_t* xu = reinterpret_cast<const uint16_t*>(xr);
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = k + i < a.K ? xu[k + i] : 0;
        v = make_uint4(e[0] | (uint32_t)e[1] << 16, e[2] | (uint32_t)e[3] << 16, e[4] | (uint32_t)e[5] << 16,
                       e[6] | (uint32_t)e[7] << 16);
      }
      xw[u][j] = v;
    }
  }
}

// c += the products of the lane's two chunks of rows g (w0) and g + 8 (w1) with x (xw); h = 0 / 1
// of c are two independent mma chains.
template <typename T>
__device__ __forceinline__ void compute(float (&c)[2][4], const uint4 (&w0)[2], const uint4 (&w1)[2],
                                        const ScaleZero& sz, const uint4 (&xw)[2][4]) {
  constexpr uint32_t kMagic = Half2Traits<T>::kMagic;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const uint32_t ss0 = sz.s0[u] * 0x10001u, ss1 = sz.s1[u] * 0x10001u;
    const uint32_t zz0 = (kMagic | sz.z0[u]) * 0x10001u, zz1 = (kMagic | sz.z1[u]) * 0x10001u;
    const uint32_t q0[4] = {w0[u].x, w0[u].y, w0[u].z, w0[u].w};
    const uint32_t q1[4] = {w1[u].x, w1[u].y, w1[u].z, w1[u].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_word<T>(c, q0[j], q1[j], zz0, ss0, zz1, ss1, xw[u][j]);
  }
}
#endif

template <typename T, int C, int H, int MINB>
__global__ void __launch_bounds__(32 * (C + 1), MINB) gemv_pc_kernel(const PcArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using L = PcLayout<C, H>;
  constexpr int TR = L::kTileRows;
  extern __shared__ __align__(128) uint8_t smem[];
  const int S = a.stages, groups = a.groups;
  uint8_t* ring = smem;
  float* red = reinterpret_cast<float*>(smem + (size_t)S * a.stage_bytes);
  uint16_t* sz_s = reinterpret_cast<uint16_t*>(smem + (size_t)S * a.stage_bytes + L::kRedBytes);  // [2][TR][groups]
  uint8_t* sz_z = reinterpret_cast<uint8_t*>(sz_s + (a.sz_smem ? 2 * TR * groups : 0));            // [2][TR][groups]
  uint64_t* full = reinterpret_cast<uint64_t*>(sz_z + (a.sz_smem ? 2 * TR * groups : 0));
  uint64_t* empty = full + kMaxStages;
  uint64_t* sz_full = empty + kMaxStages;  // [2]
  uint64_t* sz_empty = sz_full + 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], C);
    }
    for (int i = 0; i < 2; ++i) {
      mbar_init(&sz_full[i], 1);
      mbar_init(&sz_empty[i], C);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int row_bytes = a.Kp / 2;

  if (warp == C) {  // producer: fill the ring, stage after stage, tile after tile
    uint64_t evict_first, evict_last;  // weights are read once, x by every block
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(evict_first));
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(evict_last));
    int slot = 0;
    uint32_t phase = 0, tn = 0;
    for (int tile = blockIdx.x; tile < a.tiles; tile += gridDim.x, ++tn) {
      const Int4Seg& sg = a.seg[seg_of(a.seg, a.nseg, tile)];
      const int r0 = (tile - sg.tile0) * TR, rows = min(TR, sg.N - r0);
      if (a.sz_smem) {  // the tile's scales and zeros: two contiguous runs (TR rows, N % TR == 0)
        const int b = tn & 1;
        mbar_wait(&sz_empty[b], ((tn >> 1) & 1) ^ 1);
        if (lane == 0) {
          mbar_expect_tx(&sz_full[b], 3 * TR * groups);
          bulk_copy(sz_s + b * TR * groups, static_cast<const uint16_t*>(sg.scales) + (size_t)r0 * groups,
                    2 * TR * groups, &sz_full[b], evict_first);
          bulk_copy(sz_z + b * TR * groups, sg.zeros + (size_t)r0 * groups, TR * groups, &sz_full[b], evict_first);
        }
      }
      const uint8_t* src = sg.qweight + (size_t)(r0 + lane) * row_bytes;
      for (int st = 0; st < a.stages_tile; ++st) {
        mbar_wait(&empty[slot], phase ^ 1);
        const int k0 = st * L::kKs;
        const uint32_t bytes = min(L::kKs, a.Kp - k0) / 2;
        const uint32_t xbytes = a.x_smem ? min(L::kKs, a.K - k0) * (int)sizeof(T) : 0;
        if (lane == 0) mbar_expect_tx(&full[slot], bytes * rows + xbytes * a.M);
        __syncwarp();
        uint8_t* stage = ring + (size_t)slot * a.stage_bytes;
        if (lane < rows)
          bulk_copy(stage + lane * L::kRowStride, src + k0 / 2, bytes, &full[slot], evict_first);
        if (lane < a.M && xbytes)
          bulk_copy(stage + L::kWBytes + lane * L::kXStride, static_cast<const T*>(a.x) + (size_t)lane * a.K + k0,
                    xbytes, &full[slot], evict_last);
        if (++slot == S) slot = 0, phase ^= 1;
      }
    }
    return;
  }

  // consumers
  const int g = lane >> 2, t = lane & 3;
  const bool xv = g < a.M;  // the token of this lane's B fragment
  const T* xr = static_cast<const T*>(a.x) + (size_t)min(g, a.M - 1) * a.K;
  int slot = 0;
  uint32_t phase = 0, tn = 0;
  for (int tile = blockIdx.x; tile < a.tiles; tile += gridDim.x, ++tn) {
    const Int4Seg& sg = a.seg[seg_of(a.seg, a.nseg, tile)];
    const int rbase = (tile - sg.tile0) * TR + g;  // rows rbase + 16h and rbase + 16h + 8
    uint32_t goff[H][2];
#pragma unroll
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < 2; ++i) goff[h][i] = (uint32_t)min(rbase + 16 * h + 8 * i, sg.N - 1) * groups;
    const uint16_t* ss = sz_s + (tn & 1) * TR * groups;
    const uint8_t* zs = sz_z + (tn & 1) * TR * groups;
    float c[H][2][4] = {};
    ScaleZero sz[H], next[H];
    if (a.sz_smem)
      mbar_wait(&sz_full[tn & 1], (tn >> 1) & 1);
    else
#pragma unroll
      for (int h = 0; h < H; ++h) load_sz(sz[h], a, sg, goff[h][0], goff[h][1], 8 * warp + t);
    for (int st = 0; st < a.stages_tile; ++st) {
      const int chunk0 = st * (L::kKs / 32) + 8 * warp + t;
      if (!a.sz_smem && st + 1 < a.stages_tile)  // one stage ahead
#pragma unroll
        for (int h = 0; h < H; ++h) load_sz(next[h], a, sg, goff[h][0], goff[h][1], chunk0 + L::kKs / 32);
      const uint8_t* stage = ring + (size_t)slot * a.stage_bytes;
      uint4 xw[2][4];
      if (!a.x_smem) load_x<T>(xw, a, nullptr, xr, xv, chunk0, 0);  // does not wait for the stage
      if (a.sz_smem)
#pragma unroll
        for (int h = 0; h < H; ++h) load_sz_smem(sz[h], a, ss + 16 * h * groups, zs + 16 * h * groups, g, chunk0);
      mbar_wait(&full[slot], phase);
      if (a.x_smem)
        load_x<T>(xw, a, reinterpret_cast<const T*>(stage + L::kWBytes + min(g, a.M - 1) * L::kXStride), xr, xv,
                  chunk0, st * L::kKs);
      const uint8_t* base = stage + (8 * warp + t) * 16;
      uint4 w0[H][2], w1[H][2];
#pragma unroll
      for (int h = 0; h < H; ++h)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          w0[h][u] = *reinterpret_cast<const uint4*>(base + (16 * h + g) * L::kRowStride + 64 * u);
          w1[h][u] = *reinterpret_cast<const uint4*>(base + (16 * h + g + 8) * L::kRowStride + 64 * u);
        }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
      if (++slot == S) slot = 0, phase ^= 1;
#pragma unroll
      for (int h = 0; h < H; ++h) compute<T>(c[h], w0[h], w1[h], sz[h], xw);
      if (!a.sz_smem)
#pragma unroll
        for (int h = 0; h < H; ++h) sz[h] = next[h];
    }
    if (a.sz_smem) {
      __syncwarp();
      if (lane == 0) mbar_arrive(&sz_empty[tn & 1]);
    }
    float* rb = red + (tn & 1) * (C * 4 * H * 32);
#pragma unroll
    for (int h = 0; h < H; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) rb[((warp * H + h) * 4 + e) * 32 + lane] = c[h][0][e] + c[h][1][e];
    asm volatile("bar.sync 1, %0;" ::"r"(32 * C) : "memory");
    if (warp == 0) {
#pragma unroll
      for (int h = 0; h < H; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = 0.f;
#pragma unroll
          for (int w = 0; w < C; ++w) v += rb[((w * H + h) * 4 + e) * 32 + lane];
          // c0, c1: row g, tokens 2t, 2t + 1; c2, c3: row g + 8 (of half h).
          const int row = rbase + 16 * h + (e < 2 ? 0 : 8), tok = 2 * t + (e & 1);
          if (row < sg.N && tok < a.M) {
            if (sg.bias) v += Half2Traits<T>::to_float(static_cast<const T*>(sg.bias)[row]);
            static_cast<T*>(sg.y)[(size_t)tok * sg.N + row] = Half2Traits<T>::from_float(v);
          }
        }
    }
  }
#endif
}

// Picks the ring depth (as deep as MINB blocks a SM allow, 2..kMaxStages) and launches a
// persistent grid of min(tiles, resident blocks) blocks.
template <typename T, int C, int H, int MINB>
int launch_cfg(const PcArgs& a, cudaStream_t stream) {
  using L = PcLayout<C, H>;
  auto kernel = gemv_pc_kernel<T, C, H, MINB>;
  constexpr int threads = 32 * (C + 1);
  struct Dev { int smem_sm, optin, sms; };
  static Dev devs[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return check_launch("cudaGetDevice");
  Dev& d = devs[dev & 63];
  if (d.sms == 0) {
    if (cudaDeviceGetAttribute(&d.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&d.optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d.optin) != cudaSuccess ||
        cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return check_launch("gemv_pc setup");
  }
  PcArgs b = a;
  b.tiles = 0;
  for (int i = 0; i < a.nseg; ++i) {  // tiles of TR rows
    b.seg[i].tile0 = b.tiles;
    b.tiles += (a.seg[i].N + L::kTileRows - 1) / L::kTileRows;
    b.sz_smem = b.sz_smem && a.seg[i].N % L::kTileRows == 0;
  }
  b.sz_smem = b.sz_smem && 6 * L::kTileRows * a.groups <= kMaxSzSmem;
  b.stage_bytes = L::stage_bytes(a.M, a.x_smem);
  const size_t fixed = L::bytes(0, 0, a.groups, b.sz_smem);
  const long long per_block = std::min<long long>(d.optin, d.smem_sm / MINB - 1024);  // 1 KB reserved a block
  b.stages = (int)std::max(2LL, std::min<long long>(kMaxStages, (per_block - (long long)fixed) / b.stage_bytes));
  const size_t smem = L::bytes(b.stages, b.stage_bytes, a.groups, b.sz_smem);
  if (smem > (size_t)d.optin) return fail(AWQ_ERR_CUDA, "gemv_pc: %zu bytes of shared memory do not fit", smem);
  const int resident = std::max(1, std::min(MINB, (int)(d.smem_sm / (smem + 1024))));
  b.stages_tile = (a.Kp + L::kKs - 1) / L::kKs;
  const int grid = (int)std::min<long long>(b.tiles, (long long)resident * d.sms);
  kernel<<<grid, threads, smem, stream>>>(b);
  return check_launch("gemv_pc_kernel");
}

// $AWQ_PC_CFG picks a configuration <consumer warps, 16-row halves a warp, blocks a SM> for
// measurements; 0 (default) is the one measured best (csrc/NOTES.md, session 3: two halves, so
// each x fragment feeds 4 mmas and x is copied once per 32 rows).
template <typename T>
int launch(const PcArgs& a, cudaStream_t stream) {
  const char* env = getenv("AWQ_PC_CFG");  // read on every call, as the tests switch it
  switch (env ? atoi(env) : 0) {
    case 1: return launch_cfg<T, 8, 1, 2>(a, stream);
    case 2: return launch_cfg<T, 4, 1, 3>(a, stream);
    case 3: return launch_cfg<T, 4, 2, 3>(a, stream);
    case 4: return launch_cfg<T, 4, 1, 4>(a, stream);
    default: return launch_cfg<T, 4, 2, 2>(a, stream);
  }
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_int4_pc_max_m(void) { return awq::kMaxM; }

extern "C" int awq_int4_gemm_pc(const void* x, int nseg, const uint8_t* const* qweights, const void* const* scales,
                                const uint8_t* const* zeros, const void* const* biases, void* const* ys,
                                const int64_t* Ns, int64_t M, int64_t K, int64_t Kp, int group_size, int dtype,
                                void* stream) {
  using namespace awq;
  PcArgs a{};
  const int log2g = check_segs("awq_int4_gemm_pc", a.seg, nseg, Ns, M, kMaxM, K, Kp, group_size, dtype);
  if (log2g < 0) return AWQ_ERR_ARG;
  if (int e = set_seg_pointers("awq_int4_gemm_pc", a.seg, nseg, x, qweights, scales, zeros, biases, ys)) return e;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return check_launch("awq_int4_gemm_pc: device query");
  if (major < 9) return fail(AWQ_ERR_ARG, "awq_int4_gemm_pc: needs sm_90 or newer (device is sm_%d)", major * 10);
  a.sz_smem = true;  // and every N a multiple of the tile: launch_cfg (which also sets tile0)
  for (int i = 0; i < nseg; ++i)
    a.sz_smem = a.sz_smem && ((uintptr_t)scales[i] & 15) == 0 && ((uintptr_t)zeros[i] & 15) == 0;
  a.x = x;
  a.nseg = nseg;
  a.M = (int)M; a.K = (int)K; a.Kp = (int)Kp;
  a.groups = (int)(Kp / group_size);
  a.log2g = log2g;
  a.nchunks = (int)(Kp / 32);
  a.x_vec = (K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  a.x_smem = a.x_vec && M <= kMaxXSmemM;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? launch<__nv_bfloat16>(a, s) : launch<__half>(a, s);
}
