// The CPU engine ops called through the dispatcher (torch::ops fastcl::engine_forward /
// engine_backward), checked against a naive double-precision evaluation of the contract
// (fastcl/ops/__init__.py) on small problems. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using OptT = std::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&,
    const OptT&, const OptT&, int64_t, bool, bool, int64_t, bool);
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&,
    const OptT&, const OptT&, int64_t, bool, bool, int64_t, bool, const at::Tensor&,
    const at::Tensor&, const OptT&, const at::Tensor&, const OptT&, bool, bool, bool, bool);

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
  const double* p = g.data_ptr<double>();
  double worst = 0.0;
  for (size_t e = 0; e < want.size(); ++e) {
    const double a = p[e], b = want[e];
    if (std::isinf(b) && a == b) continue;
    const double err = std::abs(a - b) / (1.0 + std::abs(b));
    if (!(err <= worst)) worst = err;  // NaN-aware
  }
  if (!(worst <= tol)) {
    std::printf("FAIL %s: max relative error %.3g > %.3g\n", what.c_str(), worst, tol);
    ++failures;
  }
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

  // naive evaluation of the contract in double precision
  const at::Tensor q64 = q.to(at::kDouble), k64 = k.to(at::kDouble);
  auto qa = q64.accessor<double, 2>();
  auto ka = k64.accessor<double, 2>();
  const double b = c.bias ? *c.bias : 0.0;
  std::vector<double> C(N * M), S(N * M);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += qa[i][d] * ka[j][d];
      C[i * M + j] = dot;
      S[i * M + j] = c.scale * dot + b;
    }
  auto valid = [&](int64_t i, int64_t j) { return !(c.exclude_self && j == i + c.offset); };
  auto target = [&](int64_t i, int64_t j) {
    if (!valid(i, j)) return false;
    if (c.labels) return row_labels->data_ptr<int64_t>()[i] == col_labels->data_ptr<int64_t>()[j];
    const int64_t p = c.custom_positives ? positives->data_ptr<int64_t>()[i] : i + c.offset;
    return j == p;
  };
  auto col_target = [&](int64_t i, int64_t j) { return valid(i, j) && i == j - c.offset; };
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> lse(N, -inf), pos(N, 0.0), npos(N, 0.0), clse(M, -inf), cpos(M, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    double mx = -inf;
    for (int64_t j = 0; j < M; ++j)
      if (valid(i, j)) mx = std::max(mx, S[i * M + j]);
    double sum = 0.0, sp = 0.0;
    for (int64_t j = 0; j < M; ++j) {
      if (!valid(i, j)) continue;
      const double s = S[i * M + j];
      sum += std::exp(s - mx);
      if (c.kind == 1) {
        const double z = target(i, j) ? 1.0 : -1.0;
        sp += std::log1p(std::exp(-z * s));
      } else if (target(i, j)) {
        pos[i] += s;
        npos[i] += 1.0;
      }
    }
    lse[i] = c.kind == 1 ? sp : (mx == -inf ? -inf : mx + std::log(sum));
  }
  if (c.symmetric) {
    for (int64_t j = 0; j < M; ++j) {
      double mx = -inf;
      for (int64_t i = 0; i < N; ++i)
        if (valid(i, j)) mx = std::max(mx, S[i * M + j]);
      double sum = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        if (!valid(i, j)) continue;
        sum += std::exp(S[i * M + j] - mx);
        if (col_target(i, j)) cpos[j] += S[i * M + j];
      }
      clse[j] = mx + std::log(sum);
    }
  }

  auto out = fwd.call(q, k, scale, bias, positives, std::nullopt, row_labels, col_labels, c.kind,
                      c.symmetric, c.exclude_self, c.offset, false);
  const double tol = 2e-5 * std::max(1.0, c.scale);
  expect_close(c.name + " row_lse", std::get<0>(out), lse, tol);
  expect_close(c.name + " row_pos", std::get<1>(out), pos, tol);
  expect_close(c.name + " row_npos", std::get<2>(out), npos, 0.0);
  if (c.symmetric) {
    expect_close(c.name + " col_lse", std::get<3>(out), clse, tol);
    expect_close(c.name + " col_pos", std::get<4>(out), cpos, tol);
  } else if (std::get<3>(out).numel() != 0 || std::get<4>(out).numel() != 0) {
    std::printf("FAIL %s: column outputs must be empty when not symmetric\n", c.name.c_str());
    ++failures;
  }

  // backward with random upstream gradients
  at::Tensor g = at::rand({N}) + 0.5;
  OptT gc;
  if (c.symmetric) gc = at::rand({M}) - 0.5;
  const at::Tensor g64 = g.to(at::kDouble);
  const at::Tensor gc64 = gc ? gc->to(at::kDouble) : at::zeros({M}, at::kDouble);
  auto ga = g64.accessor<double, 1>();
  auto gca = gc64.accessor<double, 1>();
  std::vector<double> dS(N * M, 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      if (!valid(i, j)) continue;
      const double s = S[i * M + j];
      double d = 0.0;
      if (c.kind == 1) {
        const double z = target(i, j) ? 1.0 : -1.0;
        d = -ga[i] * z / (1.0 + std::exp(z * s));
      } else {
        if (npos[i] > 0) d = ga[i] * (std::exp(s - lse[i]) - (target(i, j) ? 1.0 / npos[i] : 0.0));
        if (gc) {
          d += gca[j] * (std::exp(s - clse[j]) - (col_target(i, j) ? 1.0 : 0.0));
        }
      }
      dS[i * M + j] = d;
    }
  std::vector<double> dq(N * D, 0.0), dk(M * D, 0.0);
  double ds = 0.0, db = 0.0;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      const double d = dS[i * M + j];
      ds += d * C[i * M + j];
      db += d;
      for (int64_t e = 0; e < D; ++e) {
        dq[i * D + e] += c.scale * d * ka[j][e];
        dk[j * D + e] += c.scale * d * qa[i][e];
      }
    }
  auto grads = bwd.call(q, k, scale, bias, positives, std::nullopt, row_labels, col_labels, c.kind,
                        c.symmetric, c.exclude_self, c.offset, false, std::get<0>(out),
                        std::get<2>(out), c.symmetric ? OptT(std::get<3>(out)) : std::nullopt, g,
                        gc, true, true, true, c.bias.has_value());
  expect_close(c.name + " d_queries", std::get<0>(grads), dq, tol);
  expect_close(c.name + " d_keys", std::get<1>(grads), dk, tol);
  expect_close(c.name + " d_scale", std::get<2>(grads), {ds}, tol);
  if (c.bias) expect_close(c.name + " d_bias", std::get<3>(grads), {db}, tol);
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
