// A decoder layer's residual add and the RMSNorm after it, alone (awq::add_rms_norm,
// passes/swap_add_rms_norm.py): for each of M rows of K,
//     h = T(residual + d),  d = delta, or T(sum of K-slice partials in order + delta_bias)
//     x = T(weight * T(h * rsqrt(mean_k(h^2) + eps)))
// with fp32 math, as the folded GEMV's norm prologue computes them (NormIn, int4_common.cuh).
//
// Where the projection after the norm cannot make x itself (more than one token a step, or a
// projection that is not ours), the norm was inductor's kernel: one program a row, 2.1-2.6 us at
// 7B's batch 8 on an H200 (benchmarks/gpu_runs/trace_b8_session16_call2_h200.txt). Here one block
// a row holds the row in registers (a thread 8 values): one read of the inputs, one barrier for
// the sum of squares, one write of h and x. The weight is a graph constant, so its load goes out
// before the kernel waits for the one before (programmatic dependent launch, sm_90).
//
// K % 8 == 0, K <= 8 * kMaxThreads, every pointer 16-byte aligned (the caller checks; the host
// code returns AWQ_ERR_ARG otherwise). The sum of squares is added in a fixed order (lanes by a
// butterfly, then warps in order): reproducible bit for bit.
#include "int4_common.cuh"

namespace awq {
namespace {

constexpr int kMaxThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) add_rms_norm_kernel(const NormIn nm, T* x, int M, int K) {
  __shared__ float warp_ss[kMaxThreads / 32];
  const int m = blockIdx.x, k = 8 * threadIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool on = k < K;
  uint4 gw = make_uint4(0u, 0u, 0u, 0u);
  if (on) gw = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(nm.gamma) + k));
  pdl_wait();  // residual and delta are written by the kernels before
  pdl_trigger();
  uint4 hw = make_uint4(0u, 0u, 0u, 0u);
  float ss = 0.f;
  if (on) {
    hw = load_h_word<T>(nm, M, K, m, k);
    *reinterpret_cast<uint4*>(static_cast<T*>(nm.h) + (size_t)m * K + k) = hw;
    const T* hh = reinterpret_cast<const T*>(&hw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float f = Half2Traits<T>::to_float(hh[i]);
      ss = fmaf(f, f, ss);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) warp_ss[warp] = ss;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += warp_ss[w];  // every thread: the same order
  if (!on) return;
  *reinterpret_cast<uint4*>(x + (size_t)m * K + k) = norm_word<T>(hw, gw, rsqrtf(total / (float)K + nm.eps));
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_add_rms_norm_max_k(void) { return 8 * awq::kMaxThreads; }

extern "C" int awq_add_rms_norm(const awq_norm_in* norm, void* x, int64_t M, int64_t K, int dtype, void* stream) {
  using namespace awq;
  if (!norm || !x || M < 1 || M > 65535 || K < 8 || K > 8 * kMaxThreads ||
      (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16))
    return fail(AWQ_ERR_ARG, "awq_add_rms_norm: bad arguments M=%lld K=%lld dtype=%d (K <= %d)", (long long)M,
                (long long)K, dtype, 8 * kMaxThreads);
  if ((uintptr_t)x & 15) return fail(AWQ_ERR_ARG, "awq_add_rms_norm: x must be 16-byte aligned");
  NormIn nm;
  if (int e = norm_in(nm, norm, (int)K, "awq_add_rms_norm")) return e;
  const DeviceSmem* d = nullptr;
  if (int e = device_smem(d)) return e;
  const int threads = (int)((K / 8 + 31) / 32 * 32);
  // With programmatic dependent launch wherever the decode kernels may take it ($AWQ_PDL=0: never):
  // the weight's load and the launch itself overlap the kernel before.
  const LaunchCfg l(dim3((unsigned)M), dim3(threads), 0, static_cast<cudaStream_t>(stream), 1, pdl_enabled(*d, 1));
  if (dtype == AWQ_DTYPE_BF16)
    cudaLaunchKernelEx(&l.cfg, add_rms_norm_kernel<__nv_bfloat16>, nm, static_cast<__nv_bfloat16*>(x), (int)M,
                       (int)K);
  else
    cudaLaunchKernelEx(&l.cfg, add_rms_norm_kernel<__half>, nm, static_cast<__half*>(x), (int)M, (int)K);
  return check_launch("add_rms_norm_kernel");
}
