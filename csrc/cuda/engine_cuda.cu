// CUDA kernels of the engine ops (sm_80+): tensor-core tiles via nvcuda::wmma.
//
//  * fp16 / bf16 inputs: 16x16x16 WMMA with fp32 accumulation.
//  * fp32 inputs: 16x16x8 TF32 WMMA, or plain fp32 FMA when exact=True.
//
// Every kernel works on 64 x 64 tiles of C = <own rows, other rows> built from 32-wide feature
// chunks staged in shared memory (zero-padded, so N, M and D need no alignment), with 128 threads
// (4 warps, each owning a 32 x 32 quarter of the tile).
//
//  forward_kernel  one CTA per row block (grid-strided): online row LSE / positives; for symmetric
//                  losses each CTA also keeps online column (max, sum-exp) partials of its own in
//                  a (grid x M) buffer, merged by merge_cols_kernel in a fixed order.
//  grad_kernel     one CTA per "own" block: recomputes the tiles against every "other" block,
//                  forms dS from the saved statistics and accumulates d_own += dS @ other into an
//                  fp32 buffer it owns exclusively (no atomics). Run once with own = queries (dQ)
//                  and once with own = keys (dK, transposed indexing). Per-CTA partial sums of
//                  dS * C and dS give d_scale / d_bias after a deterministic reduction. On request
//                  it also sums, per own line, that line's part of dS (row part for own =
//                  queries, column part for own = keys), for fastcl.ops.correct_line_totals.
//
// All launches go on the current stream; nothing here synchronises with the host.
#include <limits>
#include <type_traits>

#include "fastcl.h"

#ifdef FASTCL_CUDA_EMULATION
// tests/cpp: the kernels compiled as host C++ and run on CPU threads (launchers left out)
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>
#endif

namespace fastcl {
namespace {

using namespace nvcuda;

constexpr int kBM = 64;       // own rows per tile
constexpr int kBN = 64;       // other rows per tile
constexpr int kBK = 32;       // feature chunk of the similarity product
constexpr int kDC = 64;       // feature chunk of the gradient product
constexpr int kThreads = 128;  // 4 warps
constexpr int kLdC = kBN + 4;  // fp32 tile leading dimension

// ---------------------------------------------------------------------------------------------
// modes: the shared-memory element type and how a tile product is formed
// ---------------------------------------------------------------------------------------------

struct ModeHalf {
  using T = __half;
  using Frag = __half;
  static constexpr bool kWmma = true, kTf32 = false;
  static constexpr int kK = 16, kPad = 8;
};
struct ModeBf16 {
  using T = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  static constexpr bool kWmma = true, kTf32 = false;
  static constexpr int kK = 16, kPad = 8;
};
struct ModeTf32 {
  using T = float;
  using Frag = wmma::precision::tf32;
  static constexpr bool kWmma = true, kTf32 = true;
  static constexpr int kK = 8, kPad = 4;
};
struct ModeF32 {  // exact: IEEE fp32 FMA
  using T = float;
  static constexpr bool kWmma = false;
  static constexpr int kPad = 4;
};

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

constexpr int align128(int x) { return (x + 127) / 128 * 128; }

// Shared-memory layout of one CTA (bytes; every segment 128-byte aligned).
template <class Mode>
struct Smem {
  using T = typename Mode::T;
  static constexpr int kLdK = kBK + Mode::kPad;  // sA / sB leading dimension
  static constexpr int kLdP = kBN + Mode::kPad;  // dS in the input type (16-bit modes)
  static constexpr int kLdV = kDC + Mode::kPad;  // other-rows chunk of the gradient product
  static constexpr bool kNeedP = !std::is_same<T, float>::value;
  static constexpr int kCBytes = align128(kBM * kLdC * 4);
  static constexpr int kABytes = align128(kBM * kLdK * (int)sizeof(T));
  static constexpr int kBBytes = align128(kBN * kLdK * (int)sizeof(T));
  static constexpr int kPBytes = kNeedP ? align128(kBM * kLdP * (int)sizeof(T)) : 0;
  static constexpr int kVBytes = align128(kBN * kLdV * (int)sizeof(T));
  static constexpr int kRegion = (kABytes + kBBytes) > (kPBytes + kVBytes) ? (kABytes + kBBytes)
                                                                           : (kPBytes + kVBytes);
  static constexpr int kWBytes = (kThreads / 32) * 256 * 4;  // per-warp 16x16 fp32 scratch
  static constexpr int kC = 0, kA = kCBytes, kB = kCBytes + kABytes, kP = kCBytes,
                       kV = kCBytes + kPBytes, kW = kCBytes + kRegion;
  static constexpr int kBytes = kW + kWBytes;
};

// ---------------------------------------------------------------------------------------------
// tile products: each CTA accumulates a 64 x 64 fp32 tile
// ---------------------------------------------------------------------------------------------

template <class Mode>
struct WmmaAcc {
  using T = typename Mode::T;
  using F = typename Mode::Frag;
  static constexpr int K = Mode::kK;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> c[2][2];
  int wr, wc;  // origin of this warp's 32 x 32 quarter

  __device__ WmmaAcc() {
    const int w = threadIdx.x / 32;
    wr = (w >> 1) * 32;
    wc = (w & 1) * 32;
  }
  __device__ void zero() {
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int y = 0; y < 2; ++y) wmma::fill_fragment(c[x][y], 0.f);
  }
  // c += A (64 x kdim, row-major, lda) * B, with B (kdim x 64) given as col_major (stored [n][k],
  // ldb) or row_major (stored [k][n], ldb).
  template <class LayoutB>
  __device__ void mma(const T* A, int lda, const T* B, int ldb, int kdim) {
    for (int kk = 0; kk < kdim; kk += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, F, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, K, F, LayoutB> b[2];
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        wmma::load_matrix_sync(a[x], A + (wr + 16 * x) * lda + kk, lda);
        if constexpr (Mode::kTf32) {
#pragma unroll
          for (int e = 0; e < a[x].num_elements; ++e) a[x].x[e] = wmma::__float_to_tf32(a[x].x[e]);
        }
      }
#pragma unroll
      for (int y = 0; y < 2; ++y) {
        const T* pb = std::is_same<LayoutB, wmma::col_major>::value
                          ? B + (wc + 16 * y) * ldb + kk
                          : B + kk * ldb + wc + 16 * y;
        wmma::load_matrix_sync(b[y], pb, ldb);
        if constexpr (Mode::kTf32) {
#pragma unroll
          for (int e = 0; e < b[y].num_elements; ++e) b[y].x[e] = wmma::__float_to_tf32(b[y].x[e]);
        }
      }
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int y = 0; y < 2; ++y) wmma::mma_sync(c[x][y], a[x], b[y], c[x][y]);
    }
  }
  __device__ void store(float* C, int ldc) {
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int y = 0; y < 2; ++y)
        wmma::store_matrix_sync(C + (wr + 16 * x) * ldc + wc + 16 * y, c[x][y], ldc,
                                wmma::mem_row_major);
  }
  // out[r * ld + col] += tile[r][col] for r < nrows, col < ncols (out: global fp32).
  __device__ void add_to(float* out, int64_t ld, int64_t nrows, int64_t ncols, float* scratch) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int y = 0; y < 2; ++y) {
        wmma::store_matrix_sync(scratch, c[x][y], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t r = wr + 16 * x + e / 16, col = wc + 16 * y + e % 16;
          if (r < nrows && col < ncols) out[r * ld + col] += scratch[e];
        }
        __syncwarp();
      }
  }
};

struct FmaAcc {  // exact fp32: each thread owns an 8 x 4 block of the tile
  float c[8][4];
  int ty, tx;
  __device__ FmaAcc() : ty(threadIdx.x / 16), tx(threadIdx.x % 16) {}
  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) c[r][q] = 0.f;
  }
  template <class LayoutB>
  __device__ void mma(const float* A, int lda, const float* B, int ldb, int kdim) {
    constexpr bool kColMajor = std::is_same<LayoutB, wmma::col_major>::value;
    for (int k = 0; k < kdim; ++k) {
      float a[8], b[4];
#pragma unroll
      for (int r = 0; r < 8; ++r) a[r] = A[(ty * 8 + r) * lda + k];
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = kColMajor ? B[(tx * 4 + q) * ldb + k] : B[k * ldb + tx * 4 + q];
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) c[r][q] = fmaf(a[r], b[q], c[r][q]);
    }
  }
  __device__ void store(float* C, int ldc) {
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) C[(ty * 8 + r) * ldc + tx * 4 + q] = c[r][q];
  }
  __device__ void add_to(float* out, int64_t ld, int64_t nrows, int64_t ncols, float*) {
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t row = ty * 8 + r, col = tx * 4 + q;
        if (row < nrows && col < ncols) out[row * ld + col] += c[r][q];
      }
  }
};

template <class Mode>
using AccOf = typename std::conditional<Mode::kWmma, WmmaAcc<Mode>, FmaAcc>::type;

// dst[r][c] = X[row0 + r][d0 + c] (r < 64, c < W), zero outside X (n x D, row-major).
template <class T, int W>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* __restrict__ X, int64_t n,
                                          int64_t D, int64_t row0, int64_t d0) {
  for (int e = threadIdx.x; e < 64 * W; e += kThreads) {
    const int r = e / W, c = e % W;
    const int64_t row = row0 + r, d = d0 + c;
    dst[r * ld + c] = (row < n && d < D) ? X[row * D + d] : from_float<T>(0.f);
  }
}

// sC[a][b] = <own[own0 + a], other[oth0 + b]> over all D features (0 outside the inputs).
template <class Mode>
__device__ void sim_tile(AccOf<Mode>& acc, unsigned char* smem, const typename Mode::T* own,
                         int64_t n_own, int64_t own0, const typename Mode::T* other, int64_t n_other,
                         int64_t oth0, int64_t D) {
  using T = typename Mode::T;
  using L = Smem<Mode>;
  T* sA = reinterpret_cast<T*>(smem + L::kA);
  T* sB = reinterpret_cast<T*>(smem + L::kB);
  float* sC = reinterpret_cast<float*>(smem + L::kC);
  acc.zero();
  for (int64_t d0 = 0; d0 < D; d0 += kBK) {
    __syncthreads();  // previous readers of the staging buffers are done
    load_rows<T, kBK>(sA, L::kLdK, own, n_own, D, own0, d0);
    load_rows<T, kBK>(sB, L::kLdK, other, n_other, D, oth0, d0);
    __syncthreads();
    acc.template mma<wmma::col_major>(sA, L::kLdK, sB, L::kLdK, kBK);
  }
  __syncthreads();  // everyone is done reading the previous tile in sC
  acc.store(sC, kLdC);
  __syncthreads();
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <class Mode>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const typename Mode::T* __restrict__ q, const typename Mode::T* __restrict__ k,
                   int64_t N, int64_t M, int64_t D, const float* __restrict__ scale,
                   const float* __restrict__ bias, TargetMeta t, int64_t kind, bool symmetric,
                   float* __restrict__ row_lse, float* __restrict__ row_pos,
                   float* __restrict__ row_npos, float* __restrict__ part_max,
                   double* __restrict__ part_sum, float* __restrict__ col_pos,
                   float* __restrict__ row_lse_lo) {
  __shared__ __align__(128) unsigned char smem[Smem<Mode>::kBytes];
  const float* sC = reinterpret_cast<const float*>(smem + Smem<Mode>::kC);
  AccOf<Mode> acc;
  const float s = scale[0];
  const float b = bias != nullptr ? bias[0] : 0.f;
  const int tid = threadIdx.x;
  const int64_t nrb = (N + kBM - 1) / kBM;
  float* pmax = symmetric ? part_max + static_cast<int64_t>(blockIdx.x) * M : nullptr;
  double* psum = symmetric ? part_sum + static_cast<int64_t>(blockIdx.x) * M : nullptr;

  for (int64_t rb = blockIdx.x; rb < nrb; rb += gridDim.x) {
    const int64_t r0 = rb * kBM;
    const int nr = static_cast<int>(min(static_cast<int64_t>(kBM), N - r0));
    // (sums of exponentials in double: beside a dominant 1, float32 additions would round by up
    // to 6e-8 each, next to a loss log(l) ~ 1e-3; see lse_parts)
    float m = kind == kSigmoid ? 0.f : kNegInf, pos = 0.f, npos = 0.f;
    double l = 0.0;
    for (int64_t c0 = 0; c0 < M; c0 += kBN) {
      sim_tile<Mode>(acc, smem, q, N, r0, k, M, c0, D);
      const int nc = static_cast<int>(min(static_cast<int64_t>(kBN), M - c0));
      if (tid < kBM) {  // threads 0..63: one row each
        const int64_t i = r0 + tid;
        if (tid < nr) {
          const float* Cr = sC + tid * kLdC;
          if (kind == kSigmoid) {
            for (int c = 0; c < nc; ++c) {
              const int64_t j = c0 + c;
              if (!t.valid(i, j)) continue;
              const float S = s * Cr[c] + b;
              m += softplus_f(t.target(i, j) ? -S : S);
            }
          } else {
            float tmax = kNegInf;
            for (int c = 0; c < nc; ++c) {
              const int64_t j = c0 + c;
              if (!t.valid(i, j)) continue;
              const float S = s * Cr[c] + b;
              tmax = fmaxf(tmax, S);
              if (t.target(i, j)) {
                pos += S;
                npos += 1.f;
              }
            }
            const float mnew = fmaxf(m, tmax);
            if (mnew != kNegInf) {
              double sum = 0.0;
              for (int c = 0; c < nc; ++c) {
                const int64_t j = c0 + c;
                if (t.valid(i, j)) sum += expf(s * Cr[c] + b - mnew);
              }
              l = l * exp(static_cast<double>(m) - mnew) + sum;
              m = mnew;
            }
          }
        }
      } else if (symmetric) {  // threads 64..127: one column each
        const int c = tid - kBM;
        const int64_t j = c0 + c;
        if (c < nc) {
          float tmax = kNegInf;
          for (int r = 0; r < nr; ++r)
            if (t.valid(r0 + r, j)) tmax = fmaxf(tmax, s * sC[r * kLdC + c] + b);
          const float pm = pmax[j];
          const float mnew = fmaxf(pm, tmax);
          if (mnew != kNegInf) {
            double sum = psum[j] * exp(static_cast<double>(pm) - mnew);
            for (int r = 0; r < nr; ++r)
              if (t.valid(r0 + r, j)) sum += expf(s * sC[r * kLdC + c] + b - mnew);
            pmax[j] = mnew;
            psum[j] = sum;
          }
          const int64_t pc = t.pos_of_col(j);
          if (pc >= r0 && pc < r0 + nr && t.valid(pc, j))
            col_pos[j] = s * sC[(pc - r0) * kLdC + c] + b;
        }
      }
    }
    if (tid < nr) {
      const int64_t i = r0 + tid;
      if (kind == kSigmoid)
        row_lse[i] = m;
      else
        lse_parts(m, l, row_lse[i], row_lse_lo[i]);
      row_pos[i] = pos;
      row_npos[i] = npos;
    }
  }
}

__global__ void merge_cols_kernel(const float* __restrict__ part_max,
                                  const double* __restrict__ part_sum, int64_t G, int64_t M,
                                  float* __restrict__ col_lse, float* __restrict__ col_lse_lo) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M) return;
  float m = kNegInf;
  for (int64_t g = 0; g < G; ++g) m = fmaxf(m, part_max[g * M + j]);
  if (m == kNegInf) {
    col_lse[j] = kNegInf;
    col_lse_lo[j] = 0.f;
    return;
  }
  double l = 0.0;
  for (int64_t g = 0; g < G; ++g) l += part_sum[g * M + j] * exp(static_cast<double>(part_max[g * M + j]) - m);
  lse_parts(m, l, col_lse[j], col_lse_lo[j]);
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

template <class Mode, bool kLines = false>  // kLines: sum the own lines' parts into line_sums
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const typename Mode::T* __restrict__ own, int64_t n_own,
                const typename Mode::T* __restrict__ other, int64_t n_other, int64_t D,
                const float* __restrict__ scale, const float* __restrict__ bias, TargetMeta t,
                GradMeta gm, bool transposed, bool need_out, float* __restrict__ d_own,
                float* __restrict__ part_s, float* __restrict__ part_b,
                float* __restrict__ line_sums) {
  using T = typename Mode::T;
  using L = Smem<Mode>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  __shared__ float red[2][kThreads / 32];
  // Line sums: warp w covers, in step k of the tile's entry loop, own line 2k + w / 2 and half
  // w % 2 of the other side: one slot each, summed by thread a < kBM for its line a afterwards.
  __shared__ float line_part[2][kBM];
  static_assert(kThreads == 2 * kBN && kBN == 64, "line sums assume two warps per tile line");
  float* sC = reinterpret_cast<float*>(smem + L::kC);
  T* sP = reinterpret_cast<T*>(smem + L::kP);
  T* sV = reinterpret_cast<T*>(smem + L::kV);
  float* sW = reinterpret_cast<float*>(smem + L::kW) + (threadIdx.x / 32) * 256;
  const T* A = L::kNeedP ? sP : reinterpret_cast<const T*>(sC);
  const int lda = L::kNeedP ? L::kLdP : kLdC;

  AccOf<Mode> acc;
  const float s = scale[0];
  const float b = bias != nullptr ? bias[0] : 0.f;
  const int tid = threadIdx.x;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n_rows = min(static_cast<int64_t>(kBM), n_own - own0);
  double sum_s = 0.0, sum_b = 0.0;  // float within a tile, double across tiles
  double line_acc = 0.0;            // thread a < kBM: own line a's sum (line_sums)

  for (int64_t o0 = 0; o0 < n_other; o0 += kBN) {
    sim_tile<Mode>(acc, smem, own, n_own, own0, other, n_other, o0, D);
    float acc_s = 0.f, acc_b = 0.f;
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int a = e / kBN, bb = e % kBN;
      const int64_t ia = own0 + a, ib = o0 + bb;
      float d = 0.f, own_part = 0.f;
      if (ia < n_own && ib < n_other) {
        const float c = sC[a * kLdC + bb];
        const int64_t i = transposed ? ib : ia, j = transposed ? ia : ib;
        float d_row, d_col;
        grad_logit_parts(t, gm, i, j, c, s, b, d_row, d_col);
        d = d_row + d_col;
        own_part = transposed ? d_col : d_row;
        // (centred scale sums: each part on its line's centre, see GradMeta)
        const float m = gm.row_centre != nullptr ? gm.row_centre[i] : 0.f;
        const float n = gm.col_centre != nullptr ? gm.col_centre[j] : 0.f;
        acc_s += d_row * (c - m) + d_col * (c - n);
        acc_b += d;
      }
      sC[a * kLdC + bb] = d;
      if constexpr (L::kNeedP) sP[a * L::kLdP + bb] = from_float<T>(d);
      if constexpr (kLines) {  // every lane shuffles
        for (int o = 16; o > 0; o >>= 1) own_part += __shfl_down_sync(0xffffffffu, own_part, o);
        if ((tid & 31) == 0) line_part[(tid / 32) % 2][a] = own_part;
      }
    }
    sum_s += acc_s;
    sum_b += acc_b;
    if constexpr (kLines) {
      __syncthreads();  // (the next writes to line_part follow the next sim_tile's barriers)
      if (tid < kBM) line_acc += static_cast<double>(line_part[0][tid] + line_part[1][tid]);
    }
    if (!need_out) continue;  // block-uniform; the next sim_tile synchronises first
    for (int64_t d0 = 0; d0 < D; d0 += kDC) {
      __syncthreads();  // dS complete / previous chunk consumed
      load_rows<T, kDC>(sV, L::kLdV, other, n_other, D, o0, d0);
      __syncthreads();
      acc.zero();
      acc.template mma<wmma::row_major>(A, lda, sV, L::kLdV, kBN);
      acc.add_to(d_own + own0 * D + d0, D, n_rows, min(static_cast<int64_t>(kDC), D - d0), sW);
    }
  }

  if (kLines && tid < n_rows) line_sums[own0 + tid] = static_cast<float>(line_acc);
  if (part_s != nullptr) {  // fixed-order block reduction: deterministic
    float acc_s = static_cast<float>(sum_s), acc_b = static_cast<float>(sum_b);
    for (int o = 16; o > 0; o >>= 1) {
      acc_s += __shfl_down_sync(0xffffffffu, acc_s, o);
      acc_b += __shfl_down_sync(0xffffffffu, acc_b, o);
    }
    if ((tid & 31) == 0) {
      red[0][tid / 32] = acc_s;
      red[1][tid / 32] = acc_b;
    }
    __syncthreads();
    if (tid == 0) {
      float ts = 0.f, tb = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) ts += red[0][w], tb += red[1][w];
      part_s[blockIdx.x] = ts;
      part_b[blockIdx.x] = tb;
    }
  }
}

#ifndef FASTCL_CUDA_EMULATION
// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

template <class F>
void dispatch_mode(at::ScalarType dtype, bool exact, F&& f) {
  switch (dtype) {
    case at::kHalf:
      f(ModeHalf{});
      break;
    case at::kBFloat16:
      f(ModeBf16{});
      break;
    case at::kFloat:
      if (exact)
        f(ModeF32{});
      else
        f(ModeTf32{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "queries must be float16, bfloat16 or float32, got ", dtype);
  }
}

template <class Mode>
const typename Mode::T* typed(const at::Tensor& x) {
  return reinterpret_cast<const typename Mode::T*>(x.data_ptr());
}

const float* fptr_or_null(const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; }
float* mut_or_null(const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; }

at::Tensor f32c(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Checks the device and returns its number of SMs (attribute queries: no synchronisation).
int64_t check_cuda(const at::Tensor& queries) {
  TORCH_CHECK_VALUE(queries.is_cuda(), "the CUDA kernels need CUDA tensors, got ", queries.device());
  const int dev = queries.device().index();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, dev);
  TORCH_CHECK(major >= 8, "the fastcl CUDA kernels need compute capability 8.0 or newer, got ",
              major, ".", device_attribute(cudaDevAttrComputeCapabilityMinor, dev));
  return device_attribute(cudaDevAttrMultiProcessorCount, dev);
}

struct CudaProblem {
  at::Tensor q, k, scale, bias, idx[4];
  TargetMeta t;
};

CudaProblem make_cuda_problem(const at::Tensor& queries, const at::Tensor& keys,
                              const at::Tensor& scale, const OptT& bias, const OptT& positives,
                              const OptT& col_positives, const OptT& row_labels,
                              const OptT& col_labels, bool exclude_self, int64_t offset) {
  CudaProblem p;
  p.q = queries.contiguous();
  p.k = keys.contiguous();
  p.scale = scale.contiguous();
  p.bias = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  p.idx[0] = index_or_empty(positives);
  p.idx[1] = index_or_empty(col_positives);
  p.idx[2] = index_or_empty(row_labels);
  p.idx[3] = index_or_empty(col_labels);
  p.t = TargetMeta{ptr_or_null(p.idx[0]), ptr_or_null(p.idx[1]), ptr_or_null(p.idx[2]),
                   ptr_or_null(p.idx[3]), offset, exclude_self};
  return p;
}

ForwardOut engine_forward_cuda(const at::Tensor& queries, const at::Tensor& keys,
                               const at::Tensor& scale, const OptT& bias, const OptT& positives,
                               const OptT& col_positives, const OptT& row_labels,
                               const OptT& col_labels, int64_t kind, bool symmetric,
                               bool exclude_self, int64_t offset, bool exact) {
  check_engine_inputs(queries, keys, scale, bias, positives, col_positives, row_labels, col_labels,
                      kind, symmetric);
  const int64_t sms = check_cuda(queries);
  const c10::cuda::CUDAGuard guard(queries.device());
  const CudaProblem p = make_cuda_problem(queries, keys, scale, bias, positives, col_positives,
                                          row_labels, col_labels, exclude_self, offset);
  const int64_t N = queries.size(0), M = keys.size(0), D = queries.size(1);
  const auto f32 = queries.options().dtype(at::kFloat);
  at::Tensor row_lse = at::full({N}, kind == kSigmoid ? 0.f : kNegInf, f32);
  at::Tensor row_pos = at::zeros({N}, f32);
  at::Tensor row_npos = at::zeros({N}, f32);
  at::Tensor col_lse = at::full({symmetric ? M : 0}, kNegInf, f32);
  at::Tensor col_pos = at::zeros({symmetric ? M : 0}, f32);
  at::Tensor row_lo = at::zeros({N}, f32);
  at::Tensor col_lo = at::zeros({symmetric ? M : 0}, f32);
  if (N == 0 || M == 0) return {row_lse, row_pos, row_npos, col_lse, col_pos, row_lo, col_lo};

  const int64_t nrb = (N + kBM - 1) / kBM;
  const int64_t grid = symmetric ? std::min(nrb, 4 * sms) : nrb;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "too many rows: N = ", N);
  at::Tensor part_max = symmetric ? at::full({grid, M}, kNegInf, f32) : at::Tensor();
  at::Tensor part_sum =
      symmetric ? at::zeros({grid, M}, queries.options().dtype(at::kDouble)) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_mode(queries.scalar_type(), exact, [&](auto mode) {
    using Mode = decltype(mode);
    forward_kernel<Mode><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        typed<Mode>(p.q), typed<Mode>(p.k), N, M, D, p.scale.data_ptr<float>(),
        fptr_or_null(p.bias), p.t, kind, symmetric, row_lse.data_ptr<float>(),
        row_pos.data_ptr<float>(), row_npos.data_ptr<float>(), mut_or_null(part_max),
        symmetric ? part_sum.data_ptr<double>() : nullptr,
        symmetric ? col_pos.data_ptr<float>() : nullptr,
        row_lo.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (symmetric) {
    const int threads = 256;
    const int64_t blocks = (M + threads - 1) / threads;
    merge_cols_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        part_max.data_ptr<float>(), part_sum.data_ptr<double>(), grid, M, col_lse.data_ptr<float>(),
        col_lo.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {row_lse, row_pos, row_npos, col_lse, col_pos, row_lo, col_lo};
}

BackwardOut engine_backward_cuda(const at::Tensor& queries, const at::Tensor& keys,
                                 const at::Tensor& scale, const OptT& bias, const OptT& positives,
                                 const OptT& col_positives, const OptT& row_labels,
                                 const OptT& col_labels, int64_t kind, bool symmetric,
                                 bool exclude_self, int64_t offset, bool exact,
                                 const at::Tensor& row_lse, const at::Tensor& row_npos,
                                 const OptT& col_lse, const at::Tensor& grad_row,
                                 const OptT& grad_col, bool need_q, bool need_k, bool need_scale,
                                 bool need_bias, bool line_sums) {
  TORCH_CHECK_VALUE(!line_sums || kind == kSoftmax, "line_sums is only for softmax closures (kind=0)");
  check_engine_inputs(queries, keys, scale, bias, positives, col_positives, row_labels, col_labels,
                      kind, symmetric);
  check_backward_inputs(queries, keys, symmetric, row_lse, row_npos, col_lse, grad_row, grad_col);
  check_cuda(queries);
  const c10::cuda::CUDAGuard guard(queries.device());
  const CudaProblem p = make_cuda_problem(queries, keys, scale, bias, positives, col_positives,
                                          row_labels, col_labels, exclude_self, offset);
  const int64_t N = queries.size(0), M = keys.size(0), D = queries.size(1);
  const auto f32 = queries.options().dtype(at::kFloat);
  const bool has_gc = grad_col.has_value() && grad_col->defined();
  const at::Tensor lse32 = f32c(row_lse), npos32 = f32c(row_npos), g32 = f32c(grad_row);
  const at::Tensor clse32 = has_gc ? f32c(*col_lse) : at::Tensor();
  const at::Tensor gc32 = has_gc ? f32c(*grad_col) : at::Tensor();
  const bool softmax = kind == kSoftmax;
  const at::Tensor rc = softmax ? scale_centres(lse32, scale, bias, keys.size(0)) : at::Tensor();
  const at::Tensor cc = softmax && has_gc ? scale_centres(clse32, scale, bias, queries.size(0)) : at::Tensor();
  const GradMeta gm{lse32.data_ptr<float>(), npos32.data_ptr<float>(), fptr_or_null(clse32),
                    g32.data_ptr<float>(), fptr_or_null(gc32), kind, fptr_or_null(rc), fptr_or_null(cc)};

  const bool need_sb = need_scale || need_bias;
  // Line sums: each sweep sums its own lines (rows: the row parts, columns: the column parts),
  // running for those sums alone when its gradient is not needed.
  const bool col_lines = line_sums && has_gc;
  const bool row_sweep = need_q || (need_sb && !need_k) || line_sums;
  const bool col_sweep = need_k || col_lines;
  at::Tensor dq32 = need_q ? at::zeros({N, D}, f32) : at::Tensor();
  at::Tensor dk32 = need_k ? at::zeros({M, D}, f32) : at::Tensor();
  at::Tensor row_sums = at::zeros({line_sums ? N : 0}, f32);
  at::Tensor col_sums = at::zeros({col_lines ? M : 0}, f32);
  const int64_t nqb = (N + kBM - 1) / kBM, nkb = (M + kBM - 1) / kBM;
  const int64_t nparts = need_sb ? (row_sweep ? nqb : nkb) : 0;
  at::Tensor part_s = at::zeros({nparts}, f32), part_b = at::zeros({nparts}, f32);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (N > 0 && M > 0) {
    dispatch_mode(queries.scalar_type(), exact, [&](auto mode) {
      using Mode = decltype(mode);
      // (the line sums' variant only where asked for: it takes ~25% more registers)
      const auto grad = [](bool lines) {
        return lines ? grad_kernel<Mode, true> : grad_kernel<Mode, false>;
      };
      if (row_sweep) {
        grad(line_sums)<<<static_cast<unsigned>(nqb), kThreads, 0, stream>>>(
            typed<Mode>(p.q), N, typed<Mode>(p.k), M, D, p.scale.data_ptr<float>(),
            fptr_or_null(p.bias), p.t, gm, /*transposed=*/false, need_q, mut_or_null(dq32),
            need_sb ? part_s.data_ptr<float>() : nullptr,
            need_sb ? part_b.data_ptr<float>() : nullptr,
            line_sums ? row_sums.data_ptr<float>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (col_sweep) {
        const bool sb_here = need_sb && !row_sweep;
        grad(col_lines)<<<static_cast<unsigned>(nkb), kThreads, 0, stream>>>(
            typed<Mode>(p.k), M, typed<Mode>(p.q), N, D, p.scale.data_ptr<float>(),
            fptr_or_null(p.bias), p.t, gm, /*transposed=*/true, need_k, mut_or_null(dk32),
            sb_here ? part_s.data_ptr<float>() : nullptr,
            sb_here ? part_b.data_ptr<float>() : nullptr,
            col_lines ? col_sums.data_ptr<float>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  const auto empty_of = [](const at::Tensor& x) { return at::empty({0}, x.options()); };
  at::Tensor out_q = need_q ? at::mul(dq32, p.scale).to(queries.scalar_type()) : empty_of(queries);
  at::Tensor out_k = need_k ? at::mul(dk32, p.scale).to(keys.scalar_type()) : empty_of(keys);
  at::Tensor out_s = need_scale ? part_s.sum().reshape({1}) : at::empty({0}, f32);
  at::Tensor out_b = need_bias ? part_b.sum().reshape({1}) : at::empty({0}, f32);
  if (softmax && need_sb) {  // the centred sums' known totals (exact: the row part's are 0)
    const at::Tensor tot = scale_sum_totals(cc.defined() ? cc : at::zeros({M}, f32),
                                            has_gc ? OptT(clse32) : OptT(), has_gc ? OptT(gc32) : OptT(),
                                            col_positives, N, M, offset, exclude_self, queries);
    if (need_scale) out_s = out_s + tot.narrow(0, 0, 1);
    if (need_bias) out_b = tot.narrow(0, 1, 1).clone();
  }
  return {out_q, out_k, out_s, out_b, row_sums, col_sums};
}

#endif  // FASTCL_CUDA_EMULATION

}  // namespace
}  // namespace fastcl

#ifndef FASTCL_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fastcl, CUDA, m) {
  m.impl("engine_forward", &fastcl::engine_forward_cuda);
  m.impl("engine_backward", &fastcl::engine_backward_cuda);
}
#endif
