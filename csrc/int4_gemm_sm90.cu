// Prefill GEMM for sm_90a: CUTLASS 3.x mixed-input warp-specialized GEMM (TMA loads, int4 weights
// upcast in registers, WGMMA with the weight as the register operand).
//
// CUTLASS's mixed-input mainloop wants the narrow type as the register (A) operand, so the GEMM
// is run transposed: y^T [N, M] = W [N, K] . x^T. In CUTLASS's terms
//   A = qweight, uint4b_t [N, K] row-major (K contiguous, row stride Kp): the NK_U8 bytes as
//       they are, with no repacking (byte b holds k = 2b in its low nibble, as cutlass::uint4b_t
//       arrays do);
//   B = x, [M, K] K-major;   D = y seen as [N, M] column-major, i.e. y [M, N] row-major.
// CUTLASS dequantizes as q * s + z', AWQ as (q - z) * s, so z' = -z * s. The mainloop also wants
// the scales N-major, so it reads two derived tensors, both T [Kp/g, N]:
//   scales_t = s^T and szeros_t = (-z * s)^T (one rounding to T),
// which awq_compile/_cuda.py builds once per weight and caches on the scales tensor.
// The epilogue adds the per-row (per output feature) bias, or nothing when bias is NULL.
//
// Needs: group_size a multiple of the tile's K (64), K % 32 == 0 (the TMA 16-byte rule on the int4
// rows), N % 8 == 0, 16-byte aligned pointers. Everything else goes to the other paths (_cuda.py).
#include "int4_common.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace {
using namespace cute;

// One kernel: activation type T, tile (weight rows x tokens x K), cluster; the cooperative
// warp-specialized schedule and CUTLASS's stream-K tile scheduler (it splits K across CTAs when
// there are too few output tiles to fill the GPU, and reduces the parts in a fixed order).
template <class T, class Tile, class Cluster>
struct Sm90Int4Gemm {
  using Q = cutlass::uint4b_t;
  using LayoutW = cutlass::layout::RowMajor;     // A: [N, K], K contiguous
  using LayoutX = cutlass::layout::ColumnMajor;  // B: x [M, K] seen as K x M, K contiguous
  using LayoutY = cutlass::layout::ColumnMajor;  // D: [N, M], N contiguous == y [M, N] row-major
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Q>::value;
  static constexpr int kAlign16 = 128 / cutlass::sizeof_bits<T>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutY, kAlign16,  // no C operand
      T, LayoutY, kAlign16, cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinCombPerRowBias<T, float, T, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Q, T, T>, LayoutW, kAlignW,  // weight, scale, zero' (scale-with-zero mode)
      T, LayoutX, kAlign16, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using C1 = Shape<_1, _1, _1>;

// The configurations, indexed by the `config` argument; _cuda.py picks one by M, N, K and group
// size (measured on an H100 among 18 candidates, data-parallel ones included: benchmarks/RESULTS.md,
// section 4). Tiles are weight rows x tokens x K. All use the stream-K scheduler, which runs
// data-parallel when the output tiles fill the GPU and splits K when they do not.
using C2 = Shape<_2, _1, _1>;  // CTA pairs that multicast their shared x tile
template <class T> using Cfg0 = Sm90Int4Gemm<T, Shape<_128, _16, _64>, C1>;
template <class T> using Cfg1 = Sm90Int4Gemm<T, Shape<_128, _64, _64>, C1>;
template <class T> using Cfg2 = Sm90Int4Gemm<T, Shape<_128, _128, _64>, C1>;
template <class T> using Cfg3 = Sm90Int4Gemm<T, Shape<_256, _16, _64>, C1>;
template <class T> using Cfg4 = Sm90Int4Gemm<T, Shape<_256, _64, _64>, C1>;
template <class T> using Cfg5 = Sm90Int4Gemm<T, Shape<_256, _128, _64>, C1>;
template <class T> using Cfg6 = Sm90Int4Gemm<T, Shape<_128, _256, _64>, C2>;
template <class T> using Cfg7 = Sm90Int4Gemm<T, Shape<_256, _16, _128>, C1>;  // group size 128
template <class T> using Cfg8 = Sm90Int4Gemm<T, Shape<_256, _64, _128>, C1>;  // group size 128
template <class T> using Cfg9 = Sm90Int4Gemm<T, Shape<_128, _64, _128>, C1>;  // group size 128
template <class T> using Cfg10 = Sm90Int4Gemm<T, Shape<_128, _16, _128>, C1>;  // group size 128
constexpr int kNumConfigs = 11;

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (!cached[device]) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

enum class Mode { kWorkspace, kRun };

struct Call {  // one launcher call's arguments, for every configuration
  Mode mode;
  awq::Int4Operands op;
  const void* scales_t;
  const void* szeros_t;
  void* workspace;
  int64_t workspace_bytes, M, N, K, Kp;
  int group_size, splits, device;
  cudaStream_t stream;
};

template <class Cfg>
typename Cfg::Gemm::Arguments make_args(const Call& c) {
  using G = typename Cfg::Gemm;
  using T = typename G::ElementD;
  using Mainloop = typename Cfg::Mainloop;
  using Kernel = typename Cfg::Kernel;
  const int scale_k = (int)(c.Kp / c.group_size);
  typename Mainloop::StrideA dW = make_stride(int64_t(c.Kp), Int<1>{}, int64_t(c.N) * c.Kp);
  typename Mainloop::StrideB dX = make_stride(int64_t(c.K), Int<1>{}, int64_t(c.M) * c.K);
  typename Mainloop::StrideScale dS = make_stride(Int<1>{}, int64_t(c.N), int64_t(c.N) * scale_k);
  typename Kernel::StrideD dY = make_stride(Int<1>{}, int64_t(c.N), int64_t(c.N) * c.M);
  typename G::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {(int)c.N, (int)c.M, (int)c.K, 1},  // the transposed problem
      {static_cast<const cutlass::uint4b_t*>(static_cast<const void*>(c.op.qweight)), dW,
       static_cast<const T*>(c.op.x), dX, static_cast<const T*>(c.scales_t), dS, c.group_size,
       static_cast<const T*>(c.szeros_t)},
      {{}, nullptr, dY, static_cast<T*>(c.op.y), dY}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<const T*>(c.op.bias);
  args.hw_info.device_id = c.device;
  args.hw_info.sm_count = sm_count(c.device);
  if (c.splits > 1) {  // an explicit split-K; else CUTLASS's stream-K heuristic
    args.scheduler.splits = c.splits;
    args.scheduler.decomposition_mode = decltype(args.scheduler.decomposition_mode)::SplitK;
  }
  return args;
}

template <class Cfg>
int run(const Call& c) {
  using G = typename Cfg::Gemm;
  auto args = make_args<Cfg>(c);
  const int64_t need = (int64_t)G::get_workspace_size(args);
  if (c.mode == Mode::kWorkspace) return need;
  if (need > c.workspace_bytes)
    return awq::fail(AWQ_ERR_ARG, "awq_int4_gemm_sm90: workspace of %lld bytes, %lld needed",
                     (long long)c.workspace_bytes, (long long)need);
  G gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess)
    return awq::fail(AWQ_ERR_ARG, "awq_int4_gemm_sm90: CUTLASS cannot run M=%lld N=%lld K=%lld Kp=%lld g=%d (%s)",
                     (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.Kp, c.group_size,
                     cutlassGetStatusString(st));
  st = gemm.initialize(args, c.workspace, c.stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(c.stream);
  if (st != cutlass::Status::kSuccess)
    return awq::fail(AWQ_ERR_CUDA, "awq_int4_gemm_sm90: %s", cutlassGetStatusString(st));
  return awq::check_launch("awq_int4_gemm_sm90");
}

template <class T>
int64_t call_config(int config, const Call& c) {
  switch (config) {
    case 0: return run<Cfg0<T>>(c);
    case 1: return run<Cfg1<T>>(c);
    case 2: return run<Cfg2<T>>(c);
    case 3: return run<Cfg3<T>>(c);
    case 4: return run<Cfg4<T>>(c);
    case 5: return run<Cfg5<T>>(c);
    case 6: return run<Cfg6<T>>(c);
    case 7: return run<Cfg7<T>>(c);
    case 8: return run<Cfg8<T>>(c);
    case 9: return run<Cfg9<T>>(c);
    default: return run<Cfg10<T>>(c);
  }
}

int64_t dispatch(int config, int dtype, const Call& c) {
  return dtype == AWQ_DTYPE_BF16 ? call_config<cutlass::bfloat16_t>(config, c)
                                 : call_config<cutlass::half_t>(config, c);
}

int check_sizes(int64_t M, int64_t N, int64_t K, int64_t Kp, int g, int dtype, int config, int splits) {
  if (M < 1 || N < 1 || N % 8 || K % 32 || K > Kp || K <= Kp - g || (g != 64 && g != 128) || Kp % g ||
      M > INT32_MAX || N > INT32_MAX || (dtype != AWQ_DTYPE_F16 && dtype != AWQ_DTYPE_BF16) || config < 0 ||
      config >= kNumConfigs || splits < 0 || splits > 64 || (g % 128 && config >= 7))
    return awq::fail(AWQ_ERR_ARG,
                     "awq_int4_gemm_sm90: bad sizes M=%lld N=%lld K=%lld Kp=%lld group_size=%d dtype=%d "
                     "config=%d splits=%d (needs N %% 8 == 0, K %% 32 == 0, group_size 64 or 128, config < %d, "
                     "splits 0..64, group_size 128 for configs 7 and up)",
                     (long long)M, (long long)N, (long long)K, (long long)Kp, g, dtype, config, splits, kNumConfigs);
  return AWQ_OK;
}

}  // namespace

extern "C" {

int awq_int4_gemm_sm90_configs(void) {
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  return kNumConfigs;
#else
  return 0;
#endif
}

int64_t awq_int4_gemm_sm90_workspace(int64_t M, int64_t N, int64_t K, int64_t Kp, int group_size, int dtype,
                                     int config, int splits) {
  if (check_sizes(M, N, K, Kp, group_size, dtype, config, splits) != AWQ_OK) return -1;
  int device = 0;
  cudaGetDevice(&device);
  Call c{Mode::kWorkspace, {}, nullptr, nullptr, nullptr, 0, M, N, K, Kp, group_size, splits, device, nullptr};
  return dispatch(config, dtype, c);
}

int awq_int4_gemm_sm90(const void* x, const uint8_t* qweight, const void* scales_t, const void* szeros_t,
                       const void* bias, void* y, void* workspace, int64_t workspace_bytes, int64_t M, int64_t N,
                       int64_t K, int64_t Kp, int group_size, int dtype, int config, int splits, void* stream) {
  if (check_sizes(M, N, K, Kp, group_size, dtype, config, splits) != AWQ_OK) return AWQ_ERR_ARG;
  const void* ptrs[] = {x, qweight, scales_t, szeros_t, y};
  for (const void* p : ptrs)
    if (!p || ((uintptr_t)p & 15)) return awq::fail(AWQ_ERR_ARG, "awq_int4_gemm_sm90: null or unaligned pointer");
  if (bias && ((uintptr_t)bias & 15)) return awq::fail(AWQ_ERR_ARG, "awq_int4_gemm_sm90: bias not 16-byte aligned");
  int device = 0;
  cudaGetDevice(&device);
  Call c{Mode::kRun, {x, qweight, nullptr, nullptr, bias, y}, scales_t, szeros_t, workspace, workspace_bytes,
         M, N, K, Kp, group_size, splits, device, static_cast<cudaStream_t>(stream)};
  return (int)dispatch(config, dtype, c);
}

}  // extern "C"
