// CPU kernels of the engine ops: blocked over (row block x column block) tiles, threads over
// contiguous groups of blocks (at::parallel_for), fp32 accumulation for fp16/bf16/fp32 inputs.
//
// A tile of raw similarities C = Q_blk K_blk^T (kRows x kCols) is computed with a small GEMM into
// per-thread scratch; nothing of size N x M is ever allocated. Row statistics are kept online per
// row block; column statistics of symmetric losses are kept per thread group (G x M partial max /
// sum-exp) and merged afterwards, so the column LSE is exact at any scale. The backward sweep
// recomputes tiles from the saved statistics: a row sweep owns dQ rows and, while the per-thread
// (M, D) partials stay small, also accumulates dK into them; otherwise dK gets a column sweep
// that owns its columns. Reductions run in a fixed order, so results are deterministic for a
// given thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fastcl.h"

namespace fastcl {
namespace {

constexpr int64_t kRows = 128;  // rows (queries) per tile
constexpr int64_t kCols = 256;  // columns (keys) per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kFusedScratchBytes = int64_t{64} << 20;  // per-thread dK partials, all threads

// exp(x) for x <= 88 without branches, so that tile loops vectorise (inlined, and built without
// trapping math: setup.py's CXX_OPT_FLAGS): a degree-7 polynomial on the
// reduced argument |f| <= ln(2) / 2 (truncation ~5e-9, below float32 rounding: the scale
// gradient's centred sums weigh every entry's relative error); returns 0 for x < -87.3 and -inf.
#if defined(__GNUC__)
__attribute__((always_inline))  // (a call in a tile loop would keep it scalar)
#endif
inline float exp_fast(float x) {
  x = x < -88.f ? -88.f : x;
  const float shifter = 12582912.f;  // 1.5 * 2^23: t + shifter rounds t to an integer
  const float r = x * 1.44269504088896341f + shifter;
  int32_t bits;
  std::memcpy(&bits, &r, sizeof(bits));
  const int32_t n = bits - 0x4B400000;
  const float nf = r - shifter;
  const float f = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t e = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, sizeof(two_n));
  return p * two_n;
}

// log(1 + u) for 0 <= u <= 1 without branches: 2 atanh(t), t = u / (2 + u) <= 1/3, by its odd
// series to t^17 (truncation < 2e-9 relative).
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float log1p_unit(float u) {
  const float t = u / (2.f + u);
  const float t2 = t * t;
  float p = 1.f / 17.f;
  p = p * t2 + 1.f / 15.f;
  p = p * t2 + 1.f / 13.f;
  p = p * t2 + 1.f / 11.f;
  p = p * t2 + 1.f / 9.f;
  p = p * t2 + 1.f / 7.f;
  p = p * t2 + 1.f / 5.f;
  p = p * t2 + 1.f / 3.f;
  p = p * t2 + 1.f;
  return 2.f * t * p;
}

// softplus(x) = log(1 + e^x) and sigmoid(x) from exp_fast, vectorisable (0 at x = -inf).
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float softplus_fast(float x) {
  return std::max(x, 0.f) + log1p_unit(exp_fast(-std::fabs(x)));
}
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float sigmoid_fast(float x) { return 1.f / (1.f + exp_fast(std::min(-x, 88.f))); }

// max(x[0 .. n)) (-inf for n = 0; NaNs skipped, as by std::max), vectorised: a running maximum
// per lane, each step x > m ? x : m (one vmaxps). (A reduction(max) over std::max stays a
// scalar chain of maxss without -ffinite-math-only: 60% of the forward tile epilogue at D = 128.)
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float max_of(const float* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = kNegInf;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = x[c + l] > lane[l] ? x[c + l] : lane[l];
  }
  float m = kNegInf;
  for (; c < n; ++c) m = x[c] > m ? x[c] : m;
  for (int64_t l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}

// Row i's targets among the columns c0 .. c0 + nc as a float mask (1: a target), for the vector
// loops: 64-bit label or index compares beside 32-bit floats keep a loop scalar.
inline void row_target_mask(const TargetMeta& t, int64_t i, int64_t c0, int64_t nc, float* hit) {
  if (t.label_mode()) {
    const int64_t li = t.row_labels[i];
    const int64_t* cl = t.col_labels + c0;
    for (int64_t c = 0; c < nc; ++c) hit[c] = cl[c] == li ? 1.f : 0.f;
  } else {
    const int64_t jt = t.pos_of_row(i) - c0;
    for (int64_t c = 0; c < nc; ++c) hit[c] = c == jt ? 1.f : 0.f;
  }
}

// The tile loops are compiled twice, for AVX2/FMA (x86-64-v3) and for the baseline ISA, and the
// right one is picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTCL_TILE_FN __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTCL_TILE_FN
#endif

// Block range [b0, b1) of group g when nblocks blocks are split into ngroups contiguous groups.
inline void group_range(int64_t g, int64_t ngroups, int64_t nblocks, int64_t& b0, int64_t& b1) {
  b0 = g * nblocks / ngroups;
  b1 = (g + 1) * nblocks / ngroups;
}

inline int64_t num_groups(int64_t nblocks) {
  return std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
}

// fn(start, size) for each block of group g (of ngroups, group_range) when `count` lines are cut
// into blocks of `size`.
template <typename Fn>
inline void for_blocks_of_group(int64_t g, int64_t ngroups, int64_t count, int64_t size, Fn&& fn) {
  int64_t b0, b1;
  group_range(g, ngroups, (count + size - 1) / size, b0, b1);
  for (int64_t b = b0; b < b1; ++b) fn(b * size, std::min(size, count - b * size));
}

// Uninitialised float scratch of n entries. A tile's buffers are sized by the tile the problem
// really has (min(N, kRows) x min(M, kCols)): full-size ones would be allocated (and, as
// vectors, zeroed) on every call, which at small N costs more than the sweep.
inline std::unique_ptr<float[]> scratch_floats(int64_t n) {
  return std::unique_ptr<float[]>(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// A zeroed float32 (n, D) accumulator over scratch `buf`; undefined when not `wanted`.
inline at::Tensor zeroed_acc(bool wanted, float* buf, int64_t n, int64_t D) {
  if (!wanted) return at::Tensor();
  at::Tensor acc = at::from_blob(buf, {n, D}, at::TensorOptions().dtype(at::kFloat));
  acc.zero_();
  return acc;
}

// A float32 (1,) tensor of `value`, or (0,) when not `wanted` (a gradient not asked for).
inline at::Tensor scalar_or_empty(bool wanted, double value, const at::TensorOptions& f32) {
  return wanted ? at::full({1}, static_cast<float>(value), f32) : at::empty({0}, f32);
}

// Float32 copy of double sums (the line sums).
inline at::Tensor float_sums(const std::vector<double>& acc, const at::TensorOptions& f32) {
  at::Tensor out = at::empty({static_cast<int64_t>(acc.size())}, f32);
  float* o = out.data_ptr<float>();
  for (size_t e = 0; e < acc.size(); ++e) o[e] = static_cast<float>(acc[e]);
  return out;
}

at::Tensor as_f32(const at::Tensor& x) { return x.detach().to(at::kFloat).contiguous(); }

float scalar_of(const OptT& x, float dflt) {
  return (x.has_value() && x->defined()) ? x->item<float>() : dflt;
}

struct Problem {
  at::Tensor q, k;  // float32, contiguous
  int64_t N, M, D;
  float s, b;
  int64_t kind;
  bool symmetric;
  TargetMeta t;
  at::Tensor keep[4];  // owners of the index pointers in t
};

Problem make_problem(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& scale,
                     const OptT& bias, const OptT& positives, const OptT& col_positives,
                     const OptT& row_labels, const OptT& col_labels, int64_t kind, bool symmetric,
                     bool exclude_self, int64_t offset) {
  check_engine_inputs(queries, keys, scale, bias, positives, col_positives, row_labels, col_labels,
                      kind, symmetric);
  Problem p;
  p.q = as_f32(queries);
  p.k = as_f32(keys);
  p.N = queries.size(0);
  p.M = keys.size(0);
  p.D = queries.size(1);
  p.s = scale.item<float>();
  p.b = scalar_of(bias, 0.f);
  p.kind = kind;
  p.symmetric = symmetric;
  p.keep[0] = index_or_empty(positives);
  p.keep[1] = index_or_empty(col_positives);
  p.keep[2] = index_or_empty(row_labels);
  p.keep[3] = index_or_empty(col_labels);
  p.t = TargetMeta{ptr_or_null(p.keep[0]), ptr_or_null(p.keep[1]), ptr_or_null(p.keep[2]),
                   ptr_or_null(p.keep[3]), offset, exclude_self};
  return p;
}

// C (nr x nc, row-major) = Q[r0:r0+nr] K[c0:c0+nc]^T
inline void tile_dot(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, float* C) {
  at::Tensor out = at::from_blob(C, {nr, nc}, at::TensorOptions().dtype(at::kFloat));
  at::mm_out(out, p.q.narrow(0, r0, nr), p.k.narrow(0, c0, nc).t());
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// Sums of exponentials in double: a row whose target dominates has l = 1 + (small terms), and
// each float32 addition beside that 1 would round by up to 6e-8, next to a loss log(l) ~ 1e-3.
struct RowState {
  float m[kRows], pos[kRows], npos[kRows];
  double l[kRows];

  void reset(int64_t kind) {
    for (int64_t r = 0; r < kRows; ++r) {
      m[r] = kind == kSigmoid ? 0.f : kNegInf;  // (the sigmoid closure's running row loss)
      l[r] = 0.0;
      pos[r] = npos[r] = 0.f;
    }
  }

  // The statistics of rows r0 .. r0 + nr once their last tile is in (row_lse: the sigmoid
  // closure's row loss).
  void store(int64_t kind, int64_t r0, int64_t nr, float* lse, float* lo, float* pos_out,
             float* npos_out) const {
    for (int64_t r = 0; r < nr; ++r) {
      if (kind == kSigmoid)
        lse[r0 + r] = m[r];
      else
        lse_parts(m[r], l[r], lse[r0 + r], lo[r0 + r]);
      pos_out[r0 + r] = pos[r];
      npos_out[r0 + r] = npos[r];
    }
  }
};

// Turns raw C into masked logits S in place (-inf on invalid entries) and updates row statistics.
FASTCL_TILE_FN void forward_tile_rows(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, float* C,
                       RowState& st) {
  const TargetMeta& t = p.t;
  const float s = p.s, b = p.b;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    float* S = C + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) S[c] = s * S[c] + b;
    if (t.exclude_self) {
      const int64_t j = i + t.offset;
      if (j >= c0 && j < c0 + nc) S[j - c0] = kNegInf;
    }
    if (p.kind == kSigmoid) {  // sum of softplus(-z S): z = +1 on targets, -1 elsewhere
      float hit[kCols];
      row_target_mask(t, i, c0, nc, hit);
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < nc; ++c) {
        const float v = softplus_fast(hit[c] != 0.f ? -S[c] : S[c]);
        acc += S[c] == kNegInf ? 0.f : v;  // (-inf: the entry left out)
      }
      st.m[r] += acc;  // the sigmoid closure keeps its running row loss in m
      continue;
    }
    if (t.label_mode()) {  // (the targets as a float mask: vector loops; the self left out)
      float hit[kCols];
      row_target_mask(t, i, c0, nc, hit);
      if (t.exclude_self) {
        const int64_t j = i + t.offset;
        if (j >= c0 && j < c0 + nc) hit[j - c0] = 0.f;
      }
      float pos = 0.f, cnt = 0.f;
#pragma omp simd reduction(+ : pos, cnt)
      for (int64_t c = 0; c < nc; ++c) {
        pos += hit[c] != 0.f ? S[c] : 0.f;
        cnt += hit[c];
      }
      st.pos[r] += pos;
      st.npos[r] += cnt;
    } else {
      const int64_t j = t.pos_of_row(i);
      if (j >= c0 && j < c0 + nc && t.valid(i, j)) {
        st.pos[r] += S[j - c0];
        st.npos[r] += 1.f;
      }
    }
    const float mnew = std::max(st.m[r], max_of(S, nc));
    if (mnew == kNegInf) continue;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < nc; ++c) sum += exp_fast(S[c] - mnew);
    st.l[r] = st.l[r] * std::exp(static_cast<double>(st.m[r]) - mnew) + sum;
    st.m[r] = mnew;
  }
}

// Column partials of one thread group from masked logits S (nr x nc).
FASTCL_TILE_FN void forward_tile_cols(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                       const float* S, float* cmax, double* csum, float* col_pos, double* scratch) {
  float tmax[kCols];
  double* tsum = scratch;
  for (int64_t c = 0; c < nc; ++c) tmax[c] = cmax[c0 + c];
  for (int64_t r = 0; r < nr; ++r) {
    const float* Sr = S + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) tmax[c] = std::max(tmax[c], Sr[c]);
  }
  for (int64_t c = 0; c < nc; ++c) {
    const float old = cmax[c0 + c];
    const float mnew = tmax[c];
    tsum[c] = mnew == kNegInf ? 0.0 : csum[c0 + c] * std::exp(static_cast<double>(old) - mnew);
    tmax[c] = mnew == kNegInf ? 0.f : mnew;  // shift used below; -inf rows give exp(-inf) = 0
    cmax[c0 + c] = mnew;
  }
  for (int64_t r = 0; r < nr; ++r) {
    const float* Sr = S + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) tsum[c] += exp_fast(Sr[c] - tmax[c]);
  }
  for (int64_t c = 0; c < nc; ++c) {
    csum[c0 + c] = tsum[c];
    const int64_t j = c0 + c;
    const int64_t i = p.t.pos_of_col(j);
    if (i >= r0 && i < r0 + nr && p.t.valid(i, j)) col_pos[j] = S[(i - r0) * nc + c];
  }
}

ForwardOut engine_forward_cpu(const at::Tensor& queries, const at::Tensor& keys,
                              const at::Tensor& scale, const OptT& bias, const OptT& positives,
                              const OptT& col_positives, const OptT& row_labels,
                              const OptT& col_labels, int64_t kind, bool symmetric,
                              bool exclude_self, int64_t offset, bool exact) {
  (void)exact;  // CPU products are always IEEE fp32
  const Problem p = make_problem(queries, keys, scale, bias, positives, col_positives, row_labels,
                                 col_labels, kind, symmetric, exclude_self, offset);
  const auto f32 = queries.options().dtype(at::kFloat);
  const int64_t N = p.N, M = p.M;
  at::Tensor row_lse = at::empty({N}, f32);
  at::Tensor row_pos = at::zeros({N}, f32);
  at::Tensor row_npos = at::zeros({N}, f32);
  at::Tensor col_lse = at::empty({symmetric ? M : 0}, f32);
  at::Tensor col_pos = at::zeros({symmetric ? M : 0}, f32);
  at::Tensor row_lo = at::zeros({N}, f32);
  at::Tensor col_lo = at::zeros({symmetric ? M : 0}, f32);
  if (N == 0) {
    col_lse.fill_(-std::numeric_limits<float>::infinity());
    return {row_lse, row_pos, row_npos, col_lse, col_pos, row_lo, col_lo};
  }
  const int64_t nrb = (N + kRows - 1) / kRows;
  const int64_t G = num_groups(nrb);
  at::Tensor cmax = symmetric ? at::full({G, M}, kNegInf, f32) : at::Tensor();
  at::Tensor csum = symmetric ? at::zeros({G, M}, queries.options().dtype(at::kDouble)) : at::Tensor();
  float* lse_p = row_lse.data_ptr<float>();
  float* pos_p = row_pos.data_ptr<float>();
  float* npos_p = row_npos.data_ptr<float>();
  float* lo_p = row_lo.data_ptr<float>();
  float* colpos_p = symmetric ? col_pos.data_ptr<float>() : nullptr;

  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    const auto C = scratch_floats(std::min(N, kRows) * std::min(M, kCols));
    std::vector<double> scratch(kCols);
    RowState st;
    for (int64_t g = g0; g < g1; ++g) {
      float* gmax = symmetric ? cmax.data_ptr<float>() + g * M : nullptr;
      double* gsum = symmetric ? csum.data_ptr<double>() + g * M : nullptr;
      for_blocks_of_group(g, G, N, kRows, [&](int64_t r0, int64_t nr) {
        st.reset(kind);
        for (int64_t c0 = 0; c0 < M; c0 += kCols) {
          const int64_t nc = std::min(kCols, M - c0);
          tile_dot(p, r0, nr, c0, nc, C.get());
          forward_tile_rows(p, r0, nr, c0, nc, C.get(), st);
          if (symmetric)
            forward_tile_cols(p, r0, nr, c0, nc, C.get(), gmax, gsum, colpos_p, scratch.data());
        }
        st.store(kind, r0, nr, lse_p, lo_p, pos_p, npos_p);
      });
    }
  });

  if (symmetric) {  // merge the G column partials (fixed order: deterministic)
    const float* pm = cmax.data_ptr<float>();
    const double* ps = csum.data_ptr<double>();
    float* out = col_lse.data_ptr<float>();
    float* out_lo = col_lo.data_ptr<float>();
    at::parallel_for(0, M, 2048, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        float m = kNegInf;
        for (int64_t g = 0; g < G; ++g) m = std::max(m, pm[g * M + j]);
        if (m == kNegInf) {
          out[j] = kNegInf;
          continue;
        }
        double l = 0.0;
        for (int64_t g = 0; g < G; ++g) l += ps[g * M + j] * std::exp(static_cast<double>(pm[g * M + j]) - m);
        lse_parts(m, l, out[j], out_lo[j]);
      }
    });
  }
  return {row_lse, row_pos, row_npos, col_lse, col_pos, row_lo, col_lo};
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// dS of tile (rows r0.., cols c0..) from raw C into Gt; accumulates sum dS*C and sum dS.
FASTCL_TILE_FN void grad_tile(const Problem& p, const GradMeta& gm, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
               const float* C, float* Gt, float* Gc, double& acc_s, double& acc_b,
               double* row_sum = nullptr, double* col_sum = nullptr) {
  // Gt: dS of the tile (the row part first); Gc: scratch for the column part. Scale sums:
  // softmax: sum R (c - m_i) + C (c - n_j) over the two parts (GradMeta's centres); sigmoid: dS c.
  // (float sums over one row of the tile, double across rows.) Line sums (softmax, when given):
  // row_sum[r] += the tile row's sum of the row part, col_sum[c] += the tile column's sum of the
  // column part, each as formed, before the two parts are added.
  const TargetMeta& t = p.t;
  const float s = p.s, b = p.b;
  if (p.kind == kSigmoid) {  // dS = -g_i z sigmoid(-z S) (grad_logit_parts); 0 where left out
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = r0 + r;
      const float* Cr = C + r * nc;
      float* Gr = Gt + r * nc;
      const float g = gm.grad_row[i];
      // the entry left out as a 32-bit in-tile column (-1: not in the tile)
      const int64_t jx = i + t.offset - c0;
      const int32_t out = t.exclude_self && jx >= 0 && jx < nc ? static_cast<int32_t>(jx) : -1;
      const int32_t n = static_cast<int32_t>(nc);
      float hit[kCols];
      row_target_mask(t, i, c0, nc, hit);
      float ts = 0.f, tb = 0.f;
#pragma omp simd reduction(+ : ts, tb)
      for (int32_t c = 0; c < n; ++c) {
        const bool h = hit[c] != 0.f;
        const float S = s * Cr[c] + b;
        const float v = g * sigmoid_fast(h ? -S : S);
        const float d = c == out ? 0.f : (h ? -v : v);
        Gr[c] = d;
        ts += d * Cr[c];
        tb += d;
      }
      acc_s += ts;
      acc_b += tb;
    }
    return;
  }
  const float* gc = gm.grad_col ? gm.grad_col + c0 : nullptr;
  const float* clse = gm.grad_col ? gm.col_lse + c0 : nullptr;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    const float* Cr = C + r * nc;
    float* Gr = Gt + r * nc;
    const float npos = gm.row_npos[i];
    const float g = npos > 0.f ? gm.grad_row[i] : 0.f;
    const float lse = gm.row_lse[i];
    // (exponents S - lse with S formed as the forward formed it, s c + b: an entry that dominates
    // its line, whose logit the stored LSE rounds to, gets P = 1 exactly)
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) Gr[c] = g * exp_fast((s * Cr[c] + b) - lse);
    if (gc) {
      float* Gcr = Gc + r * nc;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) Gcr[c] = gc[c] * exp_fast((s * Cr[c] + b) - clse[c]);
    }
    if (npos > 0.f) {
      const float gt = g / npos;
      if (t.label_mode()) {
        const int64_t li = t.row_labels[i];
        const int64_t* cl = t.col_labels + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c)  // (the excluded self's entry is zeroed below)
          Gr[c] -= cl[c] == li ? gt : 0.f;
      } else {
        const int64_t j = t.pos_of_row(i);
        if (j >= c0 && j < c0 + nc && t.valid(i, j)) Gr[j - c0] -= gt;
      }
    }
  }
  if (gc) {
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t j = c0 + c;
      const int64_t i = t.pos_of_col(j);
      if (i >= r0 && i < r0 + nr && t.valid(i, j)) Gc[(i - r0) * nc + c] -= gc[c];
    }
  }
  if (t.exclude_self) {
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t j = r0 + r + t.offset;
      if (j >= c0 && j < c0 + nc) {
        Gt[r * nc + (j - c0)] = 0.f;
        if (gc) Gc[r * nc + (j - c0)] = 0.f;
      }
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const float m = gm.row_centre[r0 + r];
    const float* Cr = C + r * nc;
    const float* Gr = Gt + r * nc;
    float ts = 0.f, tb = 0.f;
#pragma omp simd reduction(+ : ts, tb)
    for (int64_t c = 0; c < nc; ++c) {
      ts += Gr[c] * (Cr[c] - m);
      tb += Gr[c];
    }
    acc_s += ts;
    acc_b += tb;
    if (row_sum) row_sum[r] += tb;
  }
  if (gc && col_sum) {
    for (int64_t r = 0; r < nr; ++r) {
      const float* Gcr = Gc + r * nc;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) col_sum[c] += Gcr[c];
    }
  }
  if (gc) {
    const float* n = gm.col_centre + c0;
    for (int64_t r = 0; r < nr; ++r) {
      const float* Cr = C + r * nc;
      float* Gr = Gt + r * nc;
      const float* Gcr = Gc + r * nc;
      float ts = 0.f, tb = 0.f;
#pragma omp simd reduction(+ : ts, tb)
      for (int64_t c = 0; c < nc; ++c) {
        ts += Gcr[c] * (Cr[c] - n[c]);
        tb += Gcr[c];
        Gr[c] += Gcr[c];
      }
      acc_s += ts;
      acc_b += tb;
    }
  }
}

// scale_centres (ops.cpp) of a float32 LSE vector as one loop with the same float32 steps (its
// dozen tensor operators cost more than a small problem's sweep): line_centre of each entry, with
// centre_shift of the lines' entry count.
inline float centre_shift(float s, int64_t count) {
  const float log_n = static_cast<float>(std::log(static_cast<double>(std::max<int64_t>(count, 1))));
  return s < log_n ? log_n : 0.f;
}

inline float line_centre(float lse, float s, float b, bool has_bias, float shift) {
  float m = lse - shift;
  if (has_bias) m = m - b;
  return lse > kNegInf && s != 0.f ? m / (s != 0.f ? s : 1.f) : 0.f;
}

std::vector<float> line_centres(const at::Tensor& lse32, float s, float b, bool has_bias,
                                int64_t count) {
  const float shift = centre_shift(s, count);
  const float* l = lse32.data_ptr<float>();
  std::vector<float> out(lse32.numel());
  for (size_t e = 0; e < out.size(); ++e) out[e] = line_centre(l[e], s, b, has_bias, shift);
  return out;
}

// scale_sum_totals (ops.cpp) as one loop, summed in double: {sum_j n_j C_j, sum_j C_j} with
// C_j = gc_j ([column has entries] - [its positive counts]).
std::pair<double, double> col_sum_totals(const Problem& p, const float* col_centre,
                                         const float* col_lse, const float* grad_col) {
  double sc = 0.0, c = 0.0;
  for (int64_t j = 0; j < p.M; ++j) {
    const int64_t i = p.t.pos_of_col(j);
    const bool ok = i >= 0 && i < p.N && p.t.valid(i, j);
    const float C = grad_col[j] * ((col_lse[j] > kNegInf ? 1.f : 0.f) - (ok ? 1.f : 0.f));
    sc += static_cast<double>(col_centre[j] * C);
    c += C;
  }
  return {sc, c};
}

BackwardOut engine_backward_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                const at::Tensor& scale, const OptT& bias, const OptT& positives,
                                const OptT& col_positives, const OptT& row_labels,
                                const OptT& col_labels, int64_t kind, bool symmetric,
                                bool exclude_self, int64_t offset, bool exact,
                                const at::Tensor& row_lse, const at::Tensor& row_npos,
                                const OptT& col_lse, const at::Tensor& grad_row,
                                const OptT& grad_col, bool need_q, bool need_k, bool need_scale,
                                bool need_bias, bool line_sums) {
  (void)exact;
  TORCH_CHECK_VALUE(!line_sums || kind == kSoftmax, "line_sums is only for softmax closures (kind=0)");
  const Problem p = make_problem(queries, keys, scale, bias, positives, col_positives, row_labels,
                                 col_labels, kind, symmetric, exclude_self, offset);
  check_backward_inputs(queries, keys, symmetric, row_lse, row_npos, col_lse, grad_row, grad_col);
  const int64_t N = p.N, M = p.M, D = p.D;
  const auto f32 = queries.options().dtype(at::kFloat);
  const bool has_gc = grad_col.has_value() && grad_col->defined();
  at::Tensor lse32 = as_f32(row_lse), npos32 = as_f32(row_npos), g32 = as_f32(grad_row);
  at::Tensor clse32 = has_gc ? as_f32(*col_lse) : at::Tensor();
  at::Tensor gc32 = has_gc ? as_f32(*grad_col) : at::Tensor();
  const bool softmax = kind == kSoftmax;
  const int64_t N_ = queries.size(0), M_ = keys.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const std::vector<float> rc = softmax ? line_centres(lse32, p.s, p.b, has_bias, M_) : std::vector<float>();
  const std::vector<float> cc =
      softmax && has_gc ? line_centres(clse32, p.s, p.b, has_bias, N_) : std::vector<float>();
  const auto fp = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; };
  const auto vp = [](const std::vector<float>& x) { return x.empty() ? nullptr : x.data(); };
  const GradMeta gm{lse32.data_ptr<float>(), npos32.data_ptr<float>(), fp(clse32), g32.data_ptr<float>(),
                    fp(gc32), kind, vp(rc), vp(cc)};

  at::Tensor dq = need_q ? at::empty({N, D}, f32) : at::Tensor();
  at::Tensor dk = need_k ? at::empty({M, D}, f32) : at::Tensor();
  const bool need_sb = need_scale || need_bias;
  // Line sums: the row sweep owns its rows' sums (it runs for them alone if need be); the columns'
  // come from the column sweep, or from per-group partials when dK is fused into the row sweep.
  const bool col_lines = line_sums && has_gc;
  const bool row_sweep = need_q || (need_sb && !need_k) || line_sums;
  const int64_t nrb = (N + kRows - 1) / kRows, ncb = (M + kCols - 1) / kCols;
  const int64_t tile = std::min(N, kRows) * std::min(M, kCols);
  double sum_s = 0.0, sum_b = 0.0;
  std::vector<double> row_acc(line_sums ? N : 0, 0.0), col_acc(col_lines ? M : 0, 0.0);

  // With few threads, dQ and dK come from one sweep: each thread group adds its dS^T Q into a
  // private (M, D) partial of dK (summed in a fixed order afterwards). When those partials would
  // be large, dK gets its own column sweep instead (recomputing the tiles).
  const int64_t G_rows = num_groups(nrb);
  const bool fused = need_q && need_k && N > 0 && M > 0 &&
                     G_rows * M * D * static_cast<int64_t>(sizeof(float)) <= kFusedScratchBytes;
  at::Tensor dk_parts = fused ? at::zeros({G_rows, M, D}, f32) : at::Tensor();
  std::vector<double> col_parts(col_lines && fused ? G_rows * M : 0, 0.0);

  if (row_sweep && N > 0 && M > 0) {
    const int64_t G = G_rows;
    std::vector<double> ps(G, 0.0), pb(G, 0.0);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      const auto C = scratch_floats(tile), Gt = scratch_floats(tile), Gc = scratch_floats(tile),
                 acc = scratch_floats(need_q ? std::min(N, kRows) * D : 0);
      for (int64_t g = g0; g < g1; ++g) {
        for_blocks_of_group(g, G, N, kRows, [&](int64_t r0, int64_t nr) {
          at::Tensor dq_acc = zeroed_acc(need_q, acc.get(), nr, D);
          for (int64_t c0 = 0; c0 < M; c0 += kCols) {
            const int64_t nc = std::min(kCols, M - c0);
            tile_dot(p, r0, nr, c0, nc, C.get());
            grad_tile(p, gm, r0, nr, c0, nc, C.get(), Gt.get(), Gc.get(), ps[g], pb[g],
                      line_sums ? row_acc.data() + r0 : nullptr,
                      col_lines && fused ? col_parts.data() + g * M + c0 : nullptr);
            if (need_q)
              dq_acc.addmm_(at::from_blob(Gt.get(), {nr, nc}, f32), p.k.narrow(0, c0, nc));
            if (fused)
              dk_parts.select(0, g).narrow(0, c0, nc).addmm_(
                  at::from_blob(Gt.get(), {nr, nc}, f32).t(), p.q.narrow(0, r0, nr));
          }
          if (need_q) {
            at::Tensor rows = dq.narrow(0, r0, nr);
            at::mul_out(rows, dq_acc, p.s);
          }
        });
      }
    });
    for (int64_t g = 0; g < G; ++g) sum_s += ps[g], sum_b += pb[g];
  }
  if (fused) {
    at::sum_out(dk, dk_parts, {0});
    dk.mul_(p.s);
    for (int64_t g = 0; g < G_rows && col_lines; ++g)
      for (int64_t j = 0; j < M; ++j) col_acc[j] += col_parts[g * M + j];
  } else if ((need_k || col_lines) && N > 0 && M > 0) {  // (col_lines alone: sums, no dK)
    const int64_t G = num_groups(ncb);
    std::vector<double> ps(G, 0.0), pb(G, 0.0);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      const auto C = scratch_floats(tile), Gt = scratch_floats(tile), Gc = scratch_floats(tile),
                 acc = scratch_floats(need_k ? std::min(M, kCols) * D : 0);
      for (int64_t g = g0; g < g1; ++g) {
        for_blocks_of_group(g, G, M, kCols, [&](int64_t c0, int64_t nc) {
          at::Tensor dk_acc = zeroed_acc(need_k, acc.get(), nc, D);
          for (int64_t r0 = 0; r0 < N; r0 += kRows) {
            const int64_t nr = std::min(kRows, N - r0);
            tile_dot(p, r0, nr, c0, nc, C.get());
            grad_tile(p, gm, r0, nr, c0, nc, C.get(), Gt.get(), Gc.get(), ps[g], pb[g], nullptr,
                      col_lines ? col_acc.data() + c0 : nullptr);
            if (need_k)
              dk_acc.addmm_(at::from_blob(Gt.get(), {nr, nc}, f32).t(), p.q.narrow(0, r0, nr));
          }
          if (need_k) {
            at::Tensor cols = dk.narrow(0, c0, nc);
            at::mul_out(cols, dk_acc, p.s);
          }
        });
      }
    });
    if (!row_sweep)
      for (int64_t g = 0; g < G; ++g) sum_s += ps[g], sum_b += pb[g];
  }
  if (need_q && N > 0 && M == 0) dq.zero_();
  if (need_k && M > 0 && N == 0) dk.zero_();

  const auto empty_like_dtype = [&](const at::Tensor& x) { return at::empty({0}, x.options()); };
  at::Tensor out_q = need_q ? dq.to(queries.scalar_type()) : empty_like_dtype(queries);
  at::Tensor out_k = need_k ? dk.to(keys.scalar_type()) : empty_like_dtype(keys);
  if (softmax && need_sb) {  // the centred sums' known totals (exact: the row part's are 0)
    const auto tot = has_gc ? col_sum_totals(p, cc.data(), clse32.data_ptr<float>(), gc32.data_ptr<float>())
                            : std::pair<double, double>(0.0, 0.0);
    sum_s += tot.first;
    sum_b = tot.second;
  }
  return {out_q, out_k, scalar_or_empty(need_scale, sum_s, f32), scalar_or_empty(need_bias, sum_b, f32),
          float_sums(row_acc, f32), float_sums(col_acc, f32)};
}

// ---------------------------------------------------------------------------------------------
// one-sweep step: forward statistics and the gradients of sum_i L_i (row-only closures)
// ---------------------------------------------------------------------------------------------

// The loss L = sum_i L_i of a row-only closure and its gradients in one sweep, for a total whose
// gradient is one number (sum / mean reductions): every row's weight is 1, and the caller scales
// the gradients by the total's gradient in its backward.
//   softmax: L_i = lse_i - (1 / npos_i) sum_{j in T(i)} S_ij  (0 for rows without targets)
//            dS_ij = [npos_i > 0] (P_ij - [j in T(i)] / npos_i),  P_ij = exp(S_ij - lse_i)
//   sigmoid: L_i = sum_j softplus(-z_ij S_ij),  dS_ij = -z_ij sigmoid(-z_ij S_ij)
//   dQ = s dS K,  dK = s dS^T Q,  d_scale = sum dS C (centred),  d_bias = sum dS
// Per row block of kRows rows (threads over contiguous groups of blocks):
//   1. C = Q_blk K^T tile by tile into the block's panel (kRows x M float32; softmax only, the
//      sigmoid closure needs no LSE and takes each tile's gradient at once).
//   2. Each tile's copy gets the forward's masking and online row statistics; after the last
//      tile the rows' LSE, target sums and counts are final (the forward's numbers, bit for bit).
//   3. The panel's tiles give dS (grad_tile, as the backward forms it from the saved LSE);
//      dQ_blk += dS K_tile and the group's dK partial += dS^T Q_blk.
// So each tile's products are formed once (the two-pass forward + backward forms them twice:
// 4 GEMMs against 3). Falls back to engine_forward_cpu + engine_backward_cpu where the panels or
// the dK partials would exceed their scratch budgets.
constexpr int64_t kPanelBytes = int64_t{64} << 20;  // all threads' panels

StepOut engine_step_cpu(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& scale,
                        const OptT& bias, const OptT& positives, const OptT& row_labels,
                        const OptT& col_labels, int64_t kind, bool exclude_self, int64_t offset,
                        bool need_q, bool need_k, bool need_scale, bool need_bias, bool line_sums) {
  TORCH_CHECK_VALUE(!line_sums || kind == kSoftmax, "line_sums is only for softmax closures (kind=0)");
  const Problem p = make_problem(queries, keys, scale, bias, positives, OptT(), row_labels,
                                 col_labels, kind, false, exclude_self, offset);
  const int64_t N = p.N, M = p.M, D = p.D;
  const auto f32 = queries.options().dtype(at::kFloat);
  const bool softmax = kind == kSoftmax;
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t nrb = (N + kRows - 1) / kRows;
  const int64_t G = num_groups(nrb);
  const int64_t panel = softmax ? std::min(N, kRows) * M : std::min(N, kRows) * std::min(M, kCols);
  const auto bytes = [](int64_t n) { return n * static_cast<int64_t>(sizeof(float)); };
  const bool fits = N > 0 && M > 0 && bytes(G * panel) <= kPanelBytes &&
                    (!need_k || bytes(G * M * D) <= kFusedScratchBytes);
  if (!fits) {  // the two sweeps, float32 gradients
    auto [lse, pos, npos, cl, cp, lo, clo] = engine_forward_cpu(
        queries, keys, scale, bias, positives, OptT(), row_labels, col_labels, kind, false,
        exclude_self, offset, false);
    auto [dq, dk, ds, db, rs, cs] = engine_backward_cpu(
        queries.to(at::kFloat), keys.to(at::kFloat), scale, bias, positives, OptT(), row_labels,
        col_labels, kind, false, exclude_self, offset, false, lse, npos, OptT(),
        at::ones({N}, f32), OptT(), need_q, need_k, need_scale, need_bias, line_sums);
    return {lse, pos, npos, lo, dq, dk, ds, db, rs};
  }
  at::Tensor row_lse = at::empty({N}, f32), row_pos = at::zeros({N}, f32);
  at::Tensor row_npos = at::zeros({N}, f32), row_lo = at::zeros({N}, f32);
  float* lse_p = row_lse.data_ptr<float>();
  float* pos_p = row_pos.data_ptr<float>();
  float* npos_p = row_npos.data_ptr<float>();
  float* lo_p = row_lo.data_ptr<float>();
  const std::vector<float> ones(N, 1.f);
  std::vector<float> rc(softmax ? N : 0, 0.f);  // the rows' scale centres, set per block
  const float shift = centre_shift(p.s, M);
  const GradMeta gm{lse_p, npos_p, nullptr, ones.data(), nullptr, kind,
                    softmax ? rc.data() : nullptr, nullptr};
  at::Tensor dq = need_q ? at::empty({N, D}, f32) : at::empty({0}, f32);
  at::Tensor dk_parts = need_k ? at::zeros({G, M, D}, f32) : at::Tensor();
  std::vector<double> row_acc(line_sums ? N : 0, 0.0), ps(G, 0.0), pb(G, 0.0);
  const int64_t tile = std::min(N, kRows) * std::min(M, kCols);

  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    const auto P = scratch_floats(panel), C = scratch_floats(tile), Gt = scratch_floats(tile),
               acc = scratch_floats(need_q ? std::min(N, kRows) * D : 0);
    RowState st;
    for (int64_t g = g0; g < g1; ++g) {
      for_blocks_of_group(g, G, N, kRows, [&](int64_t r0, int64_t nr) {
        at::Tensor dq_acc = zeroed_acc(need_q, acc.get(), nr, D);
        // dS of the tile at c0 (raw products in Ct) into Gt, then its products into dQ, dK
        const auto grad_products = [&](int64_t c0, int64_t nc, const float* Ct) {
          grad_tile(p, gm, r0, nr, c0, nc, Ct, Gt.get(), nullptr, ps[g], pb[g],
                    line_sums ? row_acc.data() + r0 : nullptr, nullptr);
          const at::Tensor dS = at::from_blob(Gt.get(), {nr, nc}, f32);
          if (need_q) dq_acc.addmm_(dS, p.k.narrow(0, c0, nc));
          if (need_k) dk_parts.select(0, g).narrow(0, c0, nc).addmm_(dS.t(), p.q.narrow(0, r0, nr));
        };
        st.reset(kind);  // steps 1-2
        for (int64_t c0 = 0; c0 < M; c0 += kCols) {
          const int64_t nc = std::min(kCols, M - c0);
          float* raw = softmax ? P.get() + nr * c0 : P.get();
          tile_dot(p, r0, nr, c0, nc, raw);
          std::copy(raw, raw + nr * nc, C.get());
          forward_tile_rows(p, r0, nr, c0, nc, C.get(), st);
          if (!softmax) grad_products(c0, nc, raw);
        }
        st.store(kind, r0, nr, lse_p, lo_p, pos_p, npos_p);
        if (softmax) {  // step 3
          for (int64_t i = r0; i < r0 + nr; ++i) rc[i] = line_centre(lse_p[i], p.s, p.b, has_bias, shift);
          for (int64_t c0 = 0; c0 < M; c0 += kCols)
            grad_products(c0, std::min(kCols, M - c0), P.get() + nr * c0);
        }
        if (need_q) {
          at::Tensor rows = dq.narrow(0, r0, nr);
          at::mul_out(rows, dq_acc, p.s);
        }
      });
    }
  });

  double sum_s = 0.0, sum_b = 0.0;
  for (int64_t g = 0; g < G; ++g) sum_s += ps[g], sum_b += pb[g];
  if (softmax) sum_b = 0.0;  // (a row's dS sums to 0 exactly: the bias has no gradient)
  at::Tensor dk = at::empty({0}, f32);
  if (need_k) {
    dk = at::sum(dk_parts, {0});
    dk.mul_(p.s);
  }
  return {row_lse, row_pos, row_npos, row_lo, dq, dk, scalar_or_empty(need_scale, sum_s, f32),
          scalar_or_empty(need_bias, sum_b, f32), float_sums(row_acc, f32)};
}

// Line-total correction of a tied softmax closure with index or label targets, in place on the
// float32 gradients (fastcl.ops.correct_line_totals, whose steps this follows; the Python form
// stays the reference and serves the CUDA kernels).
//  1. Each line's exact total of dS: row i's part sums to a_i [row has entries] - a_i [npos_i > 0]
//     with a_i = g_i where npos_i > 0 (else 0); column j's to gc_j ([column has entries] -
//     [its positive counts]).
//  2. err = measured sum - exact total, per row and per column; w_i = err_i / npos_i.
//  3. Index targets: dQ_i -= s w_i K_t(i) and dK_t(i) -= s w_i Q_i for row i's target t(i).
//     Label targets, T(i) the keys of row i's class but the excluded self: dQ_i -= s w_i
//     (sum_{j in T(i)} K_j), and dK_j -= sum_{i: j in T(i)} s w_i Q_i, from per-class sums.
//  4. Columns: dQ_pc(j) -= s errc_j K_j and dK_j -= s errc_j Q_pc(j), pc(j) column j's positive.
void correct_line_totals_cpu(const at::Tensor& d_queries, const at::Tensor& d_keys,
                             const at::Tensor& queries, const at::Tensor& keys,
                             const at::Tensor& scale, const OptT& positives,
                             const OptT& col_positives, const OptT& row_labels,
                             const OptT& col_labels, int64_t offset, bool exclude_self,
                             const at::Tensor& row_lse, const at::Tensor& row_npos,
                             const OptT& col_lse, const at::Tensor& grad_row, const OptT& grad_col,
                             const at::Tensor& row_sums, const OptT& col_sums) {
  check_line_correction_inputs(d_queries, d_keys, queries, keys, positives, col_positives,
                               row_labels, col_labels, row_lse, row_npos, col_lse, grad_row,
                               grad_col, row_sums, col_sums);
  TORCH_CHECK_VALUE(scale.numel() == 1, "scale must have one element, got shape ", scale.sizes());
  const int64_t N = queries.size(0), M = keys.size(0), D = queries.size(1);
  const bool need_q = d_queries.numel() > 0, need_k = d_keys.numel() > 0;
  if (!(need_q || need_k) || N == 0 || M == 0) return;
  const at::Tensor q = as_f32(queries), k = as_f32(keys);
  const at::Tensor pos = index_or_empty(positives), cpos = index_or_empty(col_positives);
  const at::Tensor rl = index_or_empty(row_labels), cl = index_or_empty(col_labels);
  const at::Tensor lse = as_f32(row_lse), npos = as_f32(row_npos), g = as_f32(grad_row);
  const at::Tensor rs = as_f32(row_sums);
  const float s = scale.detach().to(at::kFloat).reshape({}).item<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* dq = need_q ? d_queries.data_ptr<float>() : nullptr;
  float* dk = need_k ? d_keys.data_ptr<float>() : nullptr;
  const TargetMeta t{ptr_or_null(pos), ptr_or_null(cpos), ptr_or_null(rl), ptr_or_null(cl), offset,
                     exclude_self};
  const auto sub_row = [D](float* x, const float* y, float c) {  // x -= c y
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) x[d] -= c * y[d];
  };
  const float* lp = lse.data_ptr<float>();
  const float* np = npos.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* rp = rs.data_ptr<float>();
  std::vector<float> w(N, 0.f);  // steps 1-2: s w_i, 0 for rows without targets
  for (int64_t i = 0; i < N; ++i) {
    if (!(np[i] > 0.f)) continue;
    const float a = gp[i];
    const float total = (lp[i] > kNegInf ? a : 0.f) - a;
    const float err = rp[i] - total;  // (divided as the Python form divides)
    w[i] = s * (t.label_mode() ? err / np[i] : err * (1.f / np[i]));
  }
  if (t.label_mode()) {  // step 3, label targets
    std::unordered_map<int64_t, int64_t> ids;  // dense class ids of the labels
    std::vector<int64_t> row_cls(N), col_cls(M);
    for (int64_t j = 0; j < M; ++j) col_cls[j] = ids.emplace(t.col_labels[j], ids.size()).first->second;
    for (int64_t i = 0; i < N; ++i) row_cls[i] = ids.emplace(t.row_labels[i], ids.size()).first->second;
    const int64_t n_cls = static_cast<int64_t>(ids.size());
    // the excluded self of row i, when it is in the row's class: column i + offset
    const auto self_of = [&](int64_t i) -> int64_t {
      const int64_t j = i + offset;
      return exclude_self && j >= 0 && j < M && col_cls[j] == row_cls[i] ? j : -1;
    };
    std::vector<float> sums(n_cls * D, 0.f), centre(D);
    if (dq) {
      for (int64_t j = 0; j < M; ++j) sub_row(sums.data() + col_cls[j] * D, kp + j * D, -1.f);
      for (int64_t i = 0; i < N; ++i) {
        if (w[i] == 0.f) continue;
        const float* cs = sums.data() + row_cls[i] * D;
        const int64_t j = self_of(i);
        for (int64_t d = 0; d < D; ++d) centre[d] = j >= 0 ? cs[d] - kp[j * D + d] : cs[d];
        sub_row(dq + i * D, centre.data(), w[i]);
      }
    }
    if (dk) {
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t i = 0; i < N; ++i)
        if (w[i] != 0.f) sub_row(sums.data() + row_cls[i] * D, qp + i * D, -w[i]);
      for (int64_t j = 0; j < M; ++j) sub_row(dk + j * D, sums.data() + col_cls[j] * D, 1.f);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t j = self_of(i);
        if (j >= 0 && w[i] != 0.f) sub_row(dk + j * D, qp + i * D, -w[i]);
      }
    }
  } else {  // step 3, index targets
    for (int64_t i = 0; i < N; ++i) {
      const int64_t j = t.pos_of_row(i);
      if (w[i] == 0.f || j < 0 || j >= M || !t.valid(i, j)) continue;
      if (dq) sub_row(dq + i * D, kp + j * D, w[i]);
      if (dk) sub_row(dk + j * D, qp + i * D, w[i]);
    }
  }
  if (!(grad_col.has_value() && grad_col->defined())) return;
  const at::Tensor clse = as_f32(*col_lse), gc = as_f32(*grad_col), csum = as_f32(*col_sums);
  const float* clp = clse.data_ptr<float>();
  const float* gcp = gc.data_ptr<float>();
  const float* csp = csum.data_ptr<float>();
  for (int64_t j = 0; j < M; ++j) {  // step 4
    const int64_t i = t.pos_of_col(j);
    if (i < 0 || i >= N || !t.valid(i, j)) continue;
    const float total = (clp[j] > kNegInf ? gcp[j] : 0.f) - gcp[j];
    const float c = s * (csp[j] - total);
    if (dq) sub_row(dq + i * D, kp + j * D, c);
    if (dk) sub_row(dk + j * D, qp + i * D, c);
  }
}

}  // namespace
}  // namespace fastcl

TORCH_LIBRARY_IMPL(fastcl, CPU, m) {
  m.impl("engine_forward", &fastcl::engine_forward_cpu);
  m.impl("engine_backward", &fastcl::engine_backward_cpu);
  m.impl("correct_line_totals_", &fastcl::correct_line_totals_cpu);
  m.impl("engine_step", &fastcl::engine_step_cpu);
}
