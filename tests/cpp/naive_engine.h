// Naive double-precision evaluation of the engine contract (fastcl/ops/__init__.py): the oracle
// of the C++ tests. O(N * M * D), for small problems only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace naive {

struct Problem {
  int64_t N = 0, M = 0, D = 0;
  std::vector<double> q, k;  // (N, D), (M, D) row-major
  double scale = 1.0, bias = 0.0;
  int64_t kind = 0;  // 0 softmax, 1 sigmoid
  bool symmetric = false, exclude_self = false;
  int64_t offset = 0;
  std::vector<int64_t> positives, row_labels, col_labels;  // empty: default / index mode
  std::vector<double> grad_row, grad_col;                  // grad_col empty: no column term
};

struct Result {
  std::vector<double> row_lse, row_pos, row_npos, col_lse, col_pos;
  std::vector<double> dq, dk;
  double ds = 0.0, db = 0.0;
  // softmax: each row's sum of dS's row part, each column's sum of its column part (0 without one)
  std::vector<double> row_sums, col_sums;
};

inline Result evaluate(const Problem& p) {
  const int64_t N = p.N, M = p.M, D = p.D;
  const double inf = std::numeric_limits<double>::infinity();
  auto valid = [&](int64_t i, int64_t j) { return !(p.exclude_self && j == i + p.offset); };
  auto target = [&](int64_t i, int64_t j) {
    if (!valid(i, j)) return false;
    if (!p.row_labels.empty()) return p.row_labels[i] == p.col_labels[j];
    return j == (p.positives.empty() ? i + p.offset : p.positives[i]);
  };
  auto col_target = [&](int64_t i, int64_t j) { return valid(i, j) && i == j - p.offset; };

  std::vector<double> C(N * M), S(N * M);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += p.q[i * D + d] * p.k[j * D + d];
      C[i * M + j] = dot;
      S[i * M + j] = p.scale * dot + p.bias;
    }
  Result r;
  r.row_lse.assign(N, -inf);
  r.row_pos.assign(N, 0.0);
  r.row_npos.assign(N, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    double mx = -inf;
    for (int64_t j = 0; j < M; ++j)
      if (valid(i, j)) mx = std::max(mx, S[i * M + j]);
    double sum = 0.0, sp = 0.0;
    for (int64_t j = 0; j < M; ++j) {
      if (!valid(i, j)) continue;
      const double s = S[i * M + j];
      sum += std::exp(s - mx);
      if (p.kind == 1) {
        sp += std::log1p(std::exp(-(target(i, j) ? 1.0 : -1.0) * s));
      } else if (target(i, j)) {
        r.row_pos[i] += s;
        r.row_npos[i] += 1.0;
      }
    }
    r.row_lse[i] = p.kind == 1 ? sp : (mx == -inf ? -inf : mx + std::log(sum));
  }
  if (p.symmetric) {
    r.col_lse.assign(M, -inf);
    r.col_pos.assign(M, 0.0);
    for (int64_t j = 0; j < M; ++j) {
      double mx = -inf;
      for (int64_t i = 0; i < N; ++i)
        if (valid(i, j)) mx = std::max(mx, S[i * M + j]);
      double sum = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        if (!valid(i, j)) continue;
        sum += std::exp(S[i * M + j] - mx);
        if (col_target(i, j)) r.col_pos[j] += S[i * M + j];
      }
      r.col_lse[j] = mx == -inf ? -inf : mx + std::log(sum);
    }
  }
  r.dq.assign(N * D, 0.0);
  r.dk.assign(M * D, 0.0);
  r.row_sums.assign(N, 0.0);
  r.col_sums.assign(M, 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      if (!valid(i, j)) continue;
      const double s = S[i * M + j];
      double d = 0.0;
      if (p.kind == 1) {
        const double z = target(i, j) ? 1.0 : -1.0;
        d = -p.grad_row[i] * z / (1.0 + std::exp(z * s));
      } else {
        double row = 0.0, col = 0.0;
        if (r.row_npos[i] > 0)
          row = p.grad_row[i] * (std::exp(s - r.row_lse[i]) - (target(i, j) ? 1.0 / r.row_npos[i] : 0.0));
        if (!p.grad_col.empty())
          col = p.grad_col[j] * (std::exp(s - r.col_lse[j]) - (col_target(i, j) ? 1.0 : 0.0));
        r.row_sums[i] += row;
        r.col_sums[j] += col;
        d = row + col;
      }
      r.ds += d * C[i * M + j];
      r.db += d;
      for (int64_t e = 0; e < D; ++e) {
        r.dq[i * D + e] += p.scale * d * p.k[j * D + e];
        r.dk[j * D + e] += p.scale * d * p.q[i * D + e];
      }
    }
  return r;
}

// Largest |a - b| / (1 + |b|) over two sequences (equal infinities count as 0; NaN as +inf).
template <class A>
double max_rel_err(const A& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (size_t e = 0; e < b.size(); ++e) {
    const double x = static_cast<double>(a[e]), y = b[e];
    if (std::isinf(y) && x == y) continue;
    const double err = std::abs(x - y) / (1.0 + std::abs(y));
    if (!(err <= worst)) worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
  }
  return worst;
}

}  // namespace naive
