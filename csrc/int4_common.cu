// Error reporting behind the C ABI, device limits, launch settings (see int4_common.cuh).
#include <stdarg.h>
#include <stdlib.h>

#include "int4_common.cuh"

namespace awq {

char* error_buffer() {
  static thread_local char buf[1024] = "";
  return buf;
}

int fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(error_buffer(), 1024, fmt, ap);
  va_end(ap);
  return code;
}

int check_gemv_sizes(const char* who, int64_t M, int64_t max_m, int64_t N, int64_t K, int64_t Kp,
                     int group_size, int dtype) {
  const int log2g = group_size == 32 ? 5 : group_size == 64 ? 6 : group_size == 128 ? 7 : -1;
  if (log2g < 0 || M < 1 || M > max_m || N < 1 || Kp % group_size || K <= Kp - group_size || K > Kp ||
      N * (Kp / 2) >= (1LL << 31) || (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16)) {
    fail(AWQ_ERR_ARG, "%s: bad sizes M=%lld N=%lld K=%lld Kp=%lld group_size=%d dtype=%d", who,
         (long long)M, (long long)N, (long long)K, (long long)Kp, group_size, dtype);
    return -1;
  }
  return log2g;
}

int check_segs(const char* who, Int4Seg (&seg)[kMaxSeg], int nseg, const int64_t* Ns, int64_t M, int64_t max_m,
               int64_t K, int64_t Kp, int group_size, int dtype) {
  if (nseg < 1 || nseg > kMaxSeg || !Ns) {
    fail(AWQ_ERR_ARG, "%s: %d weights (1..%d) or a null array", who, nseg, kMaxSeg);
    return -1;
  }
  int log2g = -1;
  for (int i = 0; i < nseg; ++i) {
    log2g = check_gemv_sizes(who, M, max_m, Ns[i], K, Kp, group_size, dtype);
    if (log2g < 0) return -1;
    seg[i].N = (int)Ns[i];
  }
  return log2g;
}

int set_seg_pointers(const char* who, Int4Seg (&seg)[kMaxSeg], int nseg, const void* x,
                     const uint8_t* const* qweights, const void* const* scales, const uint8_t* const* zeros,
                     const void* const* biases, void* const* ys) {
  if (!x || !qweights || !scales || !zeros || !biases || !ys) return fail(AWQ_ERR_ARG, "%s: null pointer", who);
  for (int i = 0; i < nseg; ++i) {
    if (!qweights[i] || !scales[i] || !zeros[i] || !ys[i] || ((uintptr_t)qweights[i] & 15))
      return fail(AWQ_ERR_ARG, "%s: weight %d: null pointer or qweight not 16-byte aligned", who, i);
    seg[i].qweight = qweights[i]; seg[i].scales = scales[i]; seg[i].zeros = zeros[i];
    seg[i].bias = biases[i]; seg[i].y = ys[i];
  }
  return AWQ_OK;
}

int check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(AWQ_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return AWQ_OK;
}

int device_smem(const DeviceSmem*& out) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return check_launch("cudaGetDevice");
  static DeviceSmem info[64];
  DeviceSmem& d = info[dev & 63];
  if (d.sms == 0) {
    DeviceSmem n;
    n.dev = dev;
    if (cudaDeviceGetAttribute(&n.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) != cudaSuccess)
      return check_launch("cudaDeviceGetAttribute");
    d = n;
  }
  out = &d;
  return AWQ_OK;
}

size_t spread_smem(const DeviceSmem& d, long long blocks, size_t smem) {
  const long long per_sm = (blocks + d.sms - 1) / d.sms;
  // The least size at which per_sm + 1 blocks no longer fit an SM's shared memory.
  const long long s = ((long long)d.smem_sm / (per_sm + 1) - d.smem_reserved + 1 + 15) / 16 * 16;
  if (s <= (long long)smem || s > d.smem_optin || (s + d.smem_reserved) * per_sm > d.smem_sm) return smem;
  return (size_t)s;
}

long env_long(const char* name, long dflt) {
  const char* e = getenv(name);
  if (!e || !*e) return dflt;
  char* end = nullptr;
  const long v = strtol(e, &end, 10);
  return *end == '\0' ? v : dflt;
}

bool pdl_enabled(const DeviceSmem& d, int m) { return d.major >= 9 && m <= env_long("AWQ_PDL", kPdlMaxM); }

bool pdl_cluster_enabled(int size) { return size <= env_long("AWQ_PDL_CLUSTER", kPdlMaxCluster); }

int norm_in(NormIn& out, const awq_norm_in* nm, int K, const char* who) {
  auto misaligned = [](const void* p) { return ((uintptr_t)p & 15) != 0; };
  if (!nm->residual || !nm->weight || !nm->h || (!nm->delta) == (!nm->partials) || (nm->partials && nm->slices < 1) ||
      (nm->delta_bias && !nm->partials) || !(nm->eps >= 0.f))
    return fail(AWQ_ERR_ARG, "%s: bad norm arguments (residual, weight and h needed; delta or partials with "
                "slices >= 1; delta_bias with partials only; eps >= 0)", who);
  if (K % 8 || misaligned(nm->residual) || misaligned(nm->delta) || misaligned(nm->partials) ||
      misaligned(nm->delta_bias) || misaligned(nm->weight) || misaligned(nm->h))
    return fail(AWQ_ERR_ARG, "%s: the norm needs K %% 8 == 0 (K=%d) and 16-byte aligned tensors", who, K);
  out = NormIn{nm->residual, nm->delta, nm->partials, nm->delta_bias, nm->weight, nm->h, (int)nm->slices, nm->eps};
  return AWQ_OK;
}

}  // namespace awq

extern "C" {
int awq_int4_abi_version(void) { return 15; }  // 2: +awq_int4_gemm_simt; 3: +_tc; 4: +_pc; 5: +_sm90; 6: +_simt_multi; 7: +_fold; 8: +_fold_glu; 9: +_simt_partials; 10: +awq_rope_cache; 11: +_fold_rope; 12: norm argument of _fold_glu and _fold_rope; 13: +awq_decode_attention; 14: awq_int4_gemm_mma's workspace size (+_mma_workspace), deterministic; 15: +awq_add_rms_norm
const char* awq_int4_last_error(void) { return awq::error_buffer(); }
}
