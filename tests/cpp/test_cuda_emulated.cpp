// The CUDA kernels of csrc/cuda/engine_cuda.cu compiled as host C++ (tests/cpp/cuda_emulation.h)
// and run block by block on CPU threads, for every tile mode (fp16, bf16, TF32, exact fp32) and
// closure, against the naive double-precision oracle. This checks the kernels' indexing, tiling,
// shared-memory staging and synchronisation without a GPU; the WMMA layouts follow the documented
// semantics the emulation implements. Exit code 0 on success.
#define FASTCL_CUDA_EMULATION 1
#include "cuda/engine_cuda.cu"

#include <cstdio>
#include <random>
#include <string>

#include "naive_engine.h"

namespace {

int failures = 0;

struct Case {
  std::string name;
  int64_t N, M, D;
  double scale;
  bool has_bias;
  double bias;
  int64_t kind;
  bool symmetric, exclude_self, labels, custom_positives;
  int64_t offset;
  bool duplicates = false;  // key (i + 5) % M holds query i: a negative dominates row i
};

void check(const std::string& what, double err, double tol) {
  if (!(err <= tol)) {
    std::printf("FAIL %-40s max relative error %.3g > %.3g\n", what.c_str(), err, tol);
    ++failures;
  }
}

template <class Mode>
void run(const Case& c, const char* mode_name, double tol) {
  using T = typename Mode::T;
  using fastcl::kBM;
  using fastcl::kThreads;
  const int64_t N = c.N, M = c.M, D = c.D;
  std::mt19937_64 gen(static_cast<uint64_t>(N * 1000 + M * 10 + D));
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.5, 1.5);

  naive::Problem p;
  p.N = N, p.M = M, p.D = D, p.scale = c.scale, p.bias = c.has_bias ? c.bias : 0.0;
  p.kind = c.kind, p.symmetric = c.symmetric, p.exclude_self = c.exclude_self, p.offset = c.offset;
  std::vector<T> q(N * D), k(M * D);
  p.q.resize(N * D);
  p.k.resize(M * D);
  const double unit = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t e = 0; e < N * D; ++e) {
    q[e] = static_cast<T>(static_cast<float>(normal(gen) * unit));
    p.q[e] = static_cast<float>(q[e]);
  }
  for (int64_t e = 0; e < M * D; ++e) {
    k[e] = static_cast<T>(static_cast<float>(normal(gen) * unit));
    p.k[e] = static_cast<float>(k[e]);
  }
  for (int64_t i = 0; c.duplicates && i < std::min(N, M); ++i)
    for (int64_t e = 0; e < D; ++e) {
      k[((i + 5) % M) * D + e] = q[i * D + e];
      p.k[((i + 5) % M) * D + e] = p.q[i * D + e];
    }
  if (c.custom_positives)
    for (int64_t i = 0; i < N; ++i) p.positives.push_back(static_cast<int64_t>(gen() % M));
  if (c.labels) {
    for (int64_t i = 0; i < N; ++i) p.row_labels.push_back(static_cast<int64_t>(gen() % 4));
    for (int64_t j = 0; j < M; ++j) p.col_labels.push_back(static_cast<int64_t>(gen() % 4));
  }
  for (int64_t i = 0; i < N; ++i) p.grad_row.push_back(uniform(gen));
  if (c.symmetric)
    for (int64_t j = 0; j < M; ++j) p.grad_col.push_back(uniform(gen) - 1.0);
  const naive::Result want = naive::evaluate(p);

  auto ptr = [](const std::vector<int64_t>& v) { return v.empty() ? nullptr : v.data(); };
  const fastcl::TargetMeta t{ptr(p.positives), nullptr, ptr(p.row_labels), ptr(p.col_labels),
                             c.offset, c.exclude_self};
  const float scale = static_cast<float>(c.scale), bias = static_cast<float>(c.bias);
  const float* bias_ptr = c.has_bias ? &bias : nullptr;
  const float ninf = -std::numeric_limits<float>::infinity();

  // forward: a grid smaller than the number of row blocks exercises the grid-stride loop and the
  // merge of several column partials
  const int64_t nrb = (N + kBM - 1) / kBM;
  const int64_t grid = c.symmetric ? std::max<int64_t>(1, nrb - 1) : nrb;
  std::vector<float> row_lse(N, ninf), row_pos(N, 0.f), row_npos(N, 0.f), row_lo(N, 0.f);
  std::vector<float> col_lse(M, ninf), col_pos(M, 0.f), col_lo(M, 0.f);
  std::vector<float> part_max(c.symmetric ? grid * M : 0, ninf);
  std::vector<double> part_sum(part_max.size(), 0.0);
  cuda_emu::launch(static_cast<unsigned>(grid), kThreads, [&] {
    fastcl::forward_kernel<Mode>(q.data(), k.data(), N, M, D, &scale, bias_ptr, t, c.kind,
                                 c.symmetric, row_lse.data(), row_pos.data(), row_npos.data(),
                                 c.symmetric ? part_max.data() : nullptr,
                                 c.symmetric ? part_sum.data() : nullptr,
                                 c.symmetric ? col_pos.data() : nullptr, row_lo.data());
  });
  if (c.symmetric) {
    const unsigned threads = 64;
    cuda_emu::launch(static_cast<unsigned>((M + threads - 1) / threads), threads, [&] {
      fastcl::merge_cols_kernel(part_max.data(), part_sum.data(), grid, M, col_lse.data(),
                                col_lo.data());
    });
  }
  const std::string tag = c.name + " [" + mode_name + "] ";
  check(tag + "row_lse", naive::max_rel_err(row_lse, want.row_lse), tol);
  if (c.kind == 0) {  // the LSEs' float32 rounding errors: at most half an ulp, and kept
    auto lo_err = [](const std::vector<float>& hi, const std::vector<float>& lo) {
      double worst = 0.0, any = 0.0;
      for (size_t e = 0; e < hi.size(); ++e) {
        if (!std::isfinite(hi[e])) continue;
        const double ulp = std::nextafter(std::abs(hi[e]), INFINITY) - std::abs(hi[e]);
        worst = std::max(worst, std::abs(lo[e]) / (0.5 * ulp));
        any = std::max(any, static_cast<double>(std::abs(lo[e])));
      }
      return any > 0 ? worst : 2.0;  // (all zero: not kept)
    };
    check(tag + "row_lse_lo", lo_err(row_lse, row_lo), 1.0);
    if (c.symmetric) check(tag + "col_lse_lo", lo_err(col_lse, col_lo), 1.0);
  }
  check(tag + "row_pos", naive::max_rel_err(row_pos, want.row_pos), tol);
  check(tag + "row_npos", naive::max_rel_err(row_npos, want.row_npos), 0.0);
  if (c.symmetric) {
    check(tag + "col_lse", naive::max_rel_err(col_lse, want.col_lse), tol);
    check(tag + "col_pos", naive::max_rel_err(col_pos, want.col_pos), tol);
  }

  // backward from the kernel's own statistics, like the real flow
  std::vector<float> g(p.grad_row.begin(), p.grad_row.end()), gc(p.grad_col.begin(), p.grad_col.end());
  // centres of the scale sums (softmax), as the host computes them: (lse - b [- log count]) / s
  const bool softmax = c.kind == 0;
  auto centres = [&](const std::vector<float>& lse, int64_t count) {
    std::vector<float> m(lse.size(), 0.f);
    const double shift = c.scale < std::log(static_cast<double>(count)) ? std::log(static_cast<double>(count)) : 0.0;
    for (size_t e = 0; e < lse.size(); ++e)
      if (lse[e] > ninf) m[e] = static_cast<float>((lse[e] - p.bias - shift) / c.scale);
    return m;
  };
  const std::vector<float> row_centre = centres(row_lse, M), col_centre = centres(col_lse, N);
  const fastcl::GradMeta gm{row_lse.data(), row_npos.data(), c.symmetric ? col_lse.data() : nullptr,
                            g.data(), c.symmetric ? gc.data() : nullptr, c.kind,
                            softmax ? row_centre.data() : nullptr,
                            softmax && c.symmetric ? col_centre.data() : nullptr};
  const int64_t nqb = (N + kBM - 1) / kBM, nkb = (M + kBM - 1) / kBM;
  std::vector<float> dq(N * D, 0.f), dk(M * D, 0.f), part_s(nqb, 0.f), part_b(nqb, 0.f);
  // softmax: each sweep also sums its own lines' parts of dS (rows: row part, columns: column part)
  std::vector<float> row_sums(N, 0.f), col_sums(M, 0.f);
  cuda_emu::launch(static_cast<unsigned>(nqb), kThreads, [&] {
    if (softmax)
      fastcl::grad_kernel<Mode, true>(q.data(), N, k.data(), M, D, &scale, bias_ptr, t, gm, false,
                                      true, dq.data(), part_s.data(), part_b.data(), row_sums.data());
    else
      fastcl::grad_kernel<Mode>(q.data(), N, k.data(), M, D, &scale, bias_ptr, t, gm, false, true,
                                dq.data(), part_s.data(), part_b.data(), nullptr);
  });
  cuda_emu::launch(static_cast<unsigned>(nkb), kThreads, [&] {
    if (softmax && c.symmetric)
      fastcl::grad_kernel<Mode, true>(k.data(), M, q.data(), N, D, &scale, bias_ptr, t, gm, true,
                                      true, dk.data(), nullptr, nullptr, col_sums.data());
    else
      fastcl::grad_kernel<Mode>(k.data(), M, q.data(), N, D, &scale, bias_ptr, t, gm, true, true,
                                dk.data(), nullptr, nullptr, nullptr);
  });
  if (softmax) {  // (absolute errors: each line's sum is ~0 in exact arithmetic)
    auto sum_err = [](const std::vector<float>& a, const std::vector<double>& b) {
      double worst = 0.0;
      for (size_t e = 0; e < b.size(); ++e) worst = std::max(worst, std::abs(a[e] - b[e]));
      return worst;
    };
    check(tag + "row_sums", sum_err(row_sums, want.row_sums), tol);
    if (c.symmetric) check(tag + "col_sums", sum_err(col_sums, want.col_sums), tol);
    // a sweep for the sums alone (its gradient not needed) gives the same sums
    std::vector<float> alone(N, 0.f);
    cuda_emu::launch(static_cast<unsigned>(nqb), kThreads, [&] {
      fastcl::grad_kernel<Mode, true>(q.data(), N, k.data(), M, D, &scale, bias_ptr, t, gm, false,
                                      false, nullptr, nullptr, nullptr, alone.data());
    });
    check(tag + "row_sums (sweep for the sums alone)", sum_err(alone, std::vector<double>(
                                                           row_sums.begin(), row_sums.end())), 0.0);
  }
  double ds = 0.0, db = 0.0;
  for (int64_t e = 0; e < nqb; ++e) ds += part_s[e], db += part_b[e];
  if (softmax) {  // the centred sums' known totals: rows 0, column j gc_j ([entries] - [positive])
    db = 0.0;
    for (int64_t j = 0; j < M && c.symmetric; ++j) {
      const int64_t i = j - c.offset;
      const bool pos = i >= 0 && i < N && !(c.exclude_self && j == i + c.offset);
      const double C = gc[j] * ((col_lse[j] > ninf ? 1.0 : 0.0) - (pos ? 1.0 : 0.0));
      ds += col_centre[j] * C;
      db += C;
    }
  }
  for (float& v : dq) v *= scale;
  for (float& v : dk) v *= scale;
  // gradients: errors relative to the largest entry (sums of many signed terms)
  auto grad_err = [](const std::vector<float>& a, const std::vector<double>& b) {
    double big = 1.0;
    for (double v : b) big = std::max(big, std::abs(v));
    double worst = 0.0;
    for (size_t e = 0; e < b.size(); ++e) worst = std::max(worst, std::abs(a[e] - b[e]) / big);
    return worst;
  };
  check(tag + "d_queries", grad_err(dq, want.dq), tol);
  check(tag + "d_keys", grad_err(dk, want.dk), tol);
  check(tag + "d_scale", naive::max_rel_err(std::vector<double>{ds}, std::vector<double>{want.ds}), tol);
  if (c.has_bias)
    check(tag + "d_bias", naive::max_rel_err(std::vector<double>{db}, std::vector<double>{want.db}), tol);
}

}  // namespace

int main() {
  // name, N, M, D, scale, has_bias, bias, kind, symmetric, exclude_self, labels, positives, offset
  const std::vector<Case> cases = {
      {"info_nce", 70, 150, 40, 14.0, true, 0.3, 0, false, false, false, true, 0},
      {"clip", 150, 150, 72, 20.0, false, 0.0, 0, true, false, false, false, 0},
      {"clip_offset", 70, 100, 33, 20.0, true, -1.0, 0, true, false, false, false, 3},
      {"supcon", 90, 100, 24, 10.0, false, 0.0, 0, false, true, true, false, 2},
      {"siglip", 65, 80, 20, 10.0, true, -5.0, 1, false, false, false, false, 0},
  };
  // exact float32 where a negative (each query's duplicate) holds P ~ 1 of its row and column at
  // scale 100: the exponent S - lse from the logit formed as the forward formed it gives that
  // entry P = 1 (gradients 3e-7 off); an exponent s (c - (lse - b) / s) put an ulp of |lse| into
  // it (6e-6 off)
  run<fastcl::ModeF32>({"dominant_negatives", 70, 90, 24, 100.0, false, 0.0, 0, true, false, false,
                        false, 0, true}, "fp32", 3e-6);
  for (const Case& c : cases) {
    run<fastcl::ModeF32>(c, "fp32", 1e-4);
    run<fastcl::ModeTf32>(c, "tf32", 2e-2);
    run<fastcl::ModeHalf>(c, "fp16", 1e-2);
    run<fastcl::ModeBf16>(c, "bf16", 3e-2);
    std::printf("%-12s done\n", c.name.c_str());
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all emulated CUDA kernel checks passed\n");
  return 0;
}
