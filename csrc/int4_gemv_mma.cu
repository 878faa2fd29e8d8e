// Weight-streaming INT4 x half/bf16 GEMM for small M (decode), on tensor cores (mma.sync).
//
// Computes
//     y[m, n] = sum_{k < K} x[m, k] * (q[n, k] - z[n, k/g]) * s[n, k/g]  +  bias[n]
// with fp32 accumulation, directly from the NK_U8 layout (docs/format.md, csrc/awq_int4.h):
//     qweight uint8 [N, Kp/2] (k = 2b low nibble, 2b+1 high), scales T [N, Kp/g],
//     zeros uint8 [N, Kp/g], x T [M, K], y T [M, N], T = fp16 or bf16, g in {32, 64, 128}.
//
// Design. At small M the op reads N*Kp/2 weight bytes and does little arithmetic per byte, so the
// goal is the DRAM floor. The weight takes the *A* role of mma.m16n8k16 (16 output rows x 16 k)
// and the tokens the *B* role (8 tokens per n-tile): "swap AB", so M = 1..8 wastes only tensor
// throughput, never weight bandwidth. CUDA-core FMAs would cap out near M = 4 on an H100
// (M*N*K FMAs at ~33 T/s exceed the 40 us DRAM time of an 8192 x 28672 weight from M ~ 4 on).
//   * Each thread streams 16-byte chunks (32 consecutive k of one row) straight into registers,
//     U k-blocks ahead; a k-block is 128 k, i.e. the 4 lanes of an mma thread group cover 128
//     contiguous k of a row. Weights never touch shared memory: each is used once.
//   * The k order inside an mma is free as long as A and B agree: lane (g, t) feeds k-step j
//     with the pair (k_i, k_{i+4}) of word j/2 of its chunk (what one LOP3 mask extracts), and
//     x is stored in shared memory pre-permuted the same way, so a B fragment is one 16-byte
//     conflict-free shared load and no weight is ever reordered.
//   * Dequantization is exact up to the final multiply (int4_common.cuh: dequant8).
//   * The block's K slice of x (8*NT tokens) is staged in shared memory once, so L2 traffic for
//     x is 4*M/256 of the weight traffic (a block covers 256 rows).
//   * Split-K across blocks (grid.z) fills the GPU when N is small: partial sums go to a float32
//     workspace with red.add and a second kernel adds the bias, rounds to T and re-zeroes the
//     workspace; with one split the epilogue writes y directly.
//
// Limitations:
//   1. M is tiled by 8*NT tokens per block (grid.x); each token tile re-reads the weights (mostly
//      from L2, the tiles of one row block are scheduled together) and re-dequantizes them, so
//      the kernel loses to dequantize + cuBLAS as M grows: _cuda.py dispatches by measured M.
//   2. N need not be a multiple of 16 (rows are clamped for loads, masked for stores), but N >= 1.
//   3. qweight rows must be 16-byte aligned (Kp/2 % 16 == 0 holds since g >= 32) and qweight's
//      base pointer 16-byte aligned; x is read with 16-byte loads only if K % 8 == 0 and x is
//      16-byte aligned, else element by element.
//   4. With split-K the workspace is shared state: two launches on different streams must not use
//      the same workspace at once (_cuda.py keys it by stream).
//   5. Result rounding: weights are rounded to T once (as the reference dequantize does in T),
//      products and sums are fp32, and split-K adds partial sums in a nondeterministic order.
//
// Tuning notes (H100/H200, csrc/NOTES.md has the measurements):
//   * 256 threads = 8 warps, each warp RT=2 m16 tiles (32 rows): a block covers 256 rows.
//   * U=2 k-blocks in flight per warp: 2 * RT * 2 * 16 B = 128 B per thread, 64 KB per SM at two
//     blocks per SM, above the ~20-25 KB latency x bandwidth product per SM.
//   * Splits are chosen so that the grid fits in one wave of resident blocks.
#include <algorithm>

#include "int4_common.cuh"

namespace awq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kU = 2;                   // k-blocks held in registers ahead of use
constexpr int kKB = 128;                // k per k-block: 4 lanes x 32 nibbles (64 B of a row)
constexpr int kPF = 4;                  // k-blocks per L2 prefetch: one 256-byte run per row
constexpr int kPD = 4;                  // prefetch distance in k-blocks past the current one
constexpr int kChunkBytes = 32 * 1024;  // x chunk in shared memory: two blocks per SM fit

template <int NT>
__host__ __device__ constexpr int chunk_kb() { return kChunkBytes / (kKB * 8 * NT * 2); }
// m16 tiles per warp: 2 reuses each B fragment twice; NT = 4 needs the registers for its
// accumulators, so it takes 1.
template <int NT>
__host__ __device__ constexpr int rt_for() { return NT >= 4 ? 1 : 2; }
template <int NT>
__host__ __device__ constexpr int rows_per_block() { return kWarps * 16 * rt_for<NT>(); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1);

// volatile keeps ptxas from hoisting every dequantized fragment ahead of its mma (which blows
// the register budget); order inside the warp is what the data dependencies need anyway.
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

// Asks L2 to fetch `bytes` (multiple of 16) at p. On sm_90 one bulk prefetch covers the run, so
// DRAM sees a 256-byte burst per row; registers then load from L2, so the bytes in flight from
// DRAM no longer cost registers.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  for (uint32_t o = 0; o < bytes; o += 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + o));
#endif
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

struct Args {
  const void* x;
  const uint8_t* qweight;
  const void* scales;
  const uint8_t* zeros;
  const void* bias;
  void* y;
  float* ws;
  int M, N, K, Kp, log2g, groups;
  int kb_per_split, nkb;
  bool x_vec;
};

// One k-block of a warp's weights: rows g and g+8 of each of its RT m16 tiles.
template <int RT>
struct Stage {
  uint4 w[RT][2];
  uint32_t s[RT][2];
  uint32_t z[RT][2];
};

template <typename T, int RT>
__device__ __forceinline__ void load_stage(Stage<RT>& st, const Args& a, int row0, int kb, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int k = kb * kKB + 32 * t;
  const bool in_k = k < a.Kp;
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales);
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row0 + r * 16 + h * 8 + g, a.N - 1);
      if (in_k) {
        st.w[r][h] = ld_stream(a.qweight + (size_t)row * (a.Kp / 2) + k / 2);
        const size_t gi = (size_t)row * a.groups + (k >> a.log2g);
        st.s[r][h] = __ldg(sc + gi);
        st.z[r][h] = __ldg(a.zeros + gi);
      } else {  // past Kp: a zero weight (x is zero there too)
        st.w[r][h] = make_uint4(0, 0, 0, 0);
        st.s[r][h] = 0;
        st.z[r][h] = 0;
      }
    }
  }
}

// Lane l prefetches k-blocks [kb, kb_end) of the warp's row l (qweight, and the scale and zero
// lines that cover them).
template <int RT>
__device__ __forceinline__ void prefetch_rows(const Args& a, int row0, int kb, int kb_end, int lane) {
  if (lane >= 16 * RT || kb >= kb_end) return;
  const int row = min(row0 + lane, a.N - 1);
  const int rowb = a.Kp / 2, b0 = kb * (kKB / 2);
  const int bytes = min(kb_end * (kKB / 2), rowb) - b0;
  if (bytes <= 0) return;
  prefetch_l2(a.qweight + (size_t)row * rowb + b0, bytes);
  const size_t gi = (size_t)row * a.groups + ((kb * kKB) >> a.log2g);
  asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const uint16_t*>(a.scales) + gi));
  asm volatile("prefetch.global.L2 [%0];" ::"l"(a.zeros + gi));
}

// Fills a chunk of x, pre-permuted for the B fragments: 16-byte unit ((kbl*4 + u)*TOK + m)*4 + t
// holds x[m, k0 + kbl*128 + 32t + 8u + (0,4,1,5,2,6,3,7)], zero for tokens >= M and k >= K.
// Global reads run along k so consecutive threads read adjacent bytes.
template <typename T, int TOK>
__device__ __forceinline__ void fill_x(uint4* smx, const Args& a, int tok0, int k0, int kbs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const int ks8 = kbs * (kKB / 8);
#pragma unroll 2
  for (int q = threadIdx.x; q < ks8 * TOK; q += kThreads) {
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

// acc[r][nt]: rows (g, g+8) of tile r x tokens (2t, 2t+1) of n-tile nt, as mma's C fragment.
template <typename T, int NT, int RT>
__device__ __forceinline__ void compute_stage(float (&acc)[RT][NT][4], const Stage<RT>& st,
                                              const uint4* smx, int kbl, int lane) {
  constexpr int TOK = 8 * NT;
  constexpr uint32_t kMagic = Half2Traits<T>::kMagic;
  const int g = lane >> 2, t = lane & 3;
  uint32_t zz[RT][2], ss[RT][2];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      zz[r][h] = (kMagic | st.z[r][h]) * 0x10001u;
      ss[r][h] = st.s[r][h] * 0x10001u;
    }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    uint4 b[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) b[nt] = smx[((kbl * 4 + u) * TOK + nt * 8 + g) * 4 + t];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      uint32_t pg[4], ph[4];
      dequant8<T>(word(st.w[r][0], u), zz[r][0], ss[r][0], pg);
      dequant8<T>(word(st.w[r][1], u), zz[r][1], ss[r][1], ph);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma16816<T>(acc[r][nt], pg[0], ph[0], pg[1], ph[1], b[nt].x, b[nt].y);
        mma16816<T>(acc[r][nt], pg[2], ph[2], pg[3], ph[3], b[nt].z, b[nt].w);
      }
    }
  }
}

template <typename T, int NT, int RT>
__device__ __forceinline__ void epilogue(const float (&acc)[RT][NT][4], const Args& a, int row0,
                                         int tok0, int lane, bool split) {
  const int g = lane >> 2, t = lane & 3;
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r * 16 + h * 8 + g;
      if (row >= a.N) continue;
      const float b = (!split && bias) ? Half2Traits<T>::to_float(bias[row]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int tok = tok0 + nt * 8 + 2 * t + c;
          if (tok >= a.M) continue;
          const float v = acc[r][nt][h * 2 + c];
          const size_t o = (size_t)tok * a.N + row;
          if (split) atomicAdd(a.ws + o, v);
          else y[o] = Half2Traits<T>::from_float(v + b);
        }
    }
}

// grid: (token tiles, row blocks, K splits). Token tiles vary fastest so the blocks that share a
// row block's weights run close together in time and hit L2.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 2) gemv_mma_kernel(const Args a) {
  constexpr int TOK = 8 * NT, CK = chunk_kb<NT>(), RT = rt_for<NT>();
  __shared__ uint4 smx[kChunkBytes / 16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tok0 = blockIdx.x * TOK;
  const int row0 = blockIdx.y * rows_per_block<NT>() + warp * RT * 16;
  const int kb0 = blockIdx.z * a.kb_per_split;
  const int nkb = min(a.kb_per_split, a.nkb - kb0);
  if (nkb <= 0) return;  // block-uniform
  const int kb_end = kb0 + nkb;

  prefetch_rows<RT>(a, row0, kb0, min(kb0 + kPD, kb_end), lane);
  Stage<RT> st[kU];
#pragma unroll
  for (int s = 0; s < kU; ++s)
    if (s < nkb) load_stage<T, RT>(st[s], a, row0, kb0 + s, lane);

  float acc[RT][NT][4] = {};
  for (int i = 0; i < nkb; i += kU) {
#pragma unroll
    for (int s = 0; s < kU; ++s) {
      const int j = i + s;
      if (j < nkb) {
        if (j % CK == 0) {  // next x chunk (block-uniform); weight loads keep streaming meanwhile
          __syncthreads();
          fill_x<T, TOK>(smx, a, tok0, (kb0 + j) * kKB, min(CK, nkb - j));
          __syncthreads();
        }
        if (j % kPF == 0)
          prefetch_rows<RT>(a, row0, kb0 + j + kPD, min(kb0 + j + kPD + kPF, kb_end), lane);
        const Stage<RT> cur = st[s];
        if (j + kU < nkb) load_stage<T, RT>(st[s], a, row0, kb0 + j + kU, lane);
        compute_stage<T, NT, RT>(acc, cur, smx, j % CK, lane);
      }
    }
  }
  epilogue<T, NT, RT>(acc, a, row0, tok0, lane, gridDim.z > 1);
}

// y = ws + bias rounded to T, and ws back to zero for the next launch.
template <typename T>
__global__ void finalize_kernel(float* ws, const T* bias, T* y, int64_t total, int N) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = ws[i];
    if (bias) v += Half2Traits<T>::to_float(bias[i % N]);
    y[i] = Half2Traits<T>::from_float(v);
    ws[i] = 0.f;
  }
}

struct DeviceInfo {
  int sms = 0;
  int occ[2][3] = {};  // resident blocks per SM, [dtype][NT index]
  bool ready[2][3] = {};
};

DeviceInfo& device_info(int dev) {
  static DeviceInfo info[64];
  return info[dev & 63];
}

template <typename T, int NT>
int launch(const Args& a0, int dtype, int nti, cudaStream_t stream) {
  Args a = a0;
  constexpr int TOK = 8 * NT;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return check_launch("cudaGetDevice");
  DeviceInfo& di = device_info(dev);
  auto kernel = gemv_mma_kernel<T, NT>;
  if (!di.ready[dtype][nti]) {
    if (cudaDeviceGetAttribute(&di.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&di.occ[dtype][nti], kernel, kThreads, 0) != cudaSuccess)
      return check_launch("gemv_mma setup");
    di.ready[dtype][nti] = true;
  }
  const int tok_tiles = (a.M + TOK - 1) / TOK;
  const int row_blocks = (a.N + rows_per_block<NT>() - 1) / rows_per_block<NT>();
  const long long base = (long long)tok_tiles * row_blocks;
  const long long capacity = (long long)std::max(di.occ[dtype][nti], 1) * di.sms;
  // Most K splits that keep the grid within one wave of resident blocks: split-K only where the
  // row blocks alone cannot fill the GPU. Splits start on kPF boundaries (aligned 256 B runs).
  const int runs = (a.nkb + kPF - 1) / kPF;
  int splits = (int)std::max<long long>(1, std::min<long long>(capacity / base, runs));
  a.kb_per_split = ((runs + splits - 1) / splits) * kPF;
  splits = (a.nkb + a.kb_per_split - 1) / a.kb_per_split;
  dim3 grid(tok_tiles, row_blocks, splits);
  if (splits > 1 && a.ws == nullptr) return fail(AWQ_ERR_ARG, "awq_int4_gemm_mma: split-K needs a workspace");
  kernel<<<grid, kThreads, 0, stream>>>(a);
  if (int e = check_launch("gemv_mma_kernel")) return e;
  if (splits > 1) {
    const int64_t total = (int64_t)a.M * a.N;
    const int blocks = (int)std::min<int64_t>((total + 255) / 256, (int64_t)di.sms * 8);
    finalize_kernel<T><<<blocks, 256, 0, stream>>>(a.ws, static_cast<const T*>(a.bias),
                                                   static_cast<T*>(a.y), total, a.N);
    return check_launch("finalize_kernel");
  }
  return AWQ_OK;
}

template <typename T>
int dispatch_nt(const Args& a, int dtype, cudaStream_t stream) {
  if (a.M <= 8) return launch<T, 1>(a, dtype, 0, stream);
  if (a.M <= 16) return launch<T, 2>(a, dtype, 1, stream);
  return launch<T, 4>(a, dtype, 2, stream);
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_int4_mma_max_m(void) { return 65535LL * 32; }

extern "C" int awq_int4_gemm_mma(const void* x, const uint8_t* qweight, const void* scales,
                                 const uint8_t* zeros, const void* bias, void* y, float* workspace,
                                 int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size,
                                 int dtype, void* stream) {
  using namespace awq;
  const int log2g = group_size == 32 ? 5 : group_size == 64 ? 6 : group_size == 128 ? 7 : -1;
  if (log2g < 0 || M < 1 || N < 1 || Kp % group_size || K <= Kp - group_size || K > Kp ||
      M > awq_int4_mma_max_m() || N > (1 << 30) || Kp > (1 << 30) || (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16))
    return fail(AWQ_ERR_ARG,
                "awq_int4_gemm_mma: bad sizes M=%lld N=%lld K=%lld Kp=%lld group_size=%d dtype=%d",
                (long long)M, (long long)N, (long long)K, (long long)Kp, group_size, dtype);
  if (!x || !qweight || !scales || !zeros || !y || ((uintptr_t)qweight & 15))
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_mma: null pointer or qweight not 16-byte aligned");
  Args a{x, qweight, scales, zeros, bias, y, workspace, (int)M, (int)N, (int)K, (int)Kp, log2g,
         (int)(Kp / group_size), 0, (int)((Kp + kKB - 1) / kKB),
         (K % 8 == 0) && (((uintptr_t)x & 15) == 0)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? dispatch_nt<__nv_bfloat16>(a, dtype, s)
                                 : dispatch_nt<__half>(a, dtype, s);
}
