// Attention of a few query rows against a KV cache (awq::decode_attention,
// passes/swap_decode_attention.py): at decode, torch's scaled_dot_product_attention kernels are
// tiled for long query blocks and read the whole cache, masked positions included.
//
//     out[b, h, s, :] = sum_p softmax_p(scale * q[b, h, s, :] . k[b, h / G, p, :] + mask[b, h, s, p])
//                       * v[b, h / G, p, :]
//
// with G = Hq / Hkv query heads a KV head (grouped-query attention), mask boolean (false: masked),
// additive, or none. Masked positions are not read at all. A row with every position masked is 0
// (as torch's math attention gives since it takes a safe softmax).
//
// Grid: x = (b, kv head), y = the split of the L positions into `splits` chunks; the blocks of
// one (b, kv head) form a cluster and add their partial softmax sums through distributed shared
// memory, so one launch and no workspace. A block holds the R = G * S query rows of its KV head
// (R <= 8): each K and V row it loads serves all of them.
// Inside a block (4 warps): D / 8 lanes share a position, each holding 8 of its D values (one
// 16-byte load of K and one of V), so a warp covers 32 / (D / 8) positions at a time and a
// thread has NI positions' loads in flight at once. Scores are in the log2 domain (q is scaled
// by scale * log2(e) as it is loaded, the mask by log2(e)); softmax is online in fp32: each
// group of lanes keeps its running max, sum and accumulator, then the block's groups are
// combined, then the cluster's blocks.
#include <cooperative_groups.h>
#include <stdlib.h>

#include <algorithm>

#include "int4_common.cuh"

namespace cg = cooperative_groups;

namespace awq {
namespace {

constexpr int kAttnThreads = 128;
constexpr int kAttnMaxRows = 8;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
  const void *q, *k, *v, *mask;
  void* out;
  int64_t qs[3], ks[3], vs[3], ms[4];  // element strides: q (b, h, s), k and v (b, h, p), mask (b, h, s, p)
  int mask_kind;                       // 0 none, 1 bool, 2 additive in T, 3 additive in fp32
  int Hq, Hkv, S, L, rows, chunk;      // rows = G * S; chunk: positions a block
  float qscale;                        // scale * log2(e)
};

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& w, float (&f)[8]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const typename Half2Traits<T>::T2 h = *reinterpret_cast<const typename Half2Traits<T>::T2*>(&u[i]);
    f[2 * i] = Half2Traits<T>::to_float(h.x);
    f[2 * i + 1] = Half2Traits<T>::to_float(h.y);
  }
}

// The mask's value of row r (head h, query s) at position p, in the log2 domain; -inf: masked.
template <typename T>
__device__ __forceinline__ float mask_at(const AttnArgs& a, int b, int h, int s, int p) {
  if (a.mask_kind == 0) return 0.f;
  const int64_t i = b * a.ms[0] + h * a.ms[1] + s * a.ms[2] + p * a.ms[3];
  if (a.mask_kind == 1) return static_cast<const uint8_t*>(a.mask)[i] ? 0.f : -INFINITY;
  const float m = a.mask_kind == 2 ? Half2Traits<T>::to_float(static_cast<const T*>(a.mask)[i])
                                   : static_cast<const float*>(a.mask)[i];
  return m * kLog2e;
}

// Merges n partial softmax sums of one output, part(k) = {max, sum, accumulator} (log2 domain):
// returns the max and leaves the merged sum and accumulator in sum and v (0 where every partial
// is empty, max -inf). Serves the block's lane groups and the cluster's blocks alike.
template <typename Part>
__device__ __forceinline__ float merge_partials(int n, Part part, float& sum, float& v) {
  float mx = -INFINITY;
  for (int k = 0; k < n; ++k) mx = fmaxf(mx, part(k).x);
  sum = 0.f;
  v = 0.f;
  if (mx == -INFINITY) return mx;
  for (int k = 0; k < n; ++k) {
    const float3 pk = part(k);
    const float c = exp2f(pk.x - mx);
    sum += c * pk.y;
    v += c * pk.z;
  }
  return mx;
}

template <typename T, int D, int R, int NI, int THREADS>
__global__ void __launch_bounds__(THREADS) decode_attention_kernel(const AttnArgs a) {
  constexpr int LPP = D / 8;             // lanes a position
  constexpr int PPW = 32 / LPP;          // positions a warp
  constexpr int PP = PPW * (THREADS / 32);  // positions a block, a step
  constexpr int RP = PP * NI;            // positions a round (every load in flight at once)
  constexpr int TP = RP * 4;             // positions a tile (the mask staged in shared memory)
  __shared__ float mb[R][TP];            // the tile's mask, log2 domain
  __shared__ float part_ml[PP][R][2];    // each lane group's running max and sum
  __shared__ float part_acc[PP][R][D];   // and accumulator
  __shared__ float res[R][D + 2];        // the block's result: accumulator, max, sum

  const int tid = threadIdx.x, lane = tid & 31, grp = tid / LPP, j = lane % LPP;
  const int bh = blockIdx.x, b = bh / a.Hkv, hk = bh - b * a.Hkv, G = a.Hq / a.Hkv;
  const int start = blockIdx.y * a.chunk, end = min(a.L, start + a.chunk);

  pdl_wait();  // q, the caches and the mask are written by the kernels before
  pdl_trigger();

  float q[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int h = hk * G + r / a.S, s = r % a.S;
    if (r < a.rows) {
      const uint4 w = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + b * a.qs[0] + h * a.qs[1] +
                                                     s * a.qs[2] + 8 * j);
      to_float8<T>(w, q[r]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[r][e] *= a.qscale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[r][e] = 0.f;
    }
  }
  const T* kbase = static_cast<const T*>(a.k) + b * a.ks[0] + hk * a.ks[1] + 8 * j;
  const T* vbase = static_cast<const T*>(a.v) + b * a.vs[0] + hk * a.vs[1] + 8 * j;

  float m[R], l[R], acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  for (int tile0 = start; tile0 < end; tile0 += TP) {
    bool any = false;
    for (int i = tid; i < R * TP; i += THREADS) {
      const int r = i / TP, tp = i - r * TP, p = tile0 + tp;
      float v = -INFINITY;
      if (r < a.rows && p < end) v = mask_at<T>(a, b, hk * G + r / a.S, r % a.S, p);
      mb[r][tp] = v;
      any |= v != -INFINITY;
    }
    if (!__syncthreads_or(any)) continue;  // every position of the tile masked: nothing to read
    const int tend = min(end - tile0, TP);
    for (int base = 0; base < tend; base += RP) {
      uint4 kr[NI], vr[NI];
      bool ld[NI];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int tp = base + grp + i * PP;
        bool need = false;
        if (tp < tend) {
#pragma unroll
          for (int r = 0; r < R; ++r) need |= mb[r][tp] != -INFINITY;
        }
        ld[i] = need;
        kr[i] = vr[i] = make_uint4(0, 0, 0, 0);
        if (need) {
          const int p = tile0 + tp;
          kr[i] = __ldg(reinterpret_cast<const uint4*>(kbase + p * a.ks[2]));
          vr[i] = __ldg(reinterpret_cast<const uint4*>(vbase + p * a.vs[2]));
        }
      }
      float sc[NI][R];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        float kf[8];
        to_float8<T>(kr[i], kf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) d = fmaf(q[r][e], kf[e], d);
#pragma unroll
          for (int o = LPP / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
          const int tp = base + grp + i * PP;
          sc[i][r] = ld[i] ? d + mb[r][tp] : -INFINITY;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float mx = m[r];
#pragma unroll
        for (int i = 0; i < NI; ++i) mx = fmaxf(mx, sc[i][r]);
        if (mx == -INFINITY) continue;  // nothing unmasked yet for this row
        const float c = exp2f(m[r] - mx);  // 0 when m was -inf
        l[r] *= c;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] *= c;
        m[r] = mx;
      }
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        float vf[8];
        to_float8<T>(vr[i], vf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float w = sc[i][r] == -INFINITY ? 0.f : exp2f(sc[i][r] - m[r]);
          l[r] += w;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(w, vf[e], acc[r][e]);
        }
      }
    }
    __syncthreads();  // mb is restaged by the next tile
  }

  // The block's lane groups, combined.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (j == 0) {
      part_ml[grp][r][0] = m[r];
      part_ml[grp][r][1] = l[r];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) part_acc[grp][r][8 * j + e] = acc[r][e];
  }
  __syncthreads();
  for (int i = tid; i < R * D; i += THREADS) {
    const int r = i / D, d = i - r * D;
    float sum, v;
    const float mx = merge_partials(
        PP, [&](int g) { return make_float3(part_ml[g][r][0], part_ml[g][r][1], part_acc[g][r][d]); }, sum, v);
    res[r][d] = v;
    if (d == 0) {
      res[r][D] = mx;
      res[r][D + 1] = sum;
    }
  }

  // The cluster's blocks, combined: block c of n writes every n-th of the R x D outputs.
  const int n = gridDim.y, c = blockIdx.y;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (n > 1) cluster.sync();
  else __syncthreads();
  auto block_res = [&](int k) -> const float* { return n > 1 ? cluster.map_shared_rank(&res[0][0], k) : &res[0][0]; };
#else
  __syncthreads();  // below sm_90 the launcher never splits (n == 1)
  auto block_res = [&](int) -> const float* { return &res[0][0]; };
#endif
  for (int i = c * THREADS + tid; i < R * D; i += n * THREADS) {
    const int r = i / D, d = i - r * D;
    if (r >= a.rows) continue;
    float sum, v;
    merge_partials(n, [&](int k) {
      const float* rk = block_res(k) + r * (D + 2);
      return make_float3(rk[D], rk[D + 1], rk[d]);
    }, sum, v);
    const int h = hk * G + r / a.S, s = r % a.S;
    static_cast<T*>(a.out)[(((int64_t)b * a.Hq + h) * a.S + s) * D + d] =
        Half2Traits<T>::from_float(sum > 0.f ? v / sum : 0.f);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (n > 1) cluster.sync();  // the other blocks may still read this one's res
#endif
}

// Loads in flight a thread (a round), positions a round, and the kernel's R for a count of rows.
constexpr int ni_for(int R) { return R <= 2 ? 8 : R == 4 ? 4 : 2; }
constexpr int round_positions(int D, int R, int threads = kAttnThreads) {
  return (32 / (D / 8)) * (threads / 32) * ni_for(R);
}

// Whether blocks of at most 2 query rows may be 8 warps instead of kAttnThreads' 4: by default,
// $AWQ_ATTN_THREADS=128 keeps 4 (read on every call). Twice a block's loads in flight, half its
// rounds. Taken where the grid fits in one wave at 2 such blocks a SM (128 registers a thread):
// not 13B's 320 (batch, head) pairs at batch 8. H200 (csrc/NOTES.md, sessions 17-18): graph-timed,
// 7B batch 1 -0.6 to -0.8 us, batch 8 +0.4 / -0.1 / -2.7 us at 129 / 256 / 384 positions filled;
// 7B decode at batch 8 +1.4% alone, +3.8% with the tc kernel's PDL.
bool eight_warps_allowed() { return env_long("AWQ_ATTN_THREADS", 256) == 256; }
int rows_template(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

// Blocks a (batch, KV head): `forced` (1..8) where the caller asks, else $AWQ_ATTN_SPLITS
// (experiments), else about 2 a SM in all (H200: at batch 8 of 7B's 32 heads one block a head was
// faster than 2 or 3, at batch 1 a cluster of 8 the fastest; benchmarks/RESULTS.md, section 3,
// session 15), no more than rounds of positions, at most a portable cluster (8). 1 below sm_90.
int splits_for(const DeviceSmem& d, int64_t bh, int64_t L, int rp, int forced) {
  if (d.major < 9) return 1;  // clusters are sm_90's
  if (forced > 0) return std::min(forced, 8);
  const char* e = getenv("AWQ_ATTN_SPLITS");
  if (e && *e) {
    const long v = strtol(e, nullptr, 10);
    if (v >= 1 && v <= 8) return (int)v;
  }
  const int64_t by_len = (L + rp - 1) / rp, by_sms = 2LL * d.sms / bh;
  return (int)std::max<int64_t>(1, std::min<int64_t>(8, std::min(by_len, by_sms)));
}

// One launch of TH threads a block and n blocks a (batch, KV head).
template <typename T, int D, int R, int TH>
int launch_threads(AttnArgs a, const DeviceSmem& d, int64_t B, int n, cudaStream_t stream) {
  a.chunk = (a.L + n - 1) / n;
  // clusters launch early only where pdl_cluster_enabled (by default up to 2 blocks; session 17)
  const bool pdl = (n == 1 || pdl_cluster_enabled(n)) && pdl_enabled(d, (int)(B * a.S));
  LaunchCfg l(dim3((unsigned)(B * a.Hkv), (unsigned)n), dim3(TH), 0, stream, n, pdl);
  cudaLaunchKernelEx(&l.cfg, decode_attention_kernel<T, D, R, ni_for(R), TH>, a);
  return check_launch("decode_attention_kernel");
}

template <typename T, int D, int R>
int launch(const AttnArgs& a, int64_t B, int splits, cudaStream_t stream) {
  const DeviceSmem* d = nullptr;
  if (int rc = device_smem(d)) return rc;
  const int64_t bh = B * a.Hkv;
  if constexpr (R <= 2) {
    if (eight_warps_allowed()) {
      const int n = splits_for(*d, bh, a.L, round_positions(D, R, 256), splits);
      if (bh * n <= 2LL * d->sms) return launch_threads<T, D, R, 256>(a, *d, B, n, stream);
    }
  }
  return launch_threads<T, D, R, kAttnThreads>(a, *d, B, splits_for(*d, bh, a.L, round_positions(D, R), splits),
                                               stream);
}

template <typename T, int D>
int launch_rows(const AttnArgs& a, int64_t B, int splits, cudaStream_t s) {
  switch (rows_template(a.rows)) {
    case 1: return launch<T, D, 1>(a, B, splits, s);
    case 2: return launch<T, D, 2>(a, B, splits, s);
    case 4: return launch<T, D, 4>(a, B, splits, s);
    default: return launch<T, D, 8>(a, B, splits, s);
  }
}

template <typename T>
int launch_dim(const AttnArgs& a, int64_t B, int64_t D, int splits, cudaStream_t s) {
  return D == 64 ? launch_rows<T, 64>(a, B, splits, s) : launch_rows<T, 128>(a, B, splits, s);
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_decode_attention_max_rows(void) { return awq::kAttnMaxRows; }

extern "C" int64_t awq_decode_attention_rounds(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t L, int64_t D) {
  using namespace awq;
  if (B < 1 || Hkv < 1 || Hq % Hkv || S < 1 || (Hq / Hkv) * S > kAttnMaxRows || L < 1 || (D != 64 && D != 128))
    return -(int64_t)fail(AWQ_ERR_ARG, "awq_decode_attention_rounds: bad sizes");
  const DeviceSmem* d = nullptr;
  if (device_smem(d)) return -1;
  const int R = rows_template((Hq / Hkv) * S), rp = D == 64 ? round_positions(64, R) : round_positions(128, R);
  const int n = splits_for(*d, B * Hkv, L, rp, 0);
  const int64_t chunk = (L + n - 1) / n;
  return (chunk + rp - 1) / rp;
}

extern "C" int awq_decode_attention(const void* q, const void* k, const void* v, const void* mask, void* out,
                                    const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                                    const int64_t* mask_strides, int mask_kind, int64_t B, int64_t Hq, int64_t Hkv,
                                    int64_t S, int64_t L, int64_t D, float scale, int splits, int dtype,
                                    void* stream) {
  using namespace awq;
  const int64_t G = Hkv > 0 ? Hq / Hkv : 0;
  if (B < 1 || Hkv < 1 || Hq < 1 || Hq % Hkv || S < 1 || G * S > kAttnMaxRows || L < 1 || L > (1 << 30) ||
      (D != 64 && D != 128) || B * Hkv > (1LL << 31) - 1 || mask_kind < 0 || mask_kind > 3 || splits < 0 ||
      (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16))
    return fail(AWQ_ERR_ARG,
                "awq_decode_attention: bad sizes B=%lld Hq=%lld Hkv=%lld S=%lld L=%lld D=%lld mask_kind=%d "
                "splits=%d dtype=%d",
                (long long)B, (long long)Hq, (long long)Hkv, (long long)S, (long long)L, (long long)D, mask_kind,
                splits, dtype);
  if (!q || !k || !v || !out || !q_strides || !k_strides || !v_strides || (mask_kind && (!mask || !mask_strides)))
    return fail(AWQ_ERR_ARG, "awq_decode_attention: null pointer");
  bool aligned = !((uintptr_t)q & 15) && !((uintptr_t)k & 15) && !((uintptr_t)v & 15);
  for (int i = 0; i < 3; ++i) aligned &= !(q_strides[i] & 7) && !(k_strides[i] & 7) && !(v_strides[i] & 7);
  if (!aligned) return fail(AWQ_ERR_ARG, "awq_decode_attention: q, k or v not 16-byte aligned (pointer or stride)");
  AttnArgs a{};
  a.q = q; a.k = k; a.v = v; a.mask = mask; a.out = out;
  for (int i = 0; i < 3; ++i) {
    a.qs[i] = q_strides[i];
    a.ks[i] = k_strides[i];
    a.vs[i] = v_strides[i];
  }
  for (int i = 0; i < 4; ++i) a.ms[i] = mask_kind ? mask_strides[i] : 0;
  a.mask_kind = mask_kind;
  a.Hq = (int)Hq; a.Hkv = (int)Hkv; a.S = (int)S; a.L = (int)L; a.rows = (int)(G * S);
  a.qscale = scale * kLog2e;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? launch_dim<__nv_bfloat16>(a, B, D, splits, s)
                                 : launch_dim<__half>(a, B, D, splits, s);
}
