// Read-bandwidth of the access patterns an INT4 decode kernel can use (no math): which order of
// 16-byte loads over a row-major [N, L] byte matrix reaches the copy bandwidth?
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o mem_patterns mem_patterns.cu
//   ./mem_patterns            # prints one line per pattern: GB/s of bytes read
// Results and what they decided: csrc/NOTES.md ("Session 2"). Needs no library: it uses only
// the header's inline load.
//
// A warp owns a tile of RPW = RI * 32 / LP consecutive rows and walks its row length L in steps
// of U * 16 * LP bytes per row (one step = RI * U load instructions per lane, two steps in flight).
//   LP: lanes per row per instruction (an instruction reads 32/LP rows x 16*LP bytes)
//   STAGGER: each tile starts its walk at a different step (rotated by the tile index), so the
//            warps in flight read different column offsets instead of the same one.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include <algorithm>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

#include "../../csrc/int4_common.cuh"  // the kernels' own weight load (header-only use)

using awq::ld_stream;

template <int LP, int RI, int U, bool STAGGER, bool HINT>
__global__ void __launch_bounds__(256) walk(const uint8_t* __restrict__ w, uint32_t* out, int N, int L) {
  constexpr int RPI = 32 / LP, RPW = RI * RPI, STEP = U * 16 * LP;
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (tile * RPW >= N) return;
  const int nsteps = L / STEP;
  const uint8_t* base[RI];
#pragma unroll
  for (int r = 0; r < RI; ++r)
    base[r] = w + (size_t)(tile * RPW + r * RPI + lane / LP) * L + (lane % LP) * 16;
  uint32_t acc = 0;
  uint4 buf[2][RI][U];
  auto issue = [&](uint4 (&b)[RI][U], int s) {
    const int ss = STAGGER ? (s + tile) % nsteps : s;
#pragma unroll
    for (int r = 0; r < RI; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) b[r][u] = ld_stream<HINT>(base[r] + ss * STEP + u * 16 * LP);
  };
  auto use = [&](const uint4 (&b)[RI][U]) {
#pragma unroll
    for (int r = 0; r < RI; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= b[r][u].x ^ b[r][u].y ^ b[r][u].z ^ b[r][u].w;
  };
  issue(buf[0], 0);
  for (int s = 0; s < nsteps; s += 2) {
    if (s + 1 < nsteps) issue(buf[1], s + 1);
    use(buf[0]);
    if (s + 2 < nsteps) issue(buf[0], s + 2);
    if (s + 1 < nsteps) use(buf[1]);
  }
  if (acc == 0x12345678u) out[tile] = acc;  // keeps the loads alive
}

struct Bench {
  uint8_t* bufs[4];
  uint32_t* out;
  cudaEvent_t e0, e1;
};

// Median of 32 timed launches (after 8 warm-ups) of launch(i), i picking the rotating buffer.
template <class F>
float median_us(Bench& b, F launch) {
  std::vector<float> t;
  for (int i = 0; i < 40; ++i) {
    cudaEventRecord(b.e0);
    launch(i);
    cudaEventRecord(b.e1);
    cudaEventSynchronize(b.e1);
    float ms;
    cudaEventElapsedTime(&ms, b.e0, b.e1);
    if (i >= 8) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2] * 1000.f;
}

template <int LP, int RI, int U, bool STAGGER, bool HINT>
float run(Bench& b, int N, int L, const char* name) {
  constexpr int RPW = RI * 32 / LP;
  const int tiles = (N + RPW - 1) / RPW, blocks = (tiles + 7) / 8;
  const float us = median_us(b, [&](int i) { walk<LP, RI, U, STAGGER, HINT><<<blocks, 256>>>(b.bufs[i % 4], b.out, N, L); });
  printf("%-44s N=%6d L=%6d  %7.1f us  %6.0f GB/s\n", name, N, L, us, (double)N * L / us / 1e3);
  return us;
}


// Occupancy / pipeline-depth / compute sweep: RI rows x 512 B per step (LP = 32, U = 1), a ring of
// D steps (D - 1 in flight while one is used), F dependent FMAs per loaded word (a stand-in for
// the dequantize + dot product, ~8 instructions per word at M = 1), blocks capped per SM with
// dynamic shared memory.
template <int RI, int D, int F>
__global__ void __launch_bounds__(256) walk2(const uint8_t* __restrict__ w, float* out, int N, int L) {
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (tile * RI >= N) return;
  const int nsteps = L / 512;
  const uint8_t* base = w + (size_t)(tile * RI) * L + lane * 16;
  float acc[RI];
#pragma unroll
  for (int r = 0; r < RI; ++r) acc[r] = 0.f;
  uint4 ring[D][RI];
#pragma unroll
  for (int q = 0; q < D - 1; ++q)
#pragma unroll
    for (int r = 0; r < RI; ++r)
      if (q < nsteps) ring[q][r] = ld_stream<false>(base + (size_t)r * L + q * 512);
  for (int s = 0; s < nsteps; s += D) {
#pragma unroll
    for (int p = 0; p < D; ++p) {
      if (s + p + D - 1 < nsteps)
#pragma unroll
        for (int r = 0; r < RI; ++r) ring[(p + D - 1) % D][r] = ld_stream<false>(base + (size_t)r * L + (s + p + D - 1) * 512);
      if (s + p < nsteps)
#pragma unroll
        for (int r = 0; r < RI; ++r) {
          const uint32_t ws[4] = {ring[p][r].x, ring[p][r].y, ring[p][r].z, ring[p][r].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float v = __uint_as_float((ws[j] & 0x007F7F7Fu) | 0x3F000000u);
#pragma unroll
            for (int f = 0; f < F; ++f) acc[r] = fmaf(acc[r], 0.999f, v);
            if (F == 0) acc[r] += v;
          }
        }
    }
  }
  float t = 0.f;
#pragma unroll
  for (int r = 0; r < RI; ++r) t += acc[r];
  if (t == 1234.5f) out[tile] = t;
}

template <int RI, int D, int F>
void run2(Bench& b, int N, int L, int blocks_per_sm) {
  const int tiles = (N + RI - 1) / RI, blocks = (tiles + 7) / 8;
  int smem_sm = 0;
  cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0);
  const int smem = blocks_per_sm >= 8 ? 0 : smem_sm / blocks_per_sm - 2048;
  cudaFuncSetAttribute(walk2<RI, D, F>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int occ = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, walk2<RI, D, F>, 256, smem);
  const float us = median_us(b, [&](int i) {
    walk2<RI, D, F><<<blocks, 256, smem>>>(b.bufs[i % 4], reinterpret_cast<float*>(b.out), N, L);
  });
  printf("rows %d x 512 B, depth %d, %2d FMA/word, %2d warps/SM: %7.1f us  %6.0f GB/s  (%d KB ahead/SM)\n",
         RI, D, F, occ * 8, us, (double)N * L / us / 1e3, occ * 8 * RI * (D - 1) / 2);
}

int main() {
  Bench b;
  const size_t bytes = (size_t)28672 * 4096;  // 117.4 MB, the 8192 x 28672 int4 weight
  for (auto& p : b.bufs) { CK(cudaMalloc(&p, bytes)); CK(cudaMemset(p, 1, bytes)); }
  CK(cudaMalloc(&b.out, 1 << 20));
  CK(cudaEventCreate(&b.e0)); CK(cudaEventCreate(&b.e1));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  {  // copy bandwidth (read + write) for reference
    std::vector<float> t;
    for (int i = 0; i < 30; ++i) {
      cudaEventRecord(b.e0);
      cudaMemcpyAsync(b.bufs[(i + 1) % 4], b.bufs[i % 4], bytes / 2, cudaMemcpyDeviceToDevice);
      cudaEventRecord(b.e1);
      cudaEventSynchronize(b.e1);
      float ms; cudaEventElapsedTime(&ms, b.e0, b.e1);
      if (i >= 5) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    printf("memcpy D2D %zu MB: %.1f us, %.0f GB/s (read + write)\n", bytes / 2 >> 20,
           t[t.size() / 2] * 1e3, (double)bytes / (t[t.size() / 2] * 1e3) / 1e3);
  }
  for (int L : {4096, 14336}) {
    const int N = (int)(bytes / L);
    run<32, 1, 8, false, false>(b, N, L, "1 row x 4 KB per step (contiguous)");
    run<32, 1, 4, false, false>(b, N, L, "1 row x 2 KB");
    run<32, 2, 2, false, false>(b, N, L, "2 rows x 1 KB");
    run<32, 4, 1, false, false>(b, N, L, "4 rows x 512 B (simt today)");
    run<32, 4, 1, false, true>(b, N, L, "4 rows x 512 B, L2::256B hint");
    run<32, 4, 1, true, false>(b, N, L, "4 rows x 512 B, staggered");
    run<32, 4, 2, false, false>(b, N, L, "4 rows x 1 KB");
    run<32, 4, 2, true, false>(b, N, L, "4 rows x 1 KB, staggered");
    run<32, 8, 1, false, false>(b, N, L, "8 rows x 512 B");
    run<16, 8, 1, false, false>(b, N, L, "16 rows x 256 B (mma today)");
    run<16, 8, 1, true, false>(b, N, L, "16 rows x 256 B, staggered");
    run<16, 8, 2, false, false>(b, N, L, "16 rows x 512 B");
    run<16, 8, 2, true, false>(b, N, L, "16 rows x 512 B, staggered");
    run<8, 4, 2, false, false>(b, N, L, "16 rows x 256 B (4 lanes/row, 2 instr)");
    run<8, 4, 2, true, false>(b, N, L, "16 rows x 256 B (4 lanes/row), staggered");
  }

  {
    const int N = 28672, L = 4096;
    printf("--- occupancy / depth / compute sweep (8192 x 28672 int4) ---\n");
    for (int bps : {1, 2, 4, 8}) {
      run2<4, 2, 0>(b, N, L, bps);
      run2<4, 3, 0>(b, N, L, bps);
      run2<4, 4, 0>(b, N, L, bps);
      run2<4, 2, 8>(b, N, L, bps);
      run2<4, 3, 8>(b, N, L, bps);
      run2<4, 4, 8>(b, N, L, bps);
      run2<2, 4, 8>(b, N, L, bps);
      run2<2, 6, 8>(b, N, L, bps);
      run2<4, 2, 16>(b, N, L, bps);
      run2<4, 4, 16>(b, N, L, bps);
    }
  }
  return 0;
}
