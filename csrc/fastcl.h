// Shared declarations of the fastcl engine ops: target/validity rules, the per-logit gradient,
// input validation and the device kernels' entry points.
//
// Engine (see fastcl/ops/__init__.py): S_ij = s * <q_i, k_j> + b over queries (N, D) and keys (M, D).
// Forward keeps O(N + M) statistics; backward recomputes S tile by tile from them.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#if defined(__CUDACC__)
#define FASTCL_HD __host__ __device__ __forceinline__
#else
#define FASTCL_HD inline
#endif

namespace fastcl {

enum Kind : int64_t { kSoftmax = 0, kSigmoid = 1 };

// Validity and targets of entry (i, j), from O(N + M) metadata (all pointers int64 or null).
struct TargetMeta {
  const int64_t* positives;      // (N,) or null: p(i) = i + offset
  const int64_t* col_positives;  // (M,) or null: pc(j) = j - offset
  const int64_t* row_labels;     // (N,) or null: index mode
  const int64_t* col_labels;     // (M,) when row_labels is set
  int64_t offset;
  bool exclude_self;

  FASTCL_HD bool valid(int64_t i, int64_t j) const { return !(exclude_self && j == i + offset); }
  FASTCL_HD bool label_mode() const { return row_labels != nullptr; }
  FASTCL_HD int64_t pos_of_row(int64_t i) const { return positives ? positives[i] : i + offset; }
  FASTCL_HD int64_t pos_of_col(int64_t j) const { return col_positives ? col_positives[j] : j - offset; }
  FASTCL_HD bool target(int64_t i, int64_t j) const {
    return row_labels ? row_labels[i] == col_labels[j] : j == pos_of_row(i);
  }
  FASTCL_HD bool col_target(int64_t i, int64_t j) const { return i == pos_of_col(j); }
};

// Saved statistics and upstream gradients read by the backward sweep (float32 pointers).
struct GradMeta {
  const float* row_lse;   // (N,)
  const float* row_npos;  // (N,)
  const float* col_lse;   // (M,) or null
  const float* grad_row;  // (N,)
  const float* grad_col;  // (M,) or null: no column term
  int64_t kind;
  // Centres of the scale sum (softmax; null: 0): d_scale sums dS's row part times (c - m_i) and
  // its column part times (c - n_j), and the host adds the lines' known totals (scale_sum_totals).
  const float* row_centre;  // (N,) or null
  const float* col_centre;  // (M,) or null
};

// An LSE m + log(l) in float32 as hi + lo: hi rounded, lo its rounding error (0 when not finite).
// A loss lse - S_t ~ 1e-3 beside |lse| ~ 20 keeps lo (fastcl.ops.EngineStats.row_lse_lo).
FASTCL_HD void lse_parts(float m, double l, float& hi, float& lo) {
  if (m == -INFINITY || !(l > 0.0)) {
    hi = m == -INFINITY ? -INFINITY : m + static_cast<float>(log(l));
    lo = 0.f;
    return;
  }
  const double lse = static_cast<double>(m) + log(l);
  hi = static_cast<float>(lse);
  lo = static_cast<float>(lse - static_cast<double>(hi));
}

FASTCL_HD float softplus_f(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }
FASTCL_HD float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// dS_ij of the closure for logit S = S_ij (0 on invalid entries) as its row part and its column
// part (symmetric softmax closures; else 0). Reference form of the gradient; the CPU kernel
// evaluates the same expressions row-vectorised.
FASTCL_HD void grad_logit_parts(const TargetMeta& t, const GradMeta& g, int64_t i, int64_t j, float c,
                                float s, float b, float& row, float& col) {
  row = 0.f;
  col = 0.f;
  if (!t.valid(i, j)) return;
  const bool T = t.target(i, j);
  const float S = s * c + b;
  if (g.kind == kSigmoid) {
    const float z = T ? 1.f : -1.f;
    row = -g.grad_row[i] * z * sigmoid_f(-z * S);
    return;
  }
  // (the exponent S - lse from the logit formed as the forward formed it: a dominant entry, whose
  // logit the stored LSE rounds to, gets P = 1 exactly)
  const float npos = g.row_npos[i];
  if (npos > 0.f) row = g.grad_row[i] * (expf(S - g.row_lse[i]) - (T ? 1.f / npos : 0.f));
  if (g.grad_col != nullptr)
    col = g.grad_col[j] * (expf(S - g.col_lse[j]) - (t.col_target(i, j) ? 1.f : 0.f));
}

// ---------------------------------------------------------------------------------------------
// op signatures (schemas in ops.cpp)
// ---------------------------------------------------------------------------------------------

using OptT = std::optional<at::Tensor>;
using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>;
using BackwardOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using StepOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

// Checks shapes, dtypes and devices of the engine inputs (ValueError / TypeError on bad input).
void check_engine_inputs(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& scale,
                         const OptT& bias, const OptT& positives, const OptT& col_positives,
                         const OptT& row_labels, const OptT& col_labels, int64_t kind, bool symmetric);
// Checks the saved statistics and upstream gradients of engine_backward.
void check_backward_inputs(const at::Tensor& queries, const at::Tensor& keys, bool symmetric,
                           const at::Tensor& row_lse, const at::Tensor& row_npos, const OptT& col_lse,
                           const at::Tensor& grad_row, const OptT& grad_col);

// Checks the inputs of correct_line_totals_.
void check_line_correction_inputs(const at::Tensor& d_queries, const at::Tensor& d_keys,
                                  const at::Tensor& queries, const at::Tensor& keys,
                                  const OptT& positives, const OptT& col_positives,
                                  const OptT& row_labels, const OptT& col_labels,
                                  const at::Tensor& row_lse, const at::Tensor& row_npos,
                                  const OptT& col_lse, const at::Tensor& grad_row,
                                  const OptT& grad_col, const at::Tensor& row_sums,
                                  const OptT& col_sums);

// Centres of the scale sums of a softmax closure's lines (rows, or columns) with LSE `lse`, each
// of `count` entries: (lse - b) / s, or (lse - b - log count) / s when s < log count (the line's
// log-mean-exp, within the range of c = <q, k>); 0 for lines without entries or s = 0. Float32,
// contiguous (see fastcl/ops/__init__.py: scale_centres).
at::Tensor scale_centres(const at::Tensor& lse, const at::Tensor& scale, const OptT& bias, int64_t count);
// (2,) float32 [sum_j n_j C_j, sum_j C_j]: what the centred column sums leave out, C_j = sum_i of
// column j's part of dS (ac_j ([column has entries] - [its positive is valid]) in exact
// arithmetic); zeros without a column term. The row part's totals are 0 in these tied closures: a
// row with targets has them in its LSE, so sum_j (P_ij - T_ij / npos_i) = 0.
at::Tensor scale_sum_totals(const at::Tensor& col_centre, const OptT& col_lse, const OptT& grad_col,
                            const OptT& col_positives, int64_t N, int64_t M, int64_t offset,
                            bool exclude_self, const at::Tensor& like);

// Contiguous int64 copy of an optional index/label tensor (undefined when absent).
at::Tensor index_or_empty(const OptT& x);
inline const int64_t* ptr_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<int64_t>() : nullptr;
}

}  // namespace fastcl
