// INT4 -> half/bf16 dequantization, the first half of the large-M path (dequantize + cuBLAS).
//
// Computes
//     w[n, k] = (q[n, k] - z[n, k/g]) * s[n, k/g]        for k < K
// in T (fp16 or bf16), bit-identical to awq_compile.quant.dequantize(..., dtype=T), from NK_U8
// (docs/format.md): qweight uint8 [N, Kp/2], scales T [N, Kp/g], zeros uint8 [N, Kp/g];
// w is T [N, K] row-major (the padded columns K..Kp-1 are dropped).
//
// One thread per 32-bit word (8 weights): a 4-byte load, 8 exact conversions (dequant8), one
// 16-byte store. The kernel is bound by its writes (4 bytes out per byte in).
//
// Limitations:
//   1. 16-byte stores need K % 8 == 0 and w 16-byte aligned; otherwise the tail of a row (or every
//      word) is stored element by element.
//   2. This path writes and re-reads a full half-precision weight per call: an interim for large M
//      until a mixed-input GEMM reads the packed weight directly (csrc/NOTES.md).
#include <algorithm>

#include "int4_common.cuh"

namespace awq {
namespace {

template <typename T>
__global__ void dequant_kernel(const uint32_t* qweight, const uint16_t* scales,
                               const uint8_t* zeros, uint16_t* w, int64_t total_words, int N,
                               int K, int Kp, int log2g, bool vec) {
  constexpr uint32_t kMagic = Half2Traits<T>::kMagic;
  const int words = Kp / 8;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total_words;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int n = (int)(i / words), k = (int)(i - (int64_t)n * words) * 8;
    if (k >= K) continue;
    const int64_t gi = (int64_t)n * (Kp >> log2g) + (k >> log2g);
    uint32_t p[4];
    dequant8<T>(__ldg(qweight + i), (kMagic | __ldg(zeros + gi)) * 0x10001u,
                __ldg(scales + gi) * 0x10001u, p);
    // p[i] = (k_i, k_{i+4}); back to natural order (k0,k1), (k2,k3), (k4,k5), (k6,k7).
    const uint4 out = make_uint4(__byte_perm(p[0], p[1], 0x5410), __byte_perm(p[2], p[3], 0x5410),
                                 __byte_perm(p[0], p[1], 0x7632), __byte_perm(p[2], p[3], 0x7632));
    uint16_t* dst = w + (int64_t)n * K + k;
    if (vec && k + 8 <= K) {
      *reinterpret_cast<uint4*>(dst) = out;
    } else {
      const uint32_t o[4] = {out.x, out.y, out.z, out.w};
      for (int j = 0; j < 8 && k + j < K; ++j) dst[j] = (uint16_t)(o[j / 2] >> (16 * (j & 1)));
    }
  }
}

}  // namespace
}  // namespace awq

extern "C" int awq_int4_dequant(const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                                void* w, int64_t N, int64_t K, int64_t Kp, int group_size,
                                int dtype, void* stream) {
  using namespace awq;
  const int log2g = group_size == 32 ? 5 : group_size == 64 ? 6 : group_size == 128 ? 7 : -1;
  if (log2g < 0 || N < 1 || Kp % group_size || K <= Kp - group_size || K > Kp || N > (1 << 30) ||
      Kp > (1 << 30) || (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16))
    return fail(AWQ_ERR_ARG, "awq_int4_dequant: bad sizes N=%lld K=%lld Kp=%lld group_size=%d dtype=%d",
                (long long)N, (long long)K, (long long)Kp, group_size, dtype);
  if (!qweight || !scales || !zeros || !w || ((uintptr_t)qweight & 3))
    return fail(AWQ_ERR_ARG, "awq_int4_dequant: null pointer or qweight not 4-byte aligned");
  const int64_t total = N * (Kp / 8);
  const bool vec = K % 8 == 0 && ((uintptr_t)w & 15) == 0;
  const int blocks = (int)std::min<int64_t>((total + 255) / 256, 132 * 32);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto q = reinterpret_cast<const uint32_t*>(qweight);
  auto sc = static_cast<const uint16_t*>(scales);
  auto out = static_cast<uint16_t*>(w);
  if (dtype == AWQ_DTYPE_BF16)
    dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(q, sc, zeros, out, total, (int)N, (int)K, (int)Kp, log2g, vec);
  else
    dequant_kernel<__half><<<blocks, 256, 0, s>>>(q, sc, zeros, out, total, (int)N, (int)K, (int)Kp, log2g, vec);
  return check_launch("dequant_kernel");
}
