// Schemas of the fastcl engine ops (declared once here; kernels in cpu/ and cuda/) and the input
// checks shared by every device.
//
// Conventions:
//  * kind: 0 = softmax closure, 1 = sigmoid closure.
//  * engine_forward returns (row_lse, row_pos, row_npos, col_lse, col_pos, row_lse_lo, col_lse_lo),
//    float32; the column outputs have shape (0,) unless symmetric. The *_lo outputs are the LSEs'
//    float32 rounding errors (the LSE is lse + lse_lo; zeros for the sigmoid closure).
//  * engine_backward returns (d_queries, d_keys, d_scale, d_bias, row_sums, col_sums); a gradient
//    that was not asked for (need_* false) is returned as an empty (0,) tensor of its dtype.
//    d_queries / d_keys have the dtype of queries / keys, d_scale / d_bias are float32 of shape
//    (1,). With line_sums (softmax only), row_sums (N,) holds each row's sum of dS's row part and
//    col_sums (M,) each column's sum of its column part (when grad_col is given), float32, as the
//    kernels formed them (fastcl.ops.correct_line_totals compares them with the exact totals);
//    otherwise both are (0,).
//  * grad_col is None unless the column term of a symmetric loss receives a gradient.
//  * correct_line_totals_ applies fastcl.ops.correct_line_totals to the float32 gradients of a
//    tied softmax closure with index or label targets, in place, from engine_backward's line
//    sums; d_queries / d_keys may be empty (0,) tensors (not asked for). CPU only.
//  * engine_step (CPU only) is engine_forward and engine_backward of a row-only closure (no
//    column term) in one sweep, with grad_row = 1 on every row: it returns (row_lse, row_pos,
//    row_npos, row_lse_lo, d_queries, d_keys, d_scale, d_bias, row_sums), the statistics as
//    engine_forward's and the gradients of sum_i L_i as engine_backward's, except that d_queries /
//    d_keys are float32 whatever the features' dtype (the caller scales them by the total's
//    gradient before rounding once).
#include <torch/library.h>

#include "fastcl.h"

#include <algorithm>
#include <cmath>
#include <limits>

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
#endif

namespace fastcl {

namespace {

bool is_feature_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

void check_index(const OptT& x, const char* name, int64_t n, const at::Tensor& like) {
  if (!x.has_value() || !x->defined()) return;
  TORCH_CHECK_TYPE(x->scalar_type() == at::kLong || x->scalar_type() == at::kInt, name,
                   " must be an int64 tensor, got ", x->scalar_type());
  TORCH_CHECK_VALUE(x->dim() == 1 && x->size(0) == n, name, " must have shape (", n, ",), got ",
                    x->sizes());
  TORCH_CHECK_VALUE(x->device() == like.device(), name, " is on ", x->device(),
                    " but the features are on ", like.device());
}

void check_vec(const at::Tensor& x, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK_VALUE(x.defined(), name, " must be a tensor of shape (", n, ",)");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name, " must be a floating-point tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == n, name, " must have shape (", n, ",), got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.device() == like.device(), name, " is on ", x.device(),
                    " but the features are on ", like.device());
}

void check_scalar(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must be a float32 tensor of shape (1,), got shape ",
                    x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == like.device(), name, " is on ", x.device(),
                    " but the features are on ", like.device());
}

}  // namespace

void check_engine_inputs(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& scale,
                         const OptT& bias, const OptT& positives, const OptT& col_positives,
                         const OptT& row_labels, const OptT& col_labels, int64_t kind, bool symmetric) {
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries must have shape (N, D), got ", queries.sizes());
  TORCH_CHECK_VALUE(keys.dim() == 2, "keys must have shape (M, D), got ", keys.sizes());
  TORCH_CHECK_VALUE(queries.size(1) == keys.size(1),
                    "queries and keys must share the feature dimension D, got ", queries.sizes(),
                    " and ", keys.sizes());
  TORCH_CHECK_TYPE(is_feature_dtype(queries.scalar_type()),
                   "queries must be float16, bfloat16 or float32, got ", queries.scalar_type());
  TORCH_CHECK_TYPE(keys.scalar_type() == queries.scalar_type(),
                   "keys must have the dtype of queries (", queries.scalar_type(), "), got ",
                   keys.scalar_type());
  TORCH_CHECK_VALUE(keys.device() == queries.device(), "keys are on ", keys.device(),
                    " but queries are on ", queries.device());
  check_scalar(scale, "scale", queries);
  if (bias.has_value() && bias->defined()) check_scalar(*bias, "bias", queries);
  TORCH_CHECK_VALUE(kind == kSoftmax || kind == kSigmoid,
                    "kind must be 0 (softmax) or 1 (sigmoid), got ", kind);
  const int64_t N = queries.size(0), M = keys.size(0);
  check_index(positives, "positives", N, queries);
  check_index(col_positives, "col_positives", M, queries);
  check_index(row_labels, "row_labels", N, queries);
  check_index(col_labels, "col_labels", M, queries);
  const bool has_rl = row_labels.has_value() && row_labels->defined();
  const bool has_cl = col_labels.has_value() && col_labels->defined();
  TORCH_CHECK_VALUE(has_rl == has_cl, "row_labels and col_labels must be given together");
  TORCH_CHECK_VALUE(!symmetric || (kind == kSoftmax && !has_rl),
                    "symmetric needs the softmax kind and index targets (no labels)");
}

void check_backward_inputs(const at::Tensor& queries, const at::Tensor& keys, bool symmetric,
                           const at::Tensor& row_lse, const at::Tensor& row_npos, const OptT& col_lse,
                           const at::Tensor& grad_row, const OptT& grad_col) {
  const int64_t N = queries.size(0), M = keys.size(0);
  check_vec(row_lse, "row_lse", N, queries);
  check_vec(row_npos, "row_npos", N, queries);
  check_vec(grad_row, "grad_row", N, queries);
  if (grad_col.has_value() && grad_col->defined()) {
    TORCH_CHECK_VALUE(symmetric, "grad_col is only used by symmetric losses");
    check_vec(*grad_col, "grad_col", M, queries);
    TORCH_CHECK_VALUE(col_lse.has_value() && col_lse->defined(), "grad_col needs col_lse");
    check_vec(*col_lse, "col_lse", M, queries);
  }
}

void check_line_correction_inputs(const at::Tensor& d_queries, const at::Tensor& d_keys,
                                  const at::Tensor& queries, const at::Tensor& keys,
                                  const OptT& positives, const OptT& col_positives,
                                  const OptT& row_labels, const OptT& col_labels,
                                  const at::Tensor& row_lse, const at::Tensor& row_npos,
                                  const OptT& col_lse, const at::Tensor& grad_row,
                                  const OptT& grad_col, const at::Tensor& row_sums,
                                  const OptT& col_sums) {
  const int64_t N = queries.size(0), M = keys.size(0);
  for (const auto& [g, name, like] : {std::make_tuple(&d_queries, "d_queries", &queries),
                                      std::make_tuple(&d_keys, "d_keys", &keys)}) {
    if (g->numel() == 0 && g->dim() == 1) continue;  // not asked for
    TORCH_CHECK_VALUE(g->sizes() == like->sizes(), name, " must have shape ", like->sizes(),
                      " (or (0,) when not asked for), got ", g->sizes());
    TORCH_CHECK_TYPE(g->scalar_type() == at::kFloat, name, " must be float32, got ", g->scalar_type());
    TORCH_CHECK_VALUE(g->is_contiguous() && g->device() == queries.device(), name,
                      " must be contiguous and on the device of the features");
  }
  const bool has_gc = grad_col.has_value() && grad_col->defined();
  check_index(positives, "positives", N, queries);
  check_index(col_positives, "col_positives", M, queries);
  check_index(row_labels, "row_labels", N, queries);
  check_index(col_labels, "col_labels", M, queries);
  const bool has_rl = row_labels.has_value() && row_labels->defined();
  TORCH_CHECK_VALUE(has_rl == (col_labels.has_value() && col_labels->defined()),
                    "row_labels and col_labels must be given together");
  TORCH_CHECK_VALUE(!(has_rl && has_gc), "label targets have no column term (grad_col)");
  check_backward_inputs(queries, keys, has_gc, row_lse, row_npos, col_lse, grad_row, grad_col);
  check_vec(row_sums, "row_sums", N, queries);
  TORCH_CHECK_VALUE(has_gc == (col_sums.has_value() && col_sums->defined()),
                    "col_sums must be given exactly when grad_col is");
  if (has_gc) check_vec(*col_sums, "col_sums", M, queries);
}

at::Tensor index_or_empty(const OptT& x) {
  if (!x.has_value() || !x->defined()) return at::Tensor();
  return x->to(at::kLong).contiguous();
}

at::Tensor scale_centres(const at::Tensor& lse, const at::Tensor& scale, const OptT& bias, int64_t count) {
  // (tensor arithmetic on the device: no host read of the scale)
  const at::Tensor l = lse.to(at::kFloat);
  const at::Tensor s = scale.reshape({}).to(at::kFloat);
  const double log_n = std::log(static_cast<double>(std::max<int64_t>(count, 1)));
  const at::Tensor shift = at::where(s < log_n, at::full({}, log_n, s.options()), at::zeros({}, s.options()));
  const at::Tensor safe = at::where(s != 0, s, at::ones({}, s.options()));
  at::Tensor m = l - shift;
  if (bias.has_value() && bias->defined()) m = m - bias->reshape({}).to(at::kFloat);
  m = m / safe;
  const at::Tensor keep = (l > -std::numeric_limits<float>::infinity()).logical_and(s != 0);
  return at::where(keep, m, at::zeros({}, m.options())).contiguous();
}

at::Tensor scale_sum_totals(const at::Tensor& col_centre, const OptT& col_lse, const OptT& grad_col,
                            const OptT& col_positives, int64_t N, int64_t M, int64_t offset,
                            bool exclude_self, const at::Tensor& like) {
  const auto f32 = like.options().dtype(at::kFloat);
  if (!grad_col.has_value() || !grad_col->defined()) return at::zeros({2}, f32);
  const at::Tensor cols = at::arange(M, like.options().dtype(at::kLong));
  const at::Tensor pc = (col_positives.has_value() && col_positives->defined())
                            ? col_positives->to(at::kLong)
                            : cols - offset;
  at::Tensor ok = (pc >= 0).logical_and(pc < N);
  if (exclude_self) ok = ok.logical_and(cols != pc + offset);
  const at::Tensor has = *col_lse > -std::numeric_limits<float>::infinity();
  const at::Tensor C = grad_col->to(at::kFloat) * (has.to(at::kFloat) - ok.to(at::kFloat));
  return at::stack({(col_centre * C).sum(), C.sum()});
}

}  // namespace fastcl

TORCH_LIBRARY(fastcl, m) {
  m.def(
      "engine_forward(Tensor queries, Tensor keys, Tensor scale, Tensor? bias, Tensor? positives, "
      "Tensor? col_positives, Tensor? row_labels, Tensor? col_labels, int kind, bool symmetric, "
      "bool exclude_self, int offset, bool exact) -> (Tensor row_lse, Tensor row_pos, "
      "Tensor row_npos, Tensor col_lse, Tensor col_pos, Tensor row_lse_lo, Tensor col_lse_lo)");
  m.def(
      "engine_backward(Tensor queries, Tensor keys, Tensor scale, Tensor? bias, Tensor? positives, "
      "Tensor? col_positives, Tensor? row_labels, Tensor? col_labels, int kind, bool symmetric, "
      "bool exclude_self, int offset, bool exact, Tensor row_lse, Tensor row_npos, Tensor? col_lse, "
      "Tensor grad_row, Tensor? grad_col, bool need_queries, bool need_keys, bool need_scale, "
      "bool need_bias, bool line_sums) -> (Tensor d_queries, Tensor d_keys, Tensor d_scale, "
      "Tensor d_bias, Tensor row_sums, Tensor col_sums)");
  m.def(
      "correct_line_totals_(Tensor(a!) d_queries, Tensor(b!) d_keys, Tensor queries, Tensor keys, "
      "Tensor scale, Tensor? positives, Tensor? col_positives, Tensor? row_labels, "
      "Tensor? col_labels, int offset, bool exclude_self, "
      "Tensor row_lse, Tensor row_npos, Tensor? col_lse, Tensor grad_row, Tensor? grad_col, "
      "Tensor row_sums, Tensor? col_sums) -> ()");
  m.def(
      "engine_step(Tensor queries, Tensor keys, Tensor scale, Tensor? bias, Tensor? positives, "
      "Tensor? row_labels, Tensor? col_labels, int kind, bool exclude_self, int offset, "
      "bool need_queries, bool need_keys, bool need_scale, bool need_bias, bool line_sums) -> "
      "(Tensor row_lse, Tensor row_pos, Tensor row_npos, Tensor row_lse_lo, Tensor d_queries, "
      "Tensor d_keys, Tensor d_scale, Tensor d_bias, Tensor row_sums)");
}

#ifdef TORCH_EXTENSION_NAME
// A bare Python module: importing fastcl._C loads this library, which registers the ops above.
#define FASTCL_CONCAT_(a, b) a##b
#define FASTCL_CONCAT(a, b) FASTCL_CONCAT_(a, b)
#define FASTCL_STR_(a) #a
#define FASTCL_STR(a) FASTCL_STR_(a)
PyMODINIT_FUNC FASTCL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, FASTCL_STR(TORCH_EXTENSION_NAME),
                                   "fastcl engine ops (torch.ops.fastcl.*)", -1, nullptr};
  return PyModule_Create(&def);
}
#endif
