// The CPU engine ops called through the dispatcher (fastcl::engine_forward / engine_backward),
// checked against the naive double-precision oracle of the contract (naive_engine.h) on small
// problems. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "naive_engine.h"

namespace {

using OptT = std::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&,
    const OptT&, const OptT&, int64_t, bool, bool, int64_t, bool);
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&,
    const OptT&, const OptT&, int64_t, bool, bool, int64_t, bool, const at::Tensor&,
    const at::Tensor&, const OptT&, const at::Tensor&, const OptT&, bool, bool, bool, bool, bool);

int failures = 0;

struct Case {
  std::string name;
  int64_t N, M, D;
  double scale;
  std::optional<double> bias;
  int64_t kind = 0;  // 0 softmax, 1 sigmoid
  bool symmetric = false, exclude_self = false, labels = false, custom_positives = false;
  int64_t offset = 0;
};

void expect_close(const std::string& what, const at::Tensor& got, const std::vector<double>& want,
                  double tol) {
  at::Tensor g = got.to(at::kDouble).contiguous().reshape({-1});
  if (g.numel() != static_cast<int64_t>(want.size())) {
    std::printf("FAIL %s: %ld values, expected %zu\n", what.c_str(), (long)g.numel(), want.size());
    ++failures;
    return;
  }
  const double worst = naive::max_rel_err(g.data_ptr<double>(), want);
  if (!(worst <= tol)) {
    std::printf("FAIL %s: max relative error %.3g > %.3g\n", what.c_str(), worst, tol);
    ++failures;
  }
}

// lo: the float32 LSE's rounding error, at most half an ulp of it (and not all zero: it is kept)
void expect_lse_parts(const std::string& what, const at::Tensor& hi, const at::Tensor& lo,
                      bool softmax) {
  const at::Tensor h = hi.to(at::kDouble), l = lo.to(at::kDouble);
  const at::Tensor ulp = (at::nextafter(hi.abs(), at::full_like(hi, INFINITY)) - hi.abs()).to(at::kDouble);
  const at::Tensor fin = at::isfinite(h);
  const bool bounded = (l.abs() <= 0.5 * ulp).logical_or(fin.logical_not()).all().item<bool>();
  const bool kept = softmax ? (l.abs() > 0).any().item<bool>() : (l == 0).all().item<bool>();
  if (!bounded || !kept) {
    std::printf("FAIL %s: lse lo parts (bounded %d, %s)\n", what.c_str(), bounded,
                softmax ? "some nonzero" : "zero for sigmoid");
    ++failures;
  }
}

template <class V>
std::vector<V> to_vec(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  return std::vector<V>(c.data_ptr<V>(), c.data_ptr<V>() + c.numel());
}

void run_case(const Case& c, const c10::TypedOperatorHandle<Fwd>& fwd,
              const c10::TypedOperatorHandle<Bwd>& bwd) {
  at::manual_seed(1234 + c.N + 7 * c.M);
  const int64_t N = c.N, M = c.M, D = c.D;
  at::Tensor q = at::randn({N, D}) / std::sqrt(static_cast<double>(D));
  at::Tensor k = at::randn({M, D}) / std::sqrt(static_cast<double>(D));
  at::Tensor scale = at::full({1}, c.scale, at::kFloat);
  OptT bias;
  if (c.bias) bias = at::full({1}, *c.bias, at::kFloat);
  OptT positives, row_labels, col_labels;
  if (c.custom_positives) positives = at::randint(0, M, {N}, at::kLong);
  if (c.labels) {
    row_labels = at::randint(0, 3, {N}, at::kLong);
    col_labels = at::randint(0, 3, {M}, at::kLong);
  }
  at::Tensor g = at::rand({N}) + 0.5;
  OptT gc;
  if (c.symmetric) gc = at::rand({M}) - 0.5;

  naive::Problem p;
  p.N = N, p.M = M, p.D = D, p.scale = c.scale, p.bias = c.bias ? *c.bias : 0.0;
  p.kind = c.kind, p.symmetric = c.symmetric, p.exclude_self = c.exclude_self, p.offset = c.offset;
  p.q = to_vec<double>(q.to(at::kDouble));
  p.k = to_vec<double>(k.to(at::kDouble));
  if (positives) p.positives = to_vec<int64_t>(*positives);
  if (row_labels) p.row_labels = to_vec<int64_t>(*row_labels), p.col_labels = to_vec<int64_t>(*col_labels);
  p.grad_row = to_vec<double>(g.to(at::kDouble));
  if (gc) p.grad_col = to_vec<double>(gc->to(at::kDouble));
  const naive::Result want = naive::evaluate(p);

  auto out = fwd.call(q, k, scale, bias, positives, std::nullopt, row_labels, col_labels, c.kind,
                      c.symmetric, c.exclude_self, c.offset, false);
  const double tol = 2e-5 * std::max(1.0, c.scale);
  expect_close(c.name + " row_lse", std::get<0>(out), want.row_lse, tol);
  expect_lse_parts(c.name + " row", std::get<0>(out), std::get<5>(out), c.kind == 0);
  if (c.symmetric) expect_lse_parts(c.name + " col", std::get<3>(out), std::get<6>(out), true);
  expect_close(c.name + " row_pos", std::get<1>(out), want.row_pos, tol);
  expect_close(c.name + " row_npos", std::get<2>(out), want.row_npos, 0.0);
  if (c.symmetric) {
    expect_close(c.name + " col_lse", std::get<3>(out), want.col_lse, tol);
    expect_close(c.name + " col_pos", std::get<4>(out), want.col_pos, tol);
  } else if (std::get<3>(out).numel() != 0 || std::get<4>(out).numel() != 0) {
    std::printf("FAIL %s: column outputs must be empty when not symmetric\n", c.name.c_str());
    ++failures;
  }

  const bool softmax = c.kind == 0;
  auto grads = bwd.call(q, k, scale, bias, positives, std::nullopt, row_labels, col_labels, c.kind,
                        c.symmetric, c.exclude_self, c.offset, false, std::get<0>(out),
                        std::get<2>(out), c.symmetric ? OptT(std::get<3>(out)) : std::nullopt, g,
                        gc, true, true, true, c.bias.has_value(), softmax);
  expect_close(c.name + " d_queries", std::get<0>(grads), want.dq, tol);
  if (softmax) {  // the lines' sums of dS's parts, as the kernel formed them
    expect_close(c.name + " row_sums", std::get<4>(grads), want.row_sums, tol);
    if (c.symmetric) expect_close(c.name + " col_sums", std::get<5>(grads), want.col_sums, tol);
  }
  // each alone: the other gradient's sweep still runs for its lines' sums
  for (int only_q = 0; only_q < 2 && softmax; ++only_q) {
    auto one = bwd.call(q, k, scale, bias, positives, std::nullopt, row_labels, col_labels, c.kind,
                        c.symmetric, c.exclude_self, c.offset, false, std::get<0>(out),
                        std::get<2>(out), c.symmetric ? OptT(std::get<3>(out)) : std::nullopt, g,
                        gc, only_q == 1, only_q == 0, false, false, true);
    const std::string tag = c.name + (only_q ? " (d_queries only)" : " (d_keys only)");
    expect_close(tag + (only_q ? " d_queries" : " d_keys"), only_q ? std::get<0>(one) : std::get<1>(one),
                 only_q ? want.dq : want.dk, tol);
    expect_close(tag + " row_sums", std::get<4>(one), want.row_sums, tol);
    if (c.symmetric) expect_close(tag + " col_sums", std::get<5>(one), want.col_sums, tol);
  }
  expect_close(c.name + " d_keys", std::get<1>(grads), want.dk, tol);
  expect_close(c.name + " d_scale", std::get<2>(grads), {want.ds}, tol);
  if (c.bias) expect_close(c.name + " d_bias", std::get<3>(grads), {want.db}, tol);
}

}  // namespace

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto fwd = dispatcher.findSchemaOrThrow("fastcl::engine_forward", "").typed<Fwd>();
  const auto bwd = dispatcher.findSchemaOrThrow("fastcl::engine_backward", "").typed<Bwd>();

  std::vector<Case> cases;
  cases.push_back({"info_nce", 19, 70, 13, 14.0, 0.3});
  {
    Case c{"info_nce_positives", 67, 300, 21, 20.0, std::nullopt};
    c.custom_positives = true;
    cases.push_back(c);
  }
  {
    Case c{"clip_tau_0.01", 70, 70, 17, 100.0, std::nullopt};
    c.symmetric = true;
    cases.push_back(c);
  }
  {  // several row and column tiles each way
    Case c{"clip_tiles", 300, 270, 9, 20.0, 0.5};
    c.symmetric = true;
    cases.push_back(c);
  }
  {
    Case c{"supcon", 40, 45, 11, 10.0, std::nullopt};
    c.labels = c.exclude_self = true;
    c.offset = 2;
    cases.push_back(c);
  }
  {
    Case c{"siglip", 23, 29, 9, 10.0, -5.0};
    c.kind = 1;
    cases.push_back(c);
  }
  for (const Case& c : cases) {
    run_case(c, fwd, bwd);
    std::printf("%-20s done\n", c.name.c_str());
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all engine checks passed\n");
  return 0;
}
