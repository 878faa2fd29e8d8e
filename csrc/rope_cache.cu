// Rotary embedding of q and k and the static KV-cache write of k and v, in one launch after the
// q/k/v projection (awq::int4_linear_rope_cache, passes/fuse_rope_cache.py).
//
// For token t = (b, s), head h and j < D/2 (h2 = D/2, p = pos[s]):
//     q[t, h, j]      <- q[t, h, j] * cos[j] - q[t, h, j + h2] * sin[j]           (in place)
//     q[t, h, j + h2] <- q[t, h, j + h2] * cos[j + h2] + q[t, h, j] * sin[j + h2]
//     k_cache[b, h, p, :] <- k[t, h, :] rotated the same way
//     v_cache[b, h, p, :] <- v[t, h, :]
// with cos, sin the rows [b or 0, s, :]: Llama's `x * cos + rotate_half(x) * sin`. Each value is
// computed in fp32 from the T inputs (each product and the sum rounded, as torch's fp32 ops do)
// and rounded to T once (as inductor's fused kernel does).
// One thread a (token, head, j) of q, k and v; the grid's y is the token. A position outside
// [0, L) writes nothing (the reference, index_copy_, raises there).
#include "int4_common.cuh"

namespace awq {
namespace {

struct RopeArgs {
  void* q;
  const void *k, *v, *cos, *sin;
  const int64_t* pos;
  void *k_cache, *v_cache;
  int64_t cos_bstride;  // elements between batch rows of cos and sin (0: one row for all)
  int S, Hq, Hkv, D, L;
};

template <typename T>
__global__ void rope_cache_kernel(const RopeArgs a) {
  const int h2 = a.D / 2, t = blockIdx.y, b = t / a.S, s = t - b * a.S;
  const int per_token = (a.Hq + 2 * a.Hkv) * h2;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= per_token) return;
  const int head = i / h2, j = i - head * h2;
  const bool is_q = head < a.Hq, is_v = head >= a.Hq + a.Hkv;
  const int hc = is_q ? 0 : head - a.Hq - (is_v ? a.Hkv : 0);  // the head in k or v
  // Every load is issued before any is used: one memory latency (the position only matters for
  // the store), where a check of the position first would make it two.
  const T* src = is_q ? static_cast<const T*>(a.q) + ((int64_t)t * a.Hq + head) * a.D
                      : static_cast<const T*>(is_v ? a.v : a.k) + ((int64_t)t * a.Hkv + hc) * a.D;
  const T* cs = static_cast<const T*>(a.cos) + b * a.cos_bstride + (int64_t)s * a.D;
  const T* sn = static_cast<const T*>(a.sin) + b * a.cos_bstride + (int64_t)s * a.D;
  const int64_t p = is_q ? 0 : __ldg(a.pos + s);
  const T r0 = src[j], r1 = src[j + h2];
  const T c0 = __ldg(cs + j), c1 = __ldg(cs + j + h2), s0 = __ldg(sn + j), s1 = __ldg(sn + j + h2);
  T* dst;
  if (is_q) {
    dst = static_cast<T*>(a.q) + ((int64_t)t * a.Hq + head) * a.D;  // in place: this thread alone reads j, j + h2
  } else {
    if (p < 0 || p >= a.L) return;
    dst = static_cast<T*>(is_v ? a.v_cache : a.k_cache) + (((int64_t)b * a.Hkv + hc) * a.L + p) * a.D;
  }
  if (is_v) {
    dst[j] = r0;
    dst[j + h2] = r1;
    return;
  }
  rotate_pair<T>(r0, r1, c0, c1, s0, s1, dst[j], dst[j + h2]);
}

}  // namespace
}  // namespace awq

extern "C" int awq_rope_cache(void* q, const void* k, const void* v, const void* cos, const void* sin,
                              int64_t cos_bstride, const int64_t* pos, void* k_cache, void* v_cache, int64_t B,
                              int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t L, int dtype, void* stream) {
  using namespace awq;
  if (B < 1 || S < 1 || Hq < 1 || Hkv < 1 || D < 2 || D % 2 || L < 1 || B * S > 65535 ||
      (Hq + 2 * Hkv) * D > (1 << 30) || cos_bstride < 0 || (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16))
    return fail(AWQ_ERR_ARG, "awq_rope_cache: bad sizes B=%lld S=%lld Hq=%lld Hkv=%lld D=%lld L=%lld dtype=%d",
                (long long)B, (long long)S, (long long)Hq, (long long)Hkv, (long long)D, (long long)L, dtype);
  if (!q || !k || !v || !cos || !sin || !pos || !k_cache || !v_cache)
    return fail(AWQ_ERR_ARG, "awq_rope_cache: null pointer");
  RopeArgs a{q, k, v, cos, sin, pos, k_cache, v_cache, cos_bstride, (int)S, (int)Hq, (int)Hkv, (int)D, (int)L};
  const int per_token = (int)((Hq + 2 * Hkv) * (D / 2));
  const dim3 grid((per_token + 255) / 256, (unsigned)(B * S));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == AWQ_DTYPE_BF16)
    rope_cache_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(a);
  else
    rope_cache_kernel<__half><<<grid, 256, 0, s>>>(a);
  return check_launch("rope_cache_kernel");
}
