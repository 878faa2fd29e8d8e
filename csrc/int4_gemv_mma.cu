// Weight-streaming INT4 x half/bf16 GEMM for small M (decode), on tensor cores (mma.sync).
//
// Computes
//     y[m, n] = sum_{k < K} x[m, k] * (q[n, k] - z[n, k/g]) * s[n, k/g]  +  bias[n]
// with fp32 accumulation, directly from the NK_U8 layout (docs/format.md, csrc/awq_int4.h):
//     qweight uint8 [N, Kp/2] (k = 2b low nibble, 2b+1 high), scales T [N, Kp/g],
//     zeros uint8 [N, Kp/g], x T [M, K], y T [M, N], T = fp16 or bf16, g in {32, 64, 128}.
// No other weight layout is needed: nothing is repacked at load time.
//
// Design. At small M the op reads N*Kp/2 weight bytes and does little arithmetic per byte, so the
// goal is the DRAM floor. The weight takes the *A* role of mma.m16n8k16 (16 output rows x 16 k)
// and the tokens the *B* role (8 tokens per n-tile): "swap AB", so M = 1..8 wastes only tensor
// throughput, never weight bandwidth (CUDA-core FMAs would cap out near M = 4 on an H100).
//   * Each warp owns 16 rows and streams them through a P-deep cp.async ring in shared memory:
//     one stage is 4 k-blocks (512 k) of each row, fetched as 256-byte runs, two rows per
//     instruction (whole 128-byte lines; no registers held for bytes in flight).
//   * The k order inside an mma is free as long as A and B agree: lane (g, t) feeds k-step j with
//     the pair (k_i, k_{i+4}) of word j/2 of its 16-byte chunk (what one LOP3 mask extracts), and
//     x is stored in shared memory pre-permuted the same way, so a B fragment is one 16-byte
//     conflict-free shared load and no weight is ever reordered.
//   * Dequantization is exact up to the final multiply (int4_common.cuh: dequant8).
//   * Work items = (token tile of 8*NT, row block, K chunk of up to 16 k-blocks), handed to a
//     persistent grid (one or two blocks per SM) round-robin; a block stages the item's x chunk in
//     shared memory, and each warp's cp.async ring runs ahead across item boundaries.
//   * Items that split K leave fp32 partial sums in a workspace; a second kernel adds the bias and
//     rounds to T. At M <= 8 (one token tile) each chunk has its own [M, N] plane and the second
//     kernel sums the planes in chunk order: no atomics, bit-for-bit reproducible run to run.
//     Above, the planes would grow with M x K / 512 (117 MB at M = 64 on 8192 x 28672), so the
//     chunks add into one [M, N] plane, zeroed by the launcher, with atomics (red.add), whose
//     order varies. With one chunk along K the epilogue writes y directly.
//
// Limitations:
//   1. Measured at 42-44% of the DRAM floor at M = 1 on an H200 (8192 x 28672), not the target
//      85%: the kernel is latency-bound (ncu: ~0.5 issued instructions per cycle per scheduler,
//      29 M instructions, 39% of DRAM bandwidth). csrc/NOTES.md has the analysis.
//   2. M is tiled by 8*NT tokens (NT <= 4); every token tile re-reads (from L2) and re-dequantizes
//      the weights, so the kernel loses to dequantize + cuBLAS from M ~ 128 on; _cuda.py
//      dispatches by measured M.
//   3. N need not be a multiple of 16 (out-of-range rows are zero-filled and not stored).
//   4. qweight's base pointer must be 16-byte aligned; x is read with 16-byte loads only if K % 8
//      == 0 and x is 16-byte aligned, else element by element.
//   5. The split-K workspace's size depends on the plan the launch picks (the device's SM count
//      and occupancy): awq_int4_gemm_mma_workspace says it. At M > 8 (off sm_90, or group size
//      32) the split-K sums are not reproducible in their last bits (atomics, above).
//   6. sm_80/86/89 get the <8, 2> block (96 KB of shared memory); only sm_90 was run here.
//
// Tuning notes (H200, csrc/NOTES.md): register-prefetch versions (64-byte runs, 2 blocks/SM) and
// this cp.async version all land at 66-73 us for 8192 x 28672 at M = 1; a memory-only variant of
// this kernel (no dequant, no mma) still takes 60 us, so the streaming structure, not the math, is
// what limits it. A g = 128 variant that applied scale and zero to fp32 group sums (half the
// per-weight instructions) ran no faster and was dropped.
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "int4_common.cuh"

namespace awq {
namespace {

constexpr int kKB = 128;                 // k per k-block: 4 lanes x 32 nibbles (64 B of a row)
constexpr int kV = 4;                    // k-blocks per stage: a 256-byte run of each row
constexpr int kStageBytes = 16 * kV * 64;  // one warp's stage: 16 rows x 256 B
constexpr int kChunkBytes = 32 * 1024;   // x chunk (one work item's K range) in shared memory

// Block shape: WARPS warps of one m16 tile (16 rows) each, and a P-deep cp.async ring per warp
// (P - 1 stages in flight). Two configurations, chosen by M and by the shared memory the device
// grants a block: <16, 3> (224 KB, sm_90 only) and <8, 2> (96 KB: fits sm_80/86/89 too).
template <int WARPS, int P>
struct Cfg {
  static constexpr int kThreads = WARPS * 32, kP = P, kRowsPerBlock = WARPS * 16;
  static constexpr int kSmem = kChunkBytes + WARPS * P * kStageBytes;
};

template <int NT>
__host__ __device__ constexpr int chunk_kb() { return kChunkBytes / (kKB * 8 * NT * 2); }  // 16, 8, 4

// 16-byte global -> shared copy that bypasses registers and L1; src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

struct Args : Int4Operands {
  float* ws;       // fp32 partials when nchunks > 1: [nchunks, M, N] at NT = 1, else [M, N] (atomics)
  int64_t ws_floats;
  int M, N, K, Kp, log2g, groups;
  int nkb;         // k-blocks in Kp (the last may be partial)
  int ck;          // k-blocks per work item (multiple of kV)
  int nchunks;     // work items along K
  int tok_tiles, row_blocks, items;
  bool x_vec;
};

// A work item: (token tile, row block, K chunk); token tiles vary fastest so items that share a
// row block's weights run at the same time on different SMs and hit L2.
struct Item {
  int tok0, row0, kb0, nkb;
};

template <int NT, int ROWS>
__device__ __forceinline__ Item decode_item(const Args& a, int id) {
  Item it;
  const int tt = id % a.tok_tiles, rest = id / a.tok_tiles;
  const int c = rest % a.nchunks, rb = rest / a.nchunks;
  it.tok0 = tt * 8 * NT;
  it.row0 = rb * ROWS;
  it.kb0 = c * a.ck;
  it.nkb = min(a.ck, a.nkb - it.kb0);
  return it;
}

// Issues one warp stage: 16 rows x kV k-blocks as 256-byte runs, two rows per instruction (lanes
// 0-15 and 16-31), so every request is whole 128-byte lines. Chunk c16 = v*4 + t of row r lands
// at slot c16 ^ 4*(r & 1) so that the consumer's reads (rows g, g+1 in a quarter warp) hit eight
// different bank groups.
__device__ __forceinline__ void produce(const Args& a, uint32_t slot, int row0, int kb, int kb_end,
                                       int lane) {
  const int c16 = lane & 15, v = c16 >> 2, t = c16 & 3;
  const int kbv = kb + v, byte = kbv * 64 + t * 16;
  const bool in_k = kbv < kb_end && kbv * kKB + 32 * t < a.Kp;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = 2 * i + (lane >> 4);
    const int row = row0 + r;
    const bool ok = in_k && row < a.N;
    const uint8_t* src = a.qweight + (ok ? (size_t)row * (a.Kp / 2) + byte : 0);
    cp_async16(slot + r * 256 + ((c16 ^ ((r & 1) << 2)) << 4), src, ok ? 16 : 0);
  }
  if (lane < 16 && kb < kb_end) {  // the scale and zero lines this stage will read
    const size_t gi = (size_t)min(row0 + lane, a.N - 1) * a.groups + ((kb * kKB) >> a.log2g);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const uint16_t*>(a.scales) + gi));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a.zeros + gi));
  }
}

// Scales and zero points of one stage for lane (g, t): rows g and g+8, k-blocks kb .. kb+kV-1.
struct SZ {
  uint32_t s[kV][2], z[kV][2];
};

__device__ __forceinline__ void load_sz(SZ& sz, const Args& a, int row0, int kb, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const size_t rowg = (size_t)min(row0 + g + 8 * h, a.N - 1) * a.groups;
#pragma unroll
    for (int v = 0; v < kV; ++v) {
      const int k = min((kb + v) * kKB + 32 * t, a.Kp - 1);
      sz.s[v][h] = __ldg(sc + rowg + (k >> a.log2g));
      sz.z[v][h] = __ldg(a.zeros + rowg + (k >> a.log2g));
    }
  }
}

// Fills the item's x chunk, pre-permuted for the B fragments: 16-byte unit ((kbl*4 + u)*TOK + m)*4
// + t holds x[m, k0 + kbl*128 + 32t + 8u + (0,4,1,5,2,6,3,7)], zero for tokens >= M and k >= K.
template <int TOK, int THREADS>
__device__ __forceinline__ void fill_x(uint4* smx, const Args& a, int tok0, int k0, int kbs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const int ks8 = kbs * (kKB / 8);
#pragma unroll 2
  for (int q = threadIdx.x; q < ks8 * TOK; q += THREADS) {
    const int m = q / ks8, kk = q - m * ks8;
    const int kbl = kk >> 4, t = (kk >> 2) & 3, u = kk & 3;
    const int tok = tok0 + m, k = k0 + kk * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (tok < a.M && k < a.K) {
      const uint16_t* src = x + (size_t)tok * a.K + k;
      if (a.x_vec && k + 8 <= a.K) {
        v = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        uint16_t e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = k + i < a.K ? __ldg(src + i) : 0;
        v = make_uint4(e[0] | (e[1] << 16), e[2] | (e[3] << 16), e[4] | (e[5] << 16), e[6] | (e[7] << 16));
      }
    }
    uint4 p;
    p.x = __byte_perm(v.x, v.z, 0x5410);  // (x0, x4)
    p.y = __byte_perm(v.x, v.z, 0x7632);  // (x1, x5)
    p.z = __byte_perm(v.y, v.w, 0x5410);  // (x2, x6)
    p.w = __byte_perm(v.y, v.w, 0x7632);  // (x3, x7)
    smx[((kbl * 4 + u) * TOK + m) * 4 + t] = p;
  }
}

// acc[nt]: rows (g, g+8) x tokens (2t, 2t+1) of n-tile nt, as mma's C fragment.
template <typename T, int NT>
__device__ __forceinline__ void compute_stage(float (&acc)[NT][4], const uint8_t* wslot,
                                              const SZ& sz, const uint4* smx, int kbl0, int nvalid,
                                              int lane) {
  constexpr int TOK = 8 * NT;
  constexpr uint32_t kMagic = Half2Traits<T>::kMagic;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int v = 0; v < kV; ++v) {
    if (v >= nvalid) break;  // warp-uniform
    const int c16 = (v * 4 + t) ^ ((g & 1) << 2);
    const uint4 wg = *reinterpret_cast<const uint4*>(wslot + g * 256 + c16 * 16);
    const uint4 wh = *reinterpret_cast<const uint4*>(wslot + (g + 8) * 256 + c16 * 16);
    const uint32_t zg = (kMagic | sz.z[v][0]) * 0x10001u, sg = sz.s[v][0] * 0x10001u;
    const uint32_t zh = (kMagic | sz.z[v][1]) * 0x10001u, sh = sz.s[v][1] * 0x10001u;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint4 b[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) b[nt] = smx[(((kbl0 + v) * 4 + u) * TOK + nt * 8 + g) * 4 + t];
      uint32_t pg[4], ph[4];
      dequant8<T>(word(wg, u), zg, sg, pg);
      dequant8<T>(word(wh, u), zh, sh, ph);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma16816<T>(acc[nt], pg[0], ph[0], pg[1], ph[1], b[nt].x, b[nt].y);
        mma16816<T>(acc[nt], pg[2], ph[2], pg[3], ph[3], b[nt].z, b[nt].w);
      }
    }
  }
}

template <typename T, int NT>
__device__ __forceinline__ void epilogue(float (&acc)[NT][4], const Args& a, int row0, int tok0, int chunk,
                                         int lane) {
  const int g = lane >> 2, t = lane & 3;
  const bool split = a.nchunks > 1;
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + h * 8 + g;
    const float b = (!split && bias && row < a.N) ? Half2Traits<T>::to_float(bias[row]) : 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int tok = tok0 + nt * 8 + 2 * t + c;
        float& v = acc[nt][h * 2 + c];
        if (tok < a.M && row < a.N) {
          const size_t o = (size_t)tok * a.N + row;
          if (split && NT == 1) a.ws[(size_t)chunk * a.M * a.N + o] = v;  // a plane a chunk
          else if (split) atomicAdd(a.ws + o, v);
          else y[o] = Half2Traits<T>::from_float(v + b);
        }
        v = 0.f;
      }
  }
}

// Persistent: block b takes items b, b + gridDim.x, ... Each warp streams its 16 rows through a
// kP-deep cp.async ring that runs ahead across item boundaries, so DRAM never waits for an
// item's x chunk or epilogue.
template <typename T, int NT, int WARPS, int P>
__global__ void __launch_bounds__(WARPS * 32, 1) gemv_mma_kernel(const Args a) {
  using C = Cfg<WARPS, P>;
  constexpr int TOK = 8 * NT, kP = C::kP;
  extern __shared__ uint4 smem[];
  uint4* smx = smem;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint8_t* wring = reinterpret_cast<const uint8_t*>(smem + kChunkBytes / 16) + warp * kP * kStageBytes;
  const uint32_t wring_s = static_cast<uint32_t>(__cvta_generic_to_shared(wring));

  // Producer cursor: item sequence index pj, stage ps within it.
  int pj = 0, ps = 0;
  Item pit = decode_item<NT, C::kRowsPerBlock>(a, blockIdx.x);
  auto produce_next = [&](int slot) {
    if ((int)blockIdx.x + pj * (int)gridDim.x < a.items) {
      const int kb = pit.kb0 + ps * kV;
      produce(a, wring_s + slot * kStageBytes, pit.row0 + warp * 16, kb, pit.kb0 + pit.nkb, lane);
      if (++ps * kV >= pit.nkb) {
        ps = 0;
        ++pj;
        if ((int)blockIdx.x + pj * (int)gridDim.x < a.items)
          pit = decode_item<NT, C::kRowsPerBlock>(a, blockIdx.x + pj * gridDim.x);
      }
    }
    cp_async_commit();  // possibly empty: keeps one group per stage for wait_group
  };
#pragma unroll
  for (int s = 0; s < kP - 1; ++s) produce_next(s);

  float acc[NT][4] = {};
  int c = 0;  // consumer stage counter (ring slot c % kP)
  for (int id = blockIdx.x; id < a.items; id += gridDim.x) {
    const Item it = decode_item<NT, C::kRowsPerBlock>(a, id);
    const int row0 = it.row0 + warp * 16;
    __syncthreads();  // every warp is done with the previous item's x chunk
    fill_x<TOK, C::kThreads>(smx, a, it.tok0, it.kb0 * kKB, it.nkb);
    __syncthreads();
    SZ sz;
    load_sz(sz, a, row0, it.kb0, lane);
    for (int kbl = 0; kbl < it.nkb; kbl += kV, ++c) {
      cp_async_wait<kP - 2>();
      __syncwarp();  // other lanes' copies of this stage are visible; slot c-1 is free
      produce_next((c + kP - 1) % kP);
      SZ cur = sz;
      if (kbl + kV < it.nkb) load_sz(sz, a, row0, it.kb0 + kbl + kV, lane);
      compute_stage<T, NT>(acc, wring + (c % kP) * kStageBytes, cur, smx, kbl, it.nkb - kbl, lane);
    }
    epilogue<T, NT>(acc, a, row0, it.tok0, it.kb0 / a.ck, lane);
  }
  cp_async_wait<0>();
}

// y = the planes' partials summed in plane order (one plane where the chunks added atomically) +
// bias, rounded to T.
template <typename T>
__global__ void finalize_kernel(const float* ws, int nchunks, const T* bias, T* y, int64_t total, int N) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = ws[i];
    for (int c = 1; c < nchunks; ++c) v += ws[c * total + i];
    if (bias) v += Half2Traits<T>::to_float(bias[i % N]);
    y[i] = Half2Traits<T>::from_float(v);
  }
}

struct DeviceInfo {
  bool init = false;
  int sms = 0, smem_optin = 0;
  int occ[12] = {};  // resident blocks per SM of each kernel instance (slot, see dispatch_nt)
  bool ready[12] = {};
};

DeviceInfo& device_info(int dev) {
  static DeviceInfo info[64];
  return info[dev & 63];
}

// AWQ_GEMV_CFG=small forces the <8, 2> block (tests use it to cover the sm_80/86/89 path on sm_90).
bool force_small_cfg() {
  static const bool small = [] {
    const char* v = getenv("AWQ_GEMV_CFG");
    return v && strcmp(v, "small") == 0;
  }();
  return small;
}

// Plans a launch of one configuration (items along K, grid) into a and grid; with `need`, only
// stores the workspace floats the plan asks for there and launches nothing.
template <typename T, int NT, int WARPS, int P>
int launch(const Args& a0, DeviceInfo& di, int slot, cudaStream_t stream, int64_t* need) {
  using C = Cfg<WARPS, P>;
  Args a = a0;
  constexpr int TOK = 8 * NT;
  auto kernel = gemv_mma_kernel<T, NT, WARPS, P>;
  if (!di.ready[slot]) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&di.occ[slot], kernel, C::kThreads, C::kSmem) != cudaSuccess)
      return check_launch("gemv_mma setup");
    di.ready[slot] = true;
  }
  const long long resident = (long long)std::max(di.occ[slot], 1) * di.sms;
  a.tok_tiles = (a.M + TOK - 1) / TOK;
  a.row_blocks = (a.N + C::kRowsPerBlock - 1) / C::kRowsPerBlock;
  // Items as long as the x chunk allows, shortened (in kV steps) until there are at least two
  // per resident block, so the persistent blocks finish within one item of each other.
  a.ck = chunk_kb<NT>();
  auto items_for = [&](int ck) { return (long long)a.tok_tiles * a.row_blocks * ((a.nkb + ck - 1) / ck); };
  while (a.ck > kV && items_for(a.ck) < 2 * resident) a.ck -= kV;
  a.nchunks = (a.nkb + a.ck - 1) / a.ck;
  const long long items = items_for(a.ck);
  if (items > (1LL << 31) - 1) return fail(AWQ_ERR_ARG, "awq_int4_gemm_mma: too many work items");
  a.items = (int)items;
  const int planes = NT == 1 ? a.nchunks : 1;  // one token tile: a plane a chunk, summed in order
  const int64_t total = (int64_t)a.M * a.N, ws_need = a.nchunks > 1 ? planes * total : 0;
  if (need) {
    *need = ws_need;
    return AWQ_OK;
  }
  if (ws_need > 0 && (a.ws == nullptr || a.ws_floats < ws_need))
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_mma: %d K chunks need a workspace of %lld floats, got %lld", a.nchunks,
                (long long)ws_need, (long long)a.ws_floats);
  if (ws_need > 0 && planes == 1 && cudaMemsetAsync(a.ws, 0, total * sizeof(float), stream) != cudaSuccess)
    return check_launch("gemv_mma workspace memset");
  const int grid = (int)std::min<long long>(items, resident);
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(a);
  if (int e = check_launch("gemv_mma_kernel")) return e;
  if (a.nchunks > 1) {
    const int blocks = (int)std::min<int64_t>((total + 255) / 256, (int64_t)di.sms * 8);
    finalize_kernel<T><<<blocks, 256, 0, stream>>>(a.ws, planes, static_cast<const T*>(a.bias),
                                                   static_cast<T*>(a.y), total, a.N);
    return check_launch("finalize_kernel");
  }
  return AWQ_OK;
}

// Block choice, measured on an H200 (csrc/NOTES.md): for M <= 8 two <8, 2> blocks per SM beat one
// <16, 3> block (66 vs 70 us at 8192 x 28672); from M = 9 on the deeper ring wins (M = 64: 237 vs
// 407 us).
template <typename T, int NT>
int launch_cfg(const Args& a, DeviceInfo& di, int slot, cudaStream_t stream, int64_t* need) {
  const bool big_fits = di.smem_optin >= Cfg<16, 3>::kSmem;
  if (big_fits && NT > 1 && !force_small_cfg()) return launch<T, NT, 16, 3>(a, di, slot * 2 + 1, stream, need);
  if (di.smem_optin >= Cfg<8, 2>::kSmem) return launch<T, NT, 8, 2>(a, di, slot * 2, stream, need);
  return fail(AWQ_ERR_ARG, "awq_int4_gemm_mma: the device grants %d bytes of shared memory per block, "
              "the kernel needs %d", di.smem_optin, Cfg<8, 2>::kSmem);
}

template <typename T>
int dispatch_nt(const Args& a, int dtype, cudaStream_t stream, int64_t* need) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return check_launch("cudaGetDevice");
  DeviceInfo& di = device_info(dev);
  if (!di.init) {
    if (cudaDeviceGetAttribute(&di.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&di.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      return check_launch("cudaDeviceGetAttribute");
    di.init = true;
  }
  // slot = (dtype * 3 + NT index) * 2 + config
  if (a.M <= 8) return launch_cfg<T, 1>(a, di, dtype * 3 + 0, stream, need);
  if (a.M <= 16) return launch_cfg<T, 2>(a, di, dtype * 3 + 1, stream, need);
  return launch_cfg<T, 4>(a, di, dtype * 3 + 2, stream, need);
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_int4_mma_max_m(void) { return 65535LL * 32; }

// The sizes' checks and the fields of Args they set (pointers aside); AWQ_OK or AWQ_ERR_ARG.
static int mma_sizes(const char* who, awq::Args& a, int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size,
                     int dtype) {
  using namespace awq;
  const int log2g = group_size == 32 ? 5 : group_size == 64 ? 6 : group_size == 128 ? 7 : -1;
  if (log2g < 0 || M < 1 || N < 1 || Kp % group_size || K <= Kp - group_size || K > Kp ||
      M > awq_int4_mma_max_m() || N > (1 << 30) || Kp > (1 << 30) || (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16))
    return fail(AWQ_ERR_ARG, "%s: bad sizes M=%lld N=%lld K=%lld Kp=%lld group_size=%d dtype=%d", who,
                (long long)M, (long long)N, (long long)K, (long long)Kp, group_size, dtype);
  a.M = (int)M; a.N = (int)N; a.K = (int)K; a.Kp = (int)Kp; a.log2g = log2g;
  a.groups = (int)(Kp / group_size);
  a.nkb = (int)((Kp + kKB - 1) / kKB);
  return AWQ_OK;
}

extern "C" int64_t awq_int4_gemm_mma_workspace(int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size,
                                               int dtype) {
  using namespace awq;
  Args a{};
  if (mma_sizes("awq_int4_gemm_mma_workspace", a, M, N, K, Kp, group_size, dtype)) return -1;
  int64_t need = 0;
  const int rc = dtype == AWQ_DTYPE_BF16 ? dispatch_nt<__nv_bfloat16>(a, dtype, nullptr, &need)
                                         : dispatch_nt<__half>(a, dtype, nullptr, &need);
  return rc ? -1 : need;
}

extern "C" int awq_int4_gemm_mma(const void* x, const uint8_t* qweight, const void* scales,
                                 const uint8_t* zeros, const void* bias, void* y, float* workspace,
                                 int64_t workspace_floats, int64_t M, int64_t N, int64_t K, int64_t Kp,
                                 int group_size, int dtype, void* stream) {
  using namespace awq;
  Args a{};
  if (int e = mma_sizes("awq_int4_gemm_mma", a, M, N, K, Kp, group_size, dtype)) return e;
  if (!x || !qweight || !scales || !zeros || !y || ((uintptr_t)qweight & 15))
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_mma: null pointer or qweight not 16-byte aligned");
  a.x = x; a.qweight = qweight; a.scales = scales; a.zeros = zeros; a.bias = bias; a.y = y;
  a.ws = workspace;
  a.ws_floats = workspace_floats;
  a.x_vec = (K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? dispatch_nt<__nv_bfloat16>(a, dtype, s, nullptr)
                                 : dispatch_nt<__half>(a, dtype, s, nullptr);
}
