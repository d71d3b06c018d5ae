// A host emulation of the small CUDA subset used by csrc/cuda/engine_cuda.cu, so that its kernels
// can be compiled as C++ and executed on a machine without a GPU (FASTCL_CUDA_EMULATION).
//
// Each CUDA thread of a block is a std::thread; blocks run one after another. __syncthreads and
// __syncwarp are barriers, __shared__ variables are function statics (shared by the block's
// threads), and every WMMA fragment holds its whole 16 x 16 (or 16 x K) matrix in each lane, so a
// warp-collective load / mma / store is performed redundantly (identical values) by all 32
// lanes. TF32 rounding is modelled by dropping the low 13 mantissa bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float x) { return __half(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

struct dim3_emu {
  unsigned x = 0, y = 0, z = 0;
};

namespace cuda_emu {

struct Ctx {
  dim3_emu thread, block, grid, dim;
  std::barrier<>* block_barrier = nullptr;
  std::barrier<>* warp_barrier = nullptr;
  float* warp_exchange = nullptr;  // 32 floats per warp
};
inline thread_local Ctx ctx;

// Runs kernel() once per thread of each block of a 1-D grid.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(block);
    const unsigned warps = (block + 31) / 32;
    std::vector<std::unique_ptr<std::barrier<>>> wbar;
    for (unsigned w = 0; w < warps; ++w) wbar.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<float> exchange(32 * warps);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        ctx.thread.x = t;
        ctx.block.x = b;
        ctx.grid.x = grid;
        ctx.dim.x = block;
        ctx.block_barrier = &bar;
        ctx.warp_barrier = wbar[t / 32].get();
        ctx.warp_exchange = exchange.data() + 32 * (t / 32);
        kernel();
      });
    }
    for (auto& th : threads) th.join();
  }
}

}  // namespace cuda_emu

#define threadIdx (cuda_emu::ctx.thread)
#define blockIdx (cuda_emu::ctx.block)
#define gridDim (cuda_emu::ctx.grid)
#define blockDim (cuda_emu::ctx.dim)

inline void __syncthreads() { cuda_emu::ctx.block_barrier->arrive_and_wait(); }
inline void __syncwarp() { cuda_emu::ctx.warp_barrier->arrive_and_wait(); }
inline float __shfl_down_sync(unsigned, float v, int delta) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  cuda_emu::ctx.warp_exchange[lane] = v;
  __syncwarp();
  const float out = lane + delta < 32 ? cuda_emu::ctx.warp_exchange[lane + delta] : v;
  __syncwarp();
  return out;
}
template <class A, class B>
inline auto min(A a, B b) -> typename std::common_type<A, B>::type {
  return a < b ? a : b;
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

inline float __float_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= ~uint32_t{0x1FFF};
  std::memcpy(&v, &bits, 4);
  return v;
}

// element (r, c) of the fragment's matrix: row-major ptr[r * ldm + c], column-major ptr[c * ldm + r]
template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const size_t idx = std::is_same<L, row_major>::value ? r * ldm + c : c * ldm + r;
      float v = static_cast<float>(p[idx]);
      if (std::is_same<T, __half>::value) v = static_cast<float>(__half(v));
      if (std::is_same<T, __nv_bfloat16>::value) v = static_cast<float>(__nv_bfloat16(v));
      f.x[r * F::cols + c] = v;
    }
}

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, class TA, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc += a.x[m * K + k] * b.x[k * N + n];
      out[m * N + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      const size_t idx = layout == mem_row_major ? m * ldm + n : n * ldm + m;
      p[idx] = f.x[m * N + n];
    }
}

}  // namespace wmma
}  // namespace nvcuda
