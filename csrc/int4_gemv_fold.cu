// Tensor-core INT4 decode GEMV for M = 1..16 tokens (8 with the norm prologue) and group size
// 128, with the zero point and scale folded out of the inner loop ("fold").
//
//     y[m, n] = sum_{k < K} x[m, k] * (q[n, k] - z[n, k/128]) * s[n, k/128]  +  bias[n]
//
// straight from the NK_U8 layout (docs/format.md). Per group of 128 k and row,
//     sum_k x_k (q_k - z) s = s * (D - (B + z) * Sx),   D = sum_k x_k (B + q_k),   Sx = sum_k x_k,
// where B + q_k (B = 128 for bf16, 1024 for fp16) is what one LOP3 makes of two nibbles (the
// exponent pattern OR-ed over them, int4_common.cuh), so the weights reach the tensor cores with
// no subtract and no multiply: 7 ALU instructions per 8 weights (3 shifts, 4 LOP3), one
// mma.m16n8k16 per 16 weights of a lane, and 2 FFMA per group, row and token. The 8 tokens of the
// mma's B cost the same as one, which is what this kernel is for: the CUDA-core GEMV
// (int4_gemv_simt.cu) adds ~1 FFMA a weight per token.
//
// Mapping: a warp owns a tile of 16 rows; lane (g, t) = (lane / 4, lane % 4) computes rows g and
// g + 8, chunk 4 * group + t (32 k), so an mma's 16 k-slots never mix groups. mma "swap AB":
// weights are A, the tokens the 8 columns of B; the k permutation pairs (k_i, k_i+4) of each
// 8-k word (int4_common.cuh, dequant8), and x is staged once a block in shared memory already in
// that order (one LDS.128 a word and token), with Sx per group and token. Above 8 tokens a lane
// also computes columns g of a second token tile (tokens 8..15), from the same weight fragments.
// The weights stream through a per-warp shared-memory ring of P stages, each stage 2 groups of
// the tile's 16 rows (16 rows x 128 contiguous bytes, copied by cp.async 4 rows x 128 bytes an
// instruction); P - 1 stages are in flight while one computes, also across the stage boundary
// (the next stage is requested before the current one is waited for). Scales and zeros ride in a
// register ring beside it.
// Work: blockIdx.y is a K slice, each warp takes tiles strided over the slice's warps, which are
// interleaved over the blocks. One slice writes y (+ bias). Several slices sum their fp32
// partials in slice order (no atomics: bit-for-bit reproducible): on sm_90 the slices of a tile
// range are one thread-block cluster and the first block adds the others' partials from their
// shared memory (H200, M = 8: q/k/v 15.8 -> 14.1 us, down 17.5 -> 16.4, RESULTS.md section 4,
// session 10); else, or past 8 slices, they go to a workspace that a second kernel sums. Up to 4 weights that
// read the same x (q/k/v, gate/up) run in one launch, their tiles numbered one after another.
// Pair mode (awq_int4_gemm_fold_glu): a tile is 8 rows of a gated MLP's gate weight over the
// same 8 rows of its up weight, and the launch writes only silu(gate) * up (H200, 7B, batch 8:
// 20.7 us for gate/up and the product, against 21.0-21.9 + 1.6 for the launch and inductor's
// elementwise kernel before; RESULTS.md section 4, session 11).
// Rope mode (awq_int4_gemm_fold_rope): q/k/v as in kMulti, but a tile is a head's rows j..j+7
// (j < D/2) over its rows j+D/2..j+D/2+7, so a lane holds both halves of a rotary pair for its two
// tokens; the epilogue rotates q into y and k into the KV cache and writes v there, bit-equal to
// the launch plus awq_rope_cache (rope_cache.cu), which it replaces where the K slices are summed
// in a cluster or not split (H200, 7B, batch 8: 15.0 us against 14.2 + 1.9 and a gap; RESULTS.md
// section 3, session 12).
// K is sliced when x does not fit beside the ring, and further until half the resident warps
// have a tile.
//
// Configurations (FoldCfg; $AWQ_FOLD_CFG picks one for experiments): warps a block, ring depth,
// blocks a SM. The default, one block of 16 warps a SM with 3 stages, stages x once per SM, which
// leaves room for 8 tokens of x beside the ring (K up to ~8000 at M = 8 without a K split).
// Measured on an H100 (benchmarks/RESULTS.md, section 4, session 9), against the kernels it
// replaces at M = 2..8: q/k/v of 7B 21.7 -> 16.8 us at M = 8, gate/up 31.8 -> 23.7, down 20.2 ->
// 18.0, 8192 x 28672 71.6 -> 55.9; slower on o (4096 x 4096: 9.7 -> 10.9) and 8192 x 8192 at
// M <= 4, which _cuda.py leaves on the tc kernel.
//
// Numerics: products and sums in fp32 (tensor-core accumulate); D carries B * Sx, which the fold
// cancels, so a group's result keeps ~24 - log2(B / |q - z|) bits, as in the CUDA-core GEMV.
// Limitations: group size 128 only (other sizes: the other kernels); N * Kp / 2 < 2^31; qweight
// 16-byte aligned; x read with 16-byte loads only if K % 8 == 0 and x is 16-byte aligned.
#include <stdlib.h>

#include <algorithm>

#include "int4_common.cuh"
#include "sm90_async.cuh"

namespace awq {
namespace {

constexpr int kMaxM = 8, kTileRows = 16;
// Up to 16 tokens: two token tiles (NT = 2) share each weight fragment, two mmas a fragment where
// one token tile takes one; lean loop only, no norm prologue (gemv_fold_kernel).
constexpr int kMaxM2 = 16;
constexpr int kU = 2;                                  // groups a pipeline stage
constexpr int kRowBytes = kU * 64;                     // a row's bytes in a stage
constexpr int kStageBytes = kTileRows * kRowBytes;     // a warp's stage: 2 KB
constexpr int kXGroupBytes = 4 * 64;                   // a token's x of one group in shared memory
constexpr int kStaticSmem = 2 * kMaxM * 4;             // the kernel's static shared memory (norm_ss)

template <int W_, int P_, int MINB_>
struct FoldCfg {
  static constexpr int W = W_, P = P_, MINB = MINB_, THREADS = 32 * W_;
  static constexpr size_t RING = (size_t)W_ * P_ * kStageBytes;
};
using F0 = FoldCfg<16, 3, 1>;  // one block of 16 warps a SM, 3 stages (96 KB ring): the default
using F1 = FoldCfg<8, 3, 2>;   // two blocks of 8 warps, 3 stages (48 KB ring each)
using F2 = FoldCfg<16, 2, 1>;  // one block of 16 warps, 2 stages (64 KB)
using F3 = FoldCfg<8, 2, 2>;   // two blocks of 8 warps, 2 stages (32 KB each)
// One block of 16 warps, 4 stages (128 KB; experiments, session 18): under programmatic
// dependent launch a warp requests 3 stages before its wait instead of 2 (q/k/v at one token,
// launched while the down projection before it drains).
using F4 = FoldCfg<16, 4, 1>;
constexpr int kNumCfg = 5;

// Rope mode's outputs (awq_int4_gemm_fold_rope): seg 0 (q) is rotated into its y, seg 1 (k)
// rotated and seg 2 (v) as is into the caches [B, N / D, L, D] at sequence index pos[s] of token
// m = b * S + s; cos and sin rows [b or 0, s, :] (cos_bstride elements between batch rows).
struct RopeOut {
  const void *cos, *sin;
  const int64_t* pos;
  void *k_cache, *v_cache;
  int64_t cos_bstride;
  int S, L, D;
};

struct FoldArgs {
  const void* x;
  Int4Seg seg[kMaxSeg];
  int nseg;
  float* ws;    // [n_ks, M, ws_rows] fp32 partials when n_ks > 1
  int ws_rows;  // tiles * 16
  int M, K, Kp, groups;
  int gps;   // groups a K slice
  int n_ks;  // K slices = gridDim.y
  int tiles;
  bool x_vec;
  // K slices summed in a thread-block cluster (sm_90): the n_ks blocks of a cluster share their
  // tiles, each keeps its partials in shared memory (iters tiles a warp at most), and the first
  // adds the others' through distributed shared memory. Else partials go to ws and fold_finalize.
  bool cluster;
  int iters;
  int mode;  // kSingle, kMulti, kPair or kRope (below)
  RopeOut rope;  // kRope only
  NormIn norm;   // kPair and kRope only
};

// The 16-byte slot of word j in chunk (4 * group + t) of token g: XOR-swizzled so that the 8
// lanes of an LDS.128 phase (g in {2h, 2h + 1}, t = 0..3) hit 8 distinct bank groups.
__device__ __forceinline__ int x_slot(int g, int t, int j) { return j ^ ((t >> 1) | ((g & 1) << 1)); }

// Stages x[:, groups gs0 .. gs0 + ngs) into shared memory: per token and chunk, 4 words of 4
// registers (b0, b1 of the two mmas of a word: pairs (k_i, k_i+4)), and per token and group the
// fp32 sum of the group's x. Zero past the slice and past K. One thread a word (8 k); the 16
// threads of a group are adjacent lanes. A thread's kBatch words are loaded before any is used,
// so that 8 tokens cost one memory latency per batch, not one per word.
constexpr int kBatch = 4;
template <typename T>
__device__ __forceinline__ uint4 load_x_word(const FoldArgs& a, int m, int k) {
  const T* xr = static_cast<const T*>(a.x) + (size_t)m * a.K;
  if (a.x_vec && k + 8 <= a.K) return __ldg(reinterpret_cast<const uint4*>(xr + k));
  const uint16_t* xu = reinterpret_cast<const uint16_t*>(xr);
  uint32_t h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = k + i < a.K ? xu[k + i] : 0u;
  return make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
}

// Word u of a block's x staging (8 activations, one a thread and batch): token m, chunk ch of the
// slice, word j of the chunk; its column k and its byte offset in x's shared memory (the mma's
// chunk layout, x_slot's swizzle).
struct XWord {
  int m, ch, j;
  __device__ __forceinline__ XWord(int u, int words_tok) {
    m = u / words_tok;
    const int rem = u - m * words_tok;
    ch = rem >> 2;
    j = rem & 3;
  }
  __device__ __forceinline__ int k(int gs0) const { return (gs0 * 4 + ch) * 32 + 8 * j; }
  __device__ __forceinline__ int slot(int cps) const { return ((m * cps + ch) * 4 + x_slot(m, ch & 3, j)) * 16; }
};

// The sum of f(h[0..7]) over a word's 8 activations, then over the 16 lanes of its group (4
// chunks of 4 words), in a fixed order: every lane of the 16 gets the group's sum.
template <typename T, typename F>
__device__ __forceinline__ float group_sum(const uint4& w, F f) {
  const T* h = reinterpret_cast<const T*>(&w);
  auto v = [&](int i) { return f(Half2Traits<T>::to_float(h[i])); };
  float s = ((v(0) + v(1)) + (v(2) + v(3))) + ((v(4) + v(5)) + (v(6) + v(7)));
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 4);
  s += __shfl_xor_sync(0xffffffffu, s, 8);
  return s;
}

// Puts a batch of x words (one a thread, as stage_x loads them) into shared memory: each in the
// mma's k order at its swizzled slot, and per token and group the fp32 sum of the group's x.
template <typename T, int THREADS, int NB>
__device__ __forceinline__ void put_x_words(uint8_t* xs, float* sx, const FoldArgs& a, int base, const uint4 (&v)[NB]) {
  const int cps = a.gps * 4, words_tok = cps * 4, total = a.M * words_tok;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const int u = base + b * THREADS + threadIdx.x;
    const XWord w(u, words_tok);
    const float s = group_sum<T>(v[b], [](float f) { return f; });
    if (u < total) {
      *reinterpret_cast<uint4*>(xs + w.slot(cps)) =
          make_uint4(__byte_perm(v[b].x, v[b].z, 0x5410), __byte_perm(v[b].x, v[b].z, 0x7632),
                     __byte_perm(v[b].y, v[b].w, 0x5410), __byte_perm(v[b].y, v[b].w, 0x7632));
    }
    if (u < total && (u & 15) == 0) sx[w.m * a.gps + (w.ch >> 2)] = s;
  }
}

template <typename T, int THREADS>
__device__ void stage_x(uint8_t* xs, float* sx, const FoldArgs& a, int gs0, int ngs) {
  const int cps = a.gps * 4, words_tok = cps * 4, total = a.M * words_tok;
  for (int base = 0; base < total; base += THREADS * kBatch) {  // uniform trip count: shuffles below
    uint4 v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int u = base + b * THREADS + threadIdx.x;
      const XWord w(u, words_tok);
      v[b] = make_uint4(0u, 0u, 0u, 0u);
      if (u < total && w.ch < ngs * 4) v[b] = load_x_word<T>(a, w.m, w.k(gs0));
    }
    put_x_words<T, THREADS, kBatch>(xs, sx, a, base, v);
  }
}

// stage_x with the residual add + RMSNorm in front (FoldArgs::norm). Pass 1 makes h for the
// slice (the blocks of column 0 write it out) and keeps it at x's slots, with each group's sum of
// h^2 in sx; a token's sum over K is its groups' in order, then the cluster's slices' in rank
// order (through distributed shared memory: every block of the cluster gets the same bits), so no
// block reads more of h than its slice. Pass 2 makes x from the kept h and puts it as stage_x
// does. `ss` holds 2 * kMaxM floats (static shared memory: the tokens' sums, then 1 / rms).
// Pass 1 over NB words a thread at a time (each word's loads issued before any is used).
template <typename T, int THREADS, int NB>
__device__ __forceinline__ void norm_pass1(uint8_t* xs, float* sx, const FoldArgs& a, int gs0, int ngs) {
  const NormIn& nm = a.norm;
  const int cps = a.gps * 4, words_tok = cps * 4, total = a.M * words_tok;
  const bool writer = blockIdx.x == 0;
  for (int base = 0; base < total; base += THREADS * NB) {
    uint4 v[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const int u = base + b * THREADS + threadIdx.x;
      const XWord w(u, words_tok);
      const int k = w.k(gs0);
      v[b] = make_uint4(0u, 0u, 0u, 0u);
      if (u < total && w.ch < ngs * 4 && k < a.K) v[b] = load_h_word<T>(nm, a.M, a.K, w.m, k);
    }
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const int u = base + b * THREADS + threadIdx.x;
      const XWord w(u, words_tok);
      const int k = w.k(gs0);
      const float s = group_sum<T>(v[b], [](float f) { return f * f; });
      if (u < total) {
        *reinterpret_cast<uint4*>(xs + w.slot(cps)) = v[b];
        if (writer && w.ch < ngs * 4 && k < a.K)
          *reinterpret_cast<uint4*>(static_cast<T*>(nm.h) + (size_t)w.m * a.K + k) = v[b];
      }
      if (u < total && (u & 15) == 0) sx[w.m * a.gps + (w.ch >> 2)] = s;
    }
  }
}

template <typename T, int THREADS>
__device__ void stage_x_norm(uint8_t* xs, float* sx, float* ss, const FoldArgs& a, int gs0, int ngs) {
  const NormIn& nm = a.norm;
  const int cps = a.gps * 4, words_tok = cps * 4, total = a.M * words_tok;
  // The norm weight's word for this thread's first x word, requested now so that its latency
  // hides under pass 1's; at the decode shapes every word of a thread has that k (a token's words
  // and the block's threads are powers of two, one a multiple of the other).
  int gk = -1;
  uint4 gw0 = make_uint4(0u, 0u, 0u, 0u);
  if ((int)threadIdx.x < total) {
    const XWord w(threadIdx.x, words_tok);
    const int k = w.k(gs0);
    if (w.ch < ngs * 4 && k < a.K) {
      gk = k;
      gw0 = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(nm.gamma) + k));
    }
  }
  // Every load of a thread's words in flight at once where the registers allow (8 words of
  // residual and delta at M = 8 without a K split: two rounds), two at a time with K-slice partials.
  if (nm.part) norm_pass1<T, THREADS, 2>(xs, sx, a, gs0, ngs);
  else norm_pass1<T, THREADS, kBatch>(xs, sx, a, gs0, ngs);
  __syncthreads();
  const int tok = threadIdx.x;
  if (tok < a.M) {
    float t = 0.f;
    for (int gl = 0; gl < ngs; ++gl) t += sx[tok * a.gps + gl];
    ss[tok] = t;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.cluster) cluster_sync(); else __syncthreads();
  if (tok < a.M) {
    float t = ss[tok];
    if (a.cluster) {
      t = 0.f;
      for (int r = 0; r < a.n_ks; ++r) t += ld_cluster_f32(map_rank(smem_u32(ss + tok), r));
    }
    ss[kMaxM + tok] = rsqrtf(t / (float)a.K + nm.eps);
  }
#else
  __syncthreads();
  if (tok < a.M) ss[kMaxM + tok] = rsqrtf(ss[tok] / (float)a.K + nm.eps);
#endif
  __syncthreads();
  for (int base = 0; base < total; base += THREADS * kBatch) {
    uint4 v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int u = base + b * THREADS + threadIdx.x;
      const XWord w(u, words_tok);
      const int k = w.k(gs0);
      v[b] = make_uint4(0u, 0u, 0u, 0u);
      if (u < total && w.ch < ngs * 4 && k < a.K) {
        const uint4 hw = *reinterpret_cast<const uint4*>(xs + w.slot(cps));
        const uint4 gw = k == gk ? gw0 : __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(nm.gamma) + k));
        v[b] = norm_word<T>(hw, gw, ss[kMaxM + w.m]);
      }
    }
    put_x_words<T, THREADS, kBatch>(xs, sx, a, base, v);
  }
}

// What a lane keeps of a pipeline stage in registers: the scale and zero of its rows g and g + 8
// for the stage's kU groups. The weights go to the warp's shared-memory ring.
struct Stage {
  uint32_t s0[kU], s1[kU], z0[kU], z1[kU];
};

// A lane's rows: the 4 it copies (rows 4i + lane / 8 of the tile) and the 2 it computes (g, g + 8),
// as 32-bit byte and group offsets (N * Kp / 2 < 2^31).
struct Rows {
  const uint8_t* qweight;
  const uint16_t* scales;
  const uint8_t* zeros;
  // Pair mode (kPair): the tile's rows 8-15 (copies i = 2, 3 and computed row g + 8) come from the
  // second weight, the up projection, at the same row numbers as rows 0-7 of the first.
  const uint8_t* qweight_hi;
  const uint16_t* scales_hi;
  const uint8_t* zeros_hi;
  uint32_t cw[4];
  uint32_t g0, g1;
};

// What a launch's tiles are: rows of one weight (kSingle), of up to 4 weights numbered one after
// another (kMulti), 8 rows of a gate weight over the same 8 rows of an up weight (kPair), whose
// results leave as silu(gate) * up (awq_int4_gemm_fold_glu), or q/k/v numbered as in kMulti with
// a tile's rows 0-7 a head's rows j..j+7 (j < D/2) over its rows j+D/2.. (kRope), whose results
// leave rotated and in the KV cache (awq_int4_gemm_fold_rope).
constexpr int kSingle = 0, kMulti = 1, kPair = 2, kRope = 3;
constexpr int kNumModes = 4;

// Rope mode: segment row of tile row i (0..15) of a segment's local tile `loc`.
__device__ __forceinline__ int rope_row(const RopeOut& r, int loc, int i) {
  const int hb = r.D / 16;  // tiles a head
  return (loc / hb) * r.D + (loc % hb) * 8 + (i & 7) + (i >= 8 ? r.D / 2 : 0);
}

// Requests the stage of groups first, first + 1 (clamped to the slice's last group) into `ring`
// (one stage of this warp), and its scales and zeros into st. Lane (rr, cc) = (lane / 8, lane % 8)
// copies 16-byte piece cc of rows 4i + rr: each instruction moves 4 rows x 128 contiguous bytes.
// Odd rows store their pieces swapped by halves (cc ^ 4), so that the fragment reads (8 lanes:
// rows 2p and 2p + 1, 4 pieces each) hit distinct banks.
template <bool PAIR>
__device__ __forceinline__ void issue(Stage& st, uint8_t* ring, const Rows& r, int first, int last, int lane) {
  const int rr = lane >> 3, cc = lane & 7;
  const uint32_t off = (uint32_t)min(first + (cc >> 2), last) * 64 + (cc & 3) * 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = 4 * i + rr;
    const uint8_t* base = PAIR && i >= 2 ? r.qweight_hi : r.qweight;
    cp_async16(ring + row * kRowBytes + ((cc ^ ((row & 1) << 2)) * 16), base + (r.cw[i] + off));
  }
  cp_async_commit();
  const uint16_t* scales_hi = PAIR ? r.scales_hi : r.scales;
  const uint8_t* zeros_hi = PAIR ? r.zeros_hi : r.zeros;
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const uint32_t gi = min(first + u, last);
    st.s0[u] = __ldg(r.scales + (r.g0 + gi));
    st.s1[u] = __ldg(scales_hi + (r.g1 + gi));
    st.z0[u] = __ldg(r.zeros + (r.g0 + gi));
    st.z1[u] = __ldg(zeros_hi + (r.g1 + gi));
  }
}

// The A fragments of word j of a group's chunk, rows g (p0) and g + 8 (p1): B + q for the four
// nibble pairs (k_i, k_i+4) of each, one shift and one LOP3 a pair, as dequant8 makes them before
// its subtract and multiply (int4_common.cuh). Not shared with dequant8: calling one helper per
// row, p0 then p1, changed this file's main loops by an instruction and the pc kernel's by up to
// 10 (sass_report).
template <typename T>
__device__ __forceinline__ void weight_frags(uint32_t q0, uint32_t q1, uint32_t (&p0)[4], uint32_t (&p1)[4]) {
  constexpr uint32_t kMagic2 = Half2Traits<T>::kMagic * 0x10001u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    p0[i] = and_or(q0 >> (4 * i), 0x000F000Fu, kMagic2);
    p1[i] = and_or(q1 >> (4 * i), 0x000F000Fu, kMagic2);
  }
}

// acc += a group's fold for one token tile: c[0] + c[1] is D (rows g, g + 8 x tokens 2t, 2t + 1)
// and s * (D - (B + z) * Sx) is added, sxa and sxb the two tokens' Sx.
template <typename T>
__device__ __forceinline__ void fold_group(float (&acc)[4], const float (&c)[2][4], uint32_t s0r, uint32_t s1r,
                                           uint32_t z0r, uint32_t z1r, float sxa, float sxb) {
  constexpr float kBase = Half2Traits<T>::kMagic == 0x4300u ? 128.f : 1024.f;
  const float s0 = scale_to_float(s0r, static_cast<T*>(nullptr));
  const float s1 = scale_to_float(s1r, static_cast<T*>(nullptr));
  const float z0 = kBase + (float)z0r, z1 = kBase + (float)z1r;
  acc[0] = fmaf(s0, fmaf(-z0, sxa, c[0][0] + c[1][0]), acc[0]);
  acc[1] = fmaf(s0, fmaf(-z0, sxb, c[0][1] + c[1][1]), acc[1]);
  acc[2] = fmaf(s1, fmaf(-z1, sxa, c[0][2] + c[1][2]), acc[2]);
  acc[3] = fmaf(s1, fmaf(-z1, sxb, c[0][3] + c[1][3]), acc[3]);
}

// acc += one group of rows g, g + 8 (acc[0], acc[1]: row g, tokens 2t, 2t + 1; acc[2], acc[3]:
// row g + 8). w0, w1: the group's chunk of rows g and g + 8; xc: this lane's chunk of its token in
// shared memory (zeros if the token is past M: xv false, unless LEAN); sxa, sxb: Sx of tokens 2t,
// 2t + 1. LEAN: no zeroing; a lane whose token is past M reads another token's x (gemv_fold_kernel
// says when, and why its columns are harmless).
template <typename T, bool LEAN>
__device__ __forceinline__ void group_step(float (&acc)[4], const uint4& w0, const uint4& w1, uint32_t s0r,
                                           uint32_t s1r, uint32_t z0r, uint32_t z1r, const uint8_t* xc, int sw,
                                           bool xv, float sxa, float sxb) {
  float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const uint32_t q0[4] = {w0.x, w0.y, w0.z, w0.w};
  const uint32_t q1[4] = {w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4 xw = make_uint4(0u, 0u, 0u, 0u);
    if (LEAN || xv) xw = *reinterpret_cast<const uint4*>(xc + ((j ^ sw) << 4));
    uint32_t p0[4], p1[4];
    weight_frags<T>(q0[j], q1[j], p0, p1);
    mma16816<T>(c[0], p0[0], p1[0], p0[1], p1[1], xw.x, xw.y);
    mma16816<T>(c[1], p0[2], p1[2], p0[3], p1[3], xw.z, xw.w);
  }
  fold_group<T>(acc, c, s0r, s1r, z0r, z1r, sxa, sxb);
}

// group_step for two token tiles (NT = 2, lean loop only): columns g of the two mmas' B are
// tokens g and 8 + g, read at xc0 and xc1; acc[nt] as group_step's acc for tokens 8 nt + 2t and
// 8 nt + 2t + 1, whose Sx are sxp0 (tile 0) and sxp1 (tile 1). The weights are made into
// fragments once for both tiles.
template <typename T>
__device__ __forceinline__ void group_step2(float (&acc)[2][4], const uint4& w0, const uint4& w1, uint32_t s0r,
                                            uint32_t s1r, uint32_t z0r, uint32_t z1r, const uint8_t* xc0,
                                            const uint8_t* xc1, int sw, float2 sxp0, float2 sxp1) {
  float c[2][2][4] = {};
  const uint32_t q0[4] = {w0.x, w0.y, w0.z, w0.w};
  const uint32_t q1[4] = {w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 xa = *reinterpret_cast<const uint4*>(xc0 + ((j ^ sw) << 4));
    const uint4 xb = *reinterpret_cast<const uint4*>(xc1 + ((j ^ sw) << 4));
    uint32_t p0[4], p1[4];
    weight_frags<T>(q0[j], q1[j], p0, p1);
    mma16816<T>(c[0][0], p0[0], p1[0], p0[1], p1[1], xa.x, xa.y);
    mma16816<T>(c[0][1], p0[2], p1[2], p0[3], p1[3], xa.z, xa.w);
    mma16816<T>(c[1][0], p0[0], p1[0], p0[1], p1[1], xb.x, xb.y);
    mma16816<T>(c[1][1], p0[2], p1[2], p0[3], p1[3], xb.z, xb.w);
  }
  fold_group<T>(acc[0], c[0], s0r, s1r, z0r, z1r, sxp0.x, sxp0.y);
  fold_group<T>(acc[1], c[1], s0r, s1r, z0r, z1r, sxp1.x, sxp1.y);
}

// One output of pair mode: silu(gate) * up of token m, row `row`, from the fp32 sums of the two
// rows; each is rounded to T (with its bias) first, as the two linears' outputs would be, then
// the product made in fp32 and rounded once (int4_common.cuh, silu_mul).
template <typename T>
__device__ __forceinline__ void store_pair(const FoldArgs& a, int m, int row, float gate, float up) {
  const Int4Seg& lo = a.seg[0];
  const Int4Seg& hi = a.seg[1];
  if (lo.bias) gate += Half2Traits<T>::to_float(static_cast<const T*>(lo.bias)[row]);
  if (hi.bias) up += Half2Traits<T>::to_float(static_cast<const T*>(hi.bias)[row]);
  static_cast<T*>(lo.y)[(size_t)m * lo.N + row] =
      silu_mul<T>(Half2Traits<T>::from_float(gate), Half2Traits<T>::from_float(up));
}

// A lane's 4 results of a tile, K summed (v: rows g, g + 8 x tokens 2t, 2t + 1), + bias, to y.
// One pair of rope mode, token m: ya, yb the projection's rows j and j + D/2 (rounded to T with
// their bias, as int4_linear_multi writes them), rotated as awq_rope_cache rotates them (torch's
// fp32 math, rounded once), into q's y or the k cache; v's copied into the v cache.
template <typename T>
__device__ __forceinline__ void store_rope(const FoldArgs& a, int si, int head, int j, int m, T ya, T yb) {
  const RopeOut& r = a.rope;
  const int half = r.D / 2, b = m / r.S, s = m - b * r.S;
  T* dst;
  if (si == 0) {
    dst = static_cast<T*>(a.seg[0].y) + (size_t)m * a.seg[0].N + (size_t)head * r.D;
  } else {
    const int64_t p = r.pos[s];
    if (p < 0 || p >= r.L) return;
    const int hkv = a.seg[1].N / r.D;
    dst = static_cast<T*>(si == 1 ? r.k_cache : r.v_cache) + (((int64_t)b * hkv + head) * r.L + p) * r.D;
    if (si == 2) {
      dst[j] = ya;
      dst[j + half] = yb;
      return;
    }
  }
  const T* cs = static_cast<const T*>(r.cos) + b * r.cos_bstride + (int64_t)s * r.D;
  const T* sn = static_cast<const T*>(r.sin) + b * r.cos_bstride + (int64_t)s * r.D;
  rotate_pair<T>(ya, yb, cs[j], cs[j + half], sn[j], sn[j + half], dst[j], dst[j + half]);
}

// tok0: the token tile's first token (8 for the second of NT = 2).
template <typename T, int MODE>
__device__ __forceinline__ void store_tile(const FoldArgs& a, int tile, int g, int t, const float (&v)[4],
                                           int tok0 = 0) {
  if (MODE == kRope) {
    const int si = seg_of(a.seg, a.nseg, tile);
    const Int4Seg& sg = a.seg[si];
    const int loc = tile - sg.tile0, hb = a.rope.D / 16;
    const int head = loc / hb, j = (loc % hb) * 8 + g;
    const int ra = head * a.rope.D + j, rb = ra + a.rope.D / 2;
    const float ba = sg.bias ? Half2Traits<T>::to_float(static_cast<const T*>(sg.bias)[ra]) : 0.f;
    const float bb = sg.bias ? Half2Traits<T>::to_float(static_cast<const T*>(sg.bias)[rb]) : 0.f;
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (tok0 + 2 * t + e < a.M)
        store_rope<T>(a, si, head, j, tok0 + 2 * t + e, Half2Traits<T>::from_float(v[e] + ba),
                      Half2Traits<T>::from_float(v[2 + e] + bb));
    return;
  }
  if (MODE == kPair) {
    const int row = tile * 8 + g;
    if (row >= a.seg[0].N) return;
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (tok0 + 2 * t + e < a.M) store_pair<T>(a, tok0 + 2 * t + e, row, v[e], v[2 + e]);
    return;
  }
  const Int4Seg& sg = a.seg[MODE == kMulti ? seg_of(a.seg, a.nseg, tile) : 0];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int tok = tok0 + 2 * t + (e & 1), row = (tile - sg.tile0) * kTileRows + g + (e >> 1) * 8;
    if (tok >= a.M || row >= sg.N) continue;
    const float b = sg.bias ? Half2Traits<T>::to_float(static_cast<const T*>(sg.bias)[row]) : 0.f;
    static_cast<T*>(sg.y)[(size_t)tok * sg.N + row] = Half2Traits<T>::from_float(v[e] + b);
  }
}

// The cluster's K slices summed (FoldArgs::cluster): once every block of the cluster has its
// partials in shared memory, block 0 (slice 0) adds slice 1, 2, ... in order, + bias, as
// fold_finalize would (bit for bit), and writes y; the others wait until it has read them.
template <typename T, int MODE, int NT>
__device__ __forceinline__ void cluster_sum(const FoldArgs& a, const float4* part, int tile0, int stride, int g,
                                            int t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cluster_sync();
  if (cluster_rank() == 0) {
    const uint32_t local = smem_u32(part);
    int it = 0;
    for (int tile = tile0; tile < a.tiles; tile += stride, ++it) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        for (int r = 0; r < a.n_ks; ++r) {
          const float4 q = ld_cluster_f4(map_rank(local + (it * NT + nt) * 32 * sizeof(float4), r));
          v[0] += q.x; v[1] += q.y; v[2] += q.z; v[3] += q.w;
        }
        store_tile<T, MODE>(a, tile, g, t, v, 8 * nt);
      }
    }
  }
  cluster_sync();
#else
  __trap();  // the host launches clusters on sm_90 only
#endif
}

// NORM (pair and rope modes): x made by stage_x_norm (FoldArgs::norm). A template parameter, so
// that the kernels without it keep their registers (rope mode: 118 without, 127 with).
// LEAN (lean_loop: below 8 tokens): the main loop without the predicates on tokens past M. A lane
// whose token is past M reads token M - 1's x and token 0's sums: finite values in columns that
// are never stored (store_tile, store_pair, the workspace and the cluster sums all skip tokens
// past M), so the stored outputs are bit for bit the predicated loop's. The loop is 6-11%
// shorter (benchmarks/sass_report.py) and 7B decode at batch 1 ran 1.1% faster; at 8 tokens,
// where no lane is past M, the predicated loop measured 0.3% faster (7B batch 8), so it stays
// there (csrc/NOTES.md, session 23).
// NT (1 or 2): token tiles of 8 (M <= 8 or M <= 16); NT = 2 with the lean loop and without the
// norm prologue only.
template <typename T, class C, int MODE, bool NORM, bool LEAN, int NT = 1>
__global__ void __launch_bounds__(C::THREADS, C::MINB) gemv_fold_kernel(const FoldArgs a) {
  static_assert(NT == 1 || (LEAN && !NORM), "two token tiles: lean loop, no norm prologue");
  constexpr int P = C::P;
  extern __shared__ float4 smem4[];
  const int cps = a.gps * 4;
  uint8_t* xs = reinterpret_cast<uint8_t*>(smem4);
  const size_t xbytes = (size_t)a.M * a.gps * kXGroupBytes;
  float* sx = reinterpret_cast<float*>(xs + xbytes);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x >> 5;
  const int ks = blockIdx.y, gs0 = ks * a.gps, ngs = min(a.gps, a.groups - gs0);
  const int slice_warps = gridDim.x * C::W;
  // Warp w of block b is slice warp b + w * gridDim.x: the grid has a block for every SM share of
  // the slice, and when there are fewer tiles than warps every block has some warps idle rather
  // than whole SMs idle (packed 16 warps a block, 7B's q/k/v, 768 tiles in 2 K slices, would be
  // 96 blocks for an H100's 132 SMs).
  int tile = blockIdx.x + warp * gridDim.x;
  auto seg = [&](int tl) { return MODE == kMulti || MODE == kRope ? seg_of(a.seg, a.nseg, tl) : 0; };

  const int nst = (ngs + kU - 1) / kU, last = gs0 + ngs - 1;  // stages of the slice, its last group
  uint8_t* wring = xs + (xbytes + (size_t)a.M * a.gps * sizeof(float) + 15) / 16 * 16 +
                   (size_t)warp * P * kStageBytes;
  Rows rows;
  auto set_rows = [&](int tl) {
    if (MODE == kPair) {  // rows 0-7: the gate weight's rows 8 tl .. 8 tl + 7; rows 8-15: the up weight's
      const Int4Seg& lo = a.seg[0];
      const Int4Seg& hi = a.seg[1];
      rows.qweight = lo.qweight;
      rows.scales = static_cast<const uint16_t*>(lo.scales);
      rows.zeros = lo.zeros;
      rows.qweight_hi = hi.qweight;
      rows.scales_hi = static_cast<const uint16_t*>(hi.scales);
      rows.zeros_hi = hi.zeros;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        rows.cw[i] = (uint32_t)min(tl * 8 + ((4 * i + (lane >> 3)) & 7), lo.N - 1) * (uint32_t)(a.Kp / 2);
      rows.g0 = rows.g1 = (uint32_t)min(tl * 8 + g, lo.N - 1) * (uint32_t)a.groups;
      return;
    }
    const Int4Seg& sg = a.seg[seg(tl)];
    rows.qweight = sg.qweight;
    rows.scales = static_cast<const uint16_t*>(sg.scales);
    rows.zeros = sg.zeros;
    if (MODE == kRope) {  // rows 0-7: a head's rows j..j+7; rows 8-15: the same + D/2
      const int loc = tl - sg.tile0;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        rows.cw[i] = (uint32_t)rope_row(a.rope, loc, 4 * i + (lane >> 3)) * (uint32_t)(a.Kp / 2);
      rows.g0 = (uint32_t)rope_row(a.rope, loc, g) * (uint32_t)a.groups;
      rows.g1 = (uint32_t)rope_row(a.rope, loc, g + 8) * (uint32_t)a.groups;
      return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
      rows.cw[i] = (uint32_t)min((tl - sg.tile0) * kTileRows + 4 * i + (lane >> 3), sg.N - 1) * (uint32_t)(a.Kp / 2);
    const uint32_t r0 = min((tl - sg.tile0) * kTileRows + g, sg.N - 1);
    const uint32_t r1 = min((tl - sg.tile0) * kTileRows + g + 8, sg.N - 1);
    rows.g0 = r0 * (uint32_t)a.groups;
    rows.g1 = r1 * (uint32_t)a.groups;
  };
  float4* part = reinterpret_cast<float4*>(wring + (size_t)(C::W - warp) * P * kStageBytes) +
                 (size_t)warp * a.iters * 32 * NT + lane;  // this lane's partial of iteration 0
  Stage ring[P];
  // Every stage commits one cp.async group (possibly empty), so "stage q has landed" is
  // cp.async.wait_group(P - 1) once the P - 1 stages after it are requested.
  auto request = [&](int q, int slot) {
    if (q < nst) issue<MODE == kPair>(ring[slot], wring + slot * kStageBytes, rows, gs0 + q * kU, last, lane);
    else cp_async_commit();
  };
  auto prime = [&](int tl) {  // a tile's first P - 1 stages
    set_rows(tl);
#pragma unroll
    for (int q = 0; q < P - 1; ++q) request(q, q);
  };
  // The first tile's loads are requested before x is staged, so the two latencies overlap; with
  // programmatic dependent launch, before the kernel this one depends on has finished.
  if (tile < a.tiles) prime(tile);
  pdl_wait();
  pdl_trigger();
  if constexpr (NORM) {
    __shared__ float norm_ss[2 * kMaxM];
    stage_x_norm<T, C::THREADS>(xs, sx, norm_ss, a, gs0, ngs);
  } else {
    stage_x<T, C::THREADS>(xs, sx, a, gs0, ngs);
  }
  __syncthreads();

  const bool xv = g < a.M;
  const uint8_t* xl = xs + ((size_t)min(g, a.M - 1) * cps + t) * 64;  // + group * 256 + slot * 16
  const int xsw = x_slot(g, t, 0);  // word j of a chunk sits in slot j ^ xsw
  const bool ta = 2 * t < a.M, tb = 2 * t + 1 < a.M;
  const float* sxa = sx + (ta ? 2 * t : 0) * a.gps;
  const float* sxb = sx + (tb ? 2 * t + 1 : 0) * a.gps;
  // The second token tile (NT = 2, M > 8, lean loop): tokens 8 + g for x, 8 + 2t and 8 + 2t + 1 for
  // Sx, each clamped to M - 1 as the lean loop's are (gemv_fold_kernel's LEAN).
  const uint8_t* xl1 = xs + ((size_t)min(8 + g, a.M - 1) * cps + t) * 64;
  const float* sxa1 = sx + min(8 + 2 * t, a.M - 1) * a.gps;
  const float* sxb1 = sx + min(9 + 2 * t, a.M - 1) * a.gps;
  const int sw = (g & 1) << 2;  // this lane's rows' piece swap (g and g + 8 have g's parity)
  for (int it = 0; tile < a.tiles; tile += slice_warps, ++it) {
    float acc[NT][4] = {};
    for (int s = 0; s < nst; s += P) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        if (s + p < nst) {
          __syncwarp();  // every lane done with the stage before (its slot is refilled now)
          request(s + p + P - 1, (p + P - 1) % P);
          cp_async_wait<P - 1>();
          __syncwarp();  // every lane's pieces of this stage landed
          const uint8_t* st = wring + p * kStageBytes;
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int gl = (s + p) * kU + u;  // group in the slice
            if (gl < ngs) {
              const int piece = ((4 * u + t) ^ sw) * 16;
              const uint4 w0 = *reinterpret_cast<const uint4*>(st + g * kRowBytes + piece);
              const uint4 w1 = *reinterpret_cast<const uint4*>(st + (g + 8) * kRowBytes + piece);
              if constexpr (NT == 1) {
                group_step<T, LEAN>(acc[0], w0, w1, ring[p].s0[u], ring[p].s1[u], ring[p].z0[u], ring[p].z1[u],
                                    xl + (size_t)gl * kXGroupBytes, xsw, xv, LEAN || ta ? sxa[gl] : 0.f,
                                    LEAN || tb ? sxb[gl] : 0.f);
              } else {
                group_step2<T>(acc, w0, w1, ring[p].s0[u], ring[p].s1[u], ring[p].z0[u], ring[p].z1[u],
                               xl + (size_t)gl * kXGroupBytes, xl1 + (size_t)gl * kXGroupBytes, xsw,
                               {sxa[gl], sxb[gl]}, {sxa1[gl], sxb1[gl]});
              }
            }
          }
        }
      }
    }
    const int next = tile + slice_warps;
    cp_async_wait<0>();  // drain (the empty groups of stages past the end)
    __syncwarp();  // every lane done reading the ring before the next tile's copies
    if (next < a.tiles) prime(next);  // next tile's loads before this tile's stores
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (a.cluster) {
        part[(it * NT + nt) * 32] = make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
      } else if (a.n_ks == 1) {
        store_tile<T, MODE>(a, tile, g, t, acc[nt], 8 * nt);
      } else {  // workspace rows are tile rows (16 a tile) in every mode; rows past N are never read
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = 8 * nt + 2 * t + (e & 1), trow = g + (e >> 1) * 8;
          if (tok < a.M) a.ws[((size_t)ks * a.M + tok) * a.ws_rows + tile * kTileRows + trow] = acc[nt][e];
        }
      }
    }
  }
  if (a.cluster) cluster_sum<T, MODE, NT>(a, part, blockIdx.x + warp * gridDim.x, slice_warps, g, t);
}

// y = the slices' partials summed in slice order + bias, rounded to T (int4_common.cuh).
template <typename T>
__global__ void fold_finalize(const FoldArgs a) {
  pdl_wait();
  sum_slices<T, kTileRows>(a.seg, a.nseg, a.ws, a.ws_rows, a.M, a.n_ks);
}

// Pair mode: silu(gate) * up from the slices' partials, each of the two summed in slice order.
template <typename T>
__global__ void fold_pair_finalize(const FoldArgs a) {
  pdl_wait();
  const int m = blockIdx.y, n = a.seg[0].N;
  const size_t slice = (size_t)a.M * a.ws_rows;
  for (int row = blockIdx.x * blockDim.x + threadIdx.x; row < n; row += gridDim.x * blockDim.x) {
    const float* p = a.ws + (size_t)m * a.ws_rows + (row / 8) * kTileRows + row % 8;
    float gate = 0.f, up = 0.f;
    for (int k = 0; k < a.n_ks; ++k) {
      gate += p[k * slice];
      up += p[k * slice + 8];
    }
    store_pair<T>(a, m, row, gate, up);
  }
}

struct Plan {
  int cfg = 0, n_ks = 0, gps = 0, tiles = 0, blocks = 0;
  int tile0[kMaxSeg] = {};
  size_t smem = 0;
  int occ = 1;  // blocks a SM
  bool cluster = false;
  int iters = 0;
  bool lean = false;  // the main loop's form (lean_loop), chosen once: the plan is that kernel's
  int nt = 1;         // token tiles (token_tiles)
};

// K slices: the fewest that give every tile's warp a slot in one wave of half the resident warps
// (the CUDA-core GEMV's rule), but no slice shorter than 2 groups; shared memory holds the
// slice's x. $AWQ_FOLD_KS=n forces at least n slices (experiments).
template <class C>
Plan make_plan(const FoldArgs& a, const DeviceSmem& d, int reg_occ) {
  Plan p;
  if (a.mode == kPair) {
    p.tiles = (a.seg[0].N + 7) / 8;  // 8 rows of each weight a tile
  } else {
    for (int i = 0; i < a.nseg; ++i) {
      p.tile0[i] = p.tiles;
      p.tiles += (a.seg[i].N + kTileRows - 1) / kTileRows;
    }
  }
  const size_t per_group = (size_t)a.M * (kXGroupBytes + sizeof(float));
  // kStaticSmem: the norm's static shared memory (stage_x_norm), which the dynamic part must leave
  const long long avail = std::min<long long>(d.smem_optin, d.smem_sm / C::MINB - d.smem_reserved) - kStaticSmem;
  const long long budget = avail - (long long)C::RING;
  int max_gps = budget > 0 ? (int)(budget / (long long)per_group) : 0;
  while (max_gps > 0 && (long long)((per_group * max_gps + 15) / 16 * 16) > budget) --max_gps;  // 16-byte rounding
  if (max_gps < 1) return p;
  const char* force = getenv("AWQ_FOLD_KS");
  const char* fill_env = getenv("AWQ_FOLD_FILL");  // experiments: 1 / fill of the resident warps
  const int fill = fill_env && *fill_env ? std::max(1, atoi(fill_env)) : 2;
  int n = (a.groups + max_gps - 1) / max_gps, occ = 1;
  if (force && *force) n = std::max(n, atoi(force));
  for (;; ++n) {
    p.gps = (a.groups + n - 1) / n;
    p.n_ks = (a.groups + p.gps - 1) / p.gps;
    p.smem = (per_group * p.gps + 15) / 16 * 16 + C::RING;
    occ = std::max(1, std::min<int>(reg_occ, (int)(d.smem_sm / (p.smem + kStaticSmem + d.smem_reserved))));
    const long long slots = (long long)d.sms * occ * C::W;
    if ((force && *force) || (long long)p.tiles * p.n_ks * fill >= slots || p.gps <= 2) break;
  }
  // As many blocks as fit the slice's share of the GPU (one a tile at most); warps take tiles
  // strided by the slice's warps.
  p.blocks = (int)std::max(1LL, std::min<long long>(p.tiles, (long long)d.sms * occ / p.n_ks));
  p.occ = occ;
  return p;
}

// Whether a launch of M tokens takes the lean main loop (gemv_fold_kernel): below 8 tokens, or as
// $AWQ_FOLD_LEAN=0 / 1 forces (experiments); always above 8 (two token tiles have no other).
bool lean_loop(int M) {
  const char* e = getenv("AWQ_FOLD_LEAN");
  return M > kMaxM || (e && *e ? atoi(e) != 0 : M < kMaxM);
}

// Token tiles of 8 a launch of M tokens takes: 2 above 8 (lean loop only).
int token_tiles(int M) { return M > kMaxM ? 2 : 1; }

// The kernel for a mode: one weight, several, a gate/up pair, or q/k/v with the rotary embedding;
// the last two with the norm in front or not; each with the lean loop or not.
template <typename T, class C, bool LEAN>
auto kernel_for(int mode, bool norm) {
  return mode == kRope   ? (norm ? gemv_fold_kernel<T, C, kRope, true, LEAN> : gemv_fold_kernel<T, C, kRope, false, LEAN>)
         : mode == kPair ? (norm ? gemv_fold_kernel<T, C, kPair, true, LEAN> : gemv_fold_kernel<T, C, kPair, false, LEAN>)
         : mode == kMulti ? gemv_fold_kernel<T, C, kMulti, false, LEAN>
                          : gemv_fold_kernel<T, C, kSingle, false, LEAN>;
}

template <typename T, class C>
auto kernel_for(int mode, bool norm, bool lean, int nt) {
  if (nt == 2)  // no norm prologue (set_norm refuses it above 8 tokens)
    return mode == kRope    ? gemv_fold_kernel<T, C, kRope, false, true, 2>
           : mode == kPair  ? gemv_fold_kernel<T, C, kPair, false, true, 2>
           : mode == kMulti ? gemv_fold_kernel<T, C, kMulti, false, true, 2>
                            : gemv_fold_kernel<T, C, kSingle, false, true, 2>;
  return lean ? kernel_for<T, C, true>(mode, norm) : kernel_for<T, C, false>(mode, norm);
}

// Sums the K slices in a cluster (sm_90, 2..8 slices) where the partials fit in shared memory
// beside x and the ring without costing a block a SM, with only as many blocks a slice as
// clusters fit at once. $AWQ_FOLD_CLUSTER=0 keeps the workspace and fold_finalize (experiments).
template <typename T, class C>
int plan_cluster(Plan& p, const DeviceSmem& d, int mode, bool norm) {
  const char* env = getenv("AWQ_FOLD_CLUSTER");
  if (d.major < 9 || p.n_ks < 2 || p.n_ks > 8 || (env && *env && atoi(env) == 0)) return AWQ_OK;
  auto kernel = kernel_for<T, C>(mode, norm, p.lean, p.nt);
  int blocks = p.blocks;
  for (int pass = 0; pass < 2; ++pass) {
    const int iters = (p.tiles + blocks * C::W - 1) / (blocks * C::W);
    const size_t smem = p.smem + (size_t)C::W * iters * 32 * p.nt * sizeof(float4);
    if ((long long)(smem + kStaticSmem) > d.smem_optin ||
        (long long)(smem + kStaticSmem + d.smem_reserved) * p.occ > d.smem_sm)
      return AWQ_OK;
    const LaunchCfg launch(dim3(blocks, p.n_ks), C::THREADS, smem, nullptr, p.n_ks, false);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.cfg) != cudaSuccess) {
      cudaGetLastError();  // not launchable as a cluster: keep the workspace
      return AWQ_OK;
    }
    if (clusters < 1) return AWQ_OK;
    if (clusters >= blocks) {
      p.cluster = true;
      p.iters = iters;
      p.blocks = blocks;
      p.smem = smem;
      return AWQ_OK;
    }
    blocks = clusters;  // fewer blocks a slice: more tiles a warp; check that again
  }
  return AWQ_OK;
}

template <typename T, class C>
int plan_cfg(const FoldArgs& a, int dtype, int cfg, Plan& p) {
  const DeviceSmem* d = nullptr;
  if (int e = device_smem(d)) return e;
  // blocks per SM allowed by registers: (device, config, dtype, mode, norm, lean, token tiles)
  static int reg_occ[64][kNumCfg][2][kNumModes][2][2][2];
  const bool norm = a.norm.gamma != nullptr, lean = lean_loop(a.M);
  const int nt = token_tiles(a.M);
  int& occ = reg_occ[d->dev & 63][cfg][dtype == AWQ_DTYPE_BF16][a.mode][norm][lean][nt - 1];
  if (occ == 0) {
    auto kernel = kernel_for<T, C>(a.mode, norm, lean, nt);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d->smem_optin - kStaticSmem) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, C::THREADS, 0) != cudaSuccess)
      return check_launch("gemv_fold setup");
  }
  p = make_plan<C>(a, *d, occ);
  p.cfg = cfg;
  p.lean = lean;
  p.nt = nt;
  if (p.n_ks == 0)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold: M=%d needs %d bytes of shared memory a group, the device grants %d",
                a.M, (int)(a.M * (kXGroupBytes + 4)), d->smem_optin);
  return plan_cluster<T, C>(p, *d, a.mode, norm);
}

// The configuration: $AWQ_FOLD_CFG (experiments), else kDefaultCfg up to 8 tokens and
// kTwoTileCfg above. <16, 2, 1> leaves 32 KB more beside its ring for x than <16, 3, 1>, so 16
// tokens need fewer K slices: H200, graph-timed at M = 12 / 16, 9-16% faster on every 7B weight
// and 8192x8192, and 8192x28672 54.1 / 60.8 us against 63.8 / 69.2 (RESULTS.md section 4,
// session 24); at M = 2..8 it is as fast or slower.
constexpr int kDefaultCfg = 0;  // RESULTS.md section 4, session 9: the fastest on 6 of 7 shapes at M = 2..8
constexpr int kTwoTileCfg = 2;
int pick_cfg(int M) {
  const char* e = getenv("AWQ_FOLD_CFG");
  const int dflt = M > kMaxM ? kTwoTileCfg : kDefaultCfg;
  const int c = e && *e ? atoi(e) : dflt;
  return c >= 0 && c < kNumCfg ? c : dflt;
}

template <typename T>
int plan_for(const FoldArgs& a, int dtype, Plan& p) {
  switch (pick_cfg(a.M)) {
    case 1: return plan_cfg<T, F1>(a, dtype, 1, p);
    case 2: return plan_cfg<T, F2>(a, dtype, 2, p);
    case 3: return plan_cfg<T, F3>(a, dtype, 3, p);
    case 4: return plan_cfg<T, F4>(a, dtype, 4, p);
    default: return plan_cfg<T, F0>(a, dtype, 0, p);
  }
}

int64_t ws_need(const FoldArgs& a, const Plan& p) {
  return p.n_ks > 1 && !p.cluster ? (int64_t)p.n_ks * a.M * p.tiles * kTileRows : 0;
}

// Programmatic dependent launch for clusters only where pdl_cluster_enabled (up to 2 K slices by
// default: q/k/v at one token): a larger K-split cluster launched while the kernel before it drains
// waits for n_ks SMs of one GPC to be free at once, and 7B's down projection at batch 8 (clusters of
// 5) took 22.4 us instead of 15.6 (csrc/NOTES.md, sessions 14 and 17).
template <typename T, class C>
void launch_cfg(const FoldArgs& a, const Plan& p, cudaStream_t stream, bool pdl) {
  const bool early = pdl && (!p.cluster || pdl_cluster_enabled(p.n_ks));
  const LaunchCfg l(dim3(p.blocks, p.n_ks), C::THREADS, p.smem, stream, p.cluster ? p.n_ks : 1, early);
  cudaLaunchKernelEx(&l.cfg, kernel_for<T, C>(a.mode, a.norm.gamma != nullptr, p.lean, p.nt), a);
}

template <typename T>
int launch(FoldArgs a, int dtype, int64_t ws_floats, cudaStream_t stream) {
  Plan p;
  if (int e = plan_for<T>(a, dtype, p)) return e;
  a.gps = p.gps; a.n_ks = p.n_ks; a.tiles = p.tiles;
  a.cluster = p.cluster; a.iters = p.iters;
  a.ws_rows = p.tiles * kTileRows;
  for (int i = 0; i < a.nseg; ++i) a.seg[i].tile0 = p.tile0[i];
  const int64_t need = ws_need(a, p);
  if (need > 0 && a.norm.gamma)  // the slices' sums of h^2 are added in the cluster only
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold: M=%d K=%d with a norm needs a plan without a workspace (%d K slices)",
                a.M, a.K, p.n_ks);
  if (need > 0 && (a.ws == nullptr || ws_floats < need))
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold: %d K slices need a workspace of %lld floats, got %lld",
                p.n_ks, (long long)need, (long long)ws_floats);
  const DeviceSmem* d = nullptr;
  if (int e = device_smem(d)) return e;
  const bool pdl = pdl_enabled(*d, a.M);
  switch (p.cfg) {
    case 1: launch_cfg<T, F1>(a, p, stream, pdl); break;
    case 2: launch_cfg<T, F2>(a, p, stream, pdl); break;
    case 3: launch_cfg<T, F3>(a, p, stream, pdl); break;
    case 4: launch_cfg<T, F4>(a, p, stream, pdl); break;
    default: launch_cfg<T, F0>(a, p, stream, pdl); break;
  }
  if (int e = check_launch("gemv_fold_kernel")) return e;
  if (p.n_ks == 1 || p.cluster) return AWQ_OK;
  const LaunchCfg l(dim3(std::min((a.ws_rows + 255) / 256, 1024), a.M), 256, 0, stream, 1, pdl);
  cudaLaunchKernelEx(&l.cfg, a.mode == kPair ? fold_pair_finalize<T> : fold_finalize<T>, a);
  return check_launch("fold_finalize");
}

// The checks and argument packing of the entry points.
int prepare(FoldArgs& a, int nseg, const int64_t* Ns, int64_t M, int64_t K, int64_t Kp, int group_size,
            int dtype) {
  if (check_segs("awq_int4_gemm_fold", a.seg, nseg, Ns, M, kMaxM2, K, Kp, group_size, dtype) < 0)
    return AWQ_ERR_ARG;
  if (group_size != 128)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold: group_size=%d; this kernel needs 128", group_size);
  a.nseg = nseg;
  a.mode = nseg > 1 ? kMulti : kSingle;
  a.M = (int)M; a.K = (int)K; a.Kp = (int)Kp;
  a.groups = (int)(Kp / 128);
  return AWQ_OK;
}

// The norm of an entry point (awq_norm_in, or none), checked: up to 8 tokens (stage_x_norm's
// static shared memory; the two-token-tile kernels have no norm prologue).
int set_norm(FoldArgs& a, const awq_norm_in* nm, const char* who) {
  if (nm && a.M > kMaxM) return fail(AWQ_ERR_ARG, "%s: M=%d; the norm prologue takes M <= %d", who, a.M, kMaxM);
  return nm ? norm_in(a.norm, nm, a.K, who) : AWQ_OK;
}

}  // namespace
}  // namespace awq

extern "C" int64_t awq_int4_fold_max_m(void) { return awq::kMaxM2; }

extern "C" int64_t awq_int4_gemm_fold_workspace(int nseg, const int64_t* Ns, int64_t M, int64_t K, int64_t Kp,
                                                int group_size, int dtype) {
  using namespace awq;
  FoldArgs a{};
  if (!Ns || prepare(a, nseg, Ns, M, K, Kp, group_size, dtype) != AWQ_OK) return -1;
  Plan p;
  const int e = dtype == AWQ_DTYPE_BF16 ? plan_for<__nv_bfloat16>(a, dtype, p) : plan_for<__half>(a, dtype, p);
  return e == AWQ_OK ? ws_need(a, p) : -1;
}

extern "C" int awq_int4_gemm_fold(const void* x, int nseg, const uint8_t* const* qweights, const void* const* scales,
                                  const uint8_t* const* zeros, const void* const* biases, void* const* ys,
                                  const int64_t* Ns, float* ws, int64_t ws_floats, int64_t M, int64_t K, int64_t Kp,
                                  int group_size, int dtype, void* stream) {
  using namespace awq;
  FoldArgs a{};
  if (!Ns || !qweights || !scales || !zeros || !biases || !ys)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold: null array argument");
  if (int e = prepare(a, nseg, Ns, M, K, Kp, group_size, dtype)) return e;
  if (int e = set_seg_pointers("awq_int4_gemm_fold", a.seg, nseg, x, qweights, scales, zeros, biases, ys)) return e;
  a.x = x;
  a.ws = ws;
  a.x_vec = (K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? launch<__nv_bfloat16>(a, dtype, ws_floats, s) : launch<__half>(a, dtype, ws_floats, s);
}

extern "C" int64_t awq_int4_gemm_fold_glu_workspace(int64_t N, int64_t M, int64_t K, int64_t Kp, int group_size,
                                                    int dtype) {
  using namespace awq;
  FoldArgs a{};
  const int64_t Ns[2] = {N, N};
  if (prepare(a, 2, Ns, M, K, Kp, group_size, dtype) != AWQ_OK) return -1;
  a.mode = kPair;
  Plan p;
  const int e = dtype == AWQ_DTYPE_BF16 ? plan_for<__nv_bfloat16>(a, dtype, p) : plan_for<__half>(a, dtype, p);
  return e == AWQ_OK ? ws_need(a, p) : -1;
}

extern "C" int awq_int4_gemm_fold_glu(const void* x, const uint8_t* const* qweights, const void* const* scales,
                                      const uint8_t* const* zeros, const void* const* biases, void* y, int64_t N,
                                      float* ws, int64_t ws_floats, int64_t M, int64_t K, int64_t Kp, int group_size,
                                      int dtype, const awq_norm_in* norm, void* stream) {
  using namespace awq;
  FoldArgs a{};
  if (!qweights || !scales || !zeros || !biases)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold_glu: null array argument");
  const int64_t Ns[2] = {N, N};
  void* const ys[2] = {y, y};
  if (int e = prepare(a, 2, Ns, M, K, Kp, group_size, dtype)) return e;
  if (int e = set_norm(a, norm, "awq_int4_gemm_fold_glu")) return e;
  if (norm) x = norm->residual;  // not read: x's checks pass on it
  if (int e = set_seg_pointers("awq_int4_gemm_fold_glu", a.seg, 2, x, qweights, scales, zeros, biases, ys)) return e;
  a.mode = kPair;
  a.x = x;
  a.ws = ws;
  a.x_vec = (K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? launch<__nv_bfloat16>(a, dtype, ws_floats, s) : launch<__half>(a, dtype, ws_floats, s);
}

extern "C" int64_t awq_int4_gemm_fold_rope_workspace(const int64_t* Ns, int64_t M, int64_t K, int64_t Kp,
                                                     int group_size, int dtype) {
  using namespace awq;
  FoldArgs a{};
  if (!Ns || prepare(a, 3, Ns, M, K, Kp, group_size, dtype) != AWQ_OK) return -1;
  a.mode = kRope;
  Plan p;
  const int e = dtype == AWQ_DTYPE_BF16 ? plan_for<__nv_bfloat16>(a, dtype, p) : plan_for<__half>(a, dtype, p);
  return e == AWQ_OK ? ws_need(a, p) : -1;
}

extern "C" int awq_int4_gemm_fold_rope(const void* x, const uint8_t* const* qweights, const void* const* scales,
                                       const uint8_t* const* zeros, const void* const* biases, void* q,
                                       const int64_t* Ns, int64_t M, int64_t K, int64_t Kp, int group_size, int dtype,
                                       const void* cos, const void* sin, int64_t cos_bstride, const int64_t* pos,
                                       void* k_cache, void* v_cache, int64_t S, int64_t L, int64_t D,
                                       const awq_norm_in* norm, void* stream) {
  using namespace awq;
  FoldArgs a{};
  if (!Ns || !cos || !sin || !pos || !k_cache || !v_cache)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold_rope: null argument");
  if (D < 16 || D % 16 || S < 1 || M % S || L < 1 || cos_bstride < 0 || Ns[0] % D || Ns[1] != Ns[2] || Ns[1] % D)
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold_rope: bad sizes M=%lld S=%lld L=%lld D=%lld N=%lld,%lld,%lld",
                (long long)M, (long long)S, (long long)L, (long long)D, (long long)Ns[0], (long long)Ns[1],
                (long long)Ns[2]);
  void* const ys[3] = {q, q, q};  // only q's is written: k and v go to the caches
  if (int e = prepare(a, 3, Ns, M, K, Kp, group_size, dtype)) return e;
  if (int e = set_norm(a, norm, "awq_int4_gemm_fold_rope")) return e;
  if (norm) x = norm->residual;  // not read: x's checks pass on it
  if (int e = set_seg_pointers("awq_int4_gemm_fold_rope", a.seg, 3, x, qweights, scales, zeros, biases, ys)) return e;
  a.mode = kRope;
  a.rope = RopeOut{cos, sin, pos, k_cache, v_cache, cos_bstride, (int)S, (int)L, (int)D};
  a.x = x;
  a.x_vec = (K % 8 == 0) && (((uintptr_t)x & 15) == 0);
  Plan p;
  const int e = dtype == AWQ_DTYPE_BF16 ? plan_for<__nv_bfloat16>(a, dtype, p) : plan_for<__half>(a, dtype, p);
  if (e) return e;
  if (ws_need(a, p) > 0)  // no rope finalize: the caller takes int4_linear_multi + awq_rope_cache there
    return fail(AWQ_ERR_ARG, "awq_int4_gemm_fold_rope: M=%lld K=%lld needs a workspace for %d K slices",
                (long long)M, (long long)K, p.n_ks);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dtype == AWQ_DTYPE_BF16 ? launch<__nv_bfloat16>(a, dtype, 0, st) : launch<__half>(a, dtype, 0, st);
}
