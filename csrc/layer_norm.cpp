// LayerNorm over the last dimension on the CPU, forward and backward.
//
// For one row x of N numbers, with weight w and bias b:
//
//   mean = sum_j x_j / N,   var = sum_j (x_j - mean)^2 / N,   rstd = 1 / sqrt(var + eps)
//   xhat_j = (x_j - mean) * rstd,   y_j = xhat_j * w_j + b_j
//
// Backward, with dy the gradient of y and g_j = dy_j * w_j:
//
//   dx_j = rstd * (g_j - mean_k(g_k) - xhat_j * mean_k(g_k * xhat_k))
//   dw_j = sum over rows of dy_j * xhat_j,   db_j = sum over rows of dy_j
//
// Statistics are in fp32 (fp64 for fp64 input) whatever the storage type; under autocast y is
// written, and its gradient read, in bf16 beside an fp32 x (see paired_dtype). A row is a few
// kilobytes, so it stays in L1 between the passes over it: each kernel reads its inputs from memory
// once and writes its output once. LayerNorm is memory-bound when its arithmetic keeps up, which
// takes several independent running sums per statistic (see row_sums).
// The forward keeps mean and rstd for the backward. The backward parallelises over rows too; each
// thread sums dw and db for its rows into its own partial, and the partials are added once at the end.

#include "layer_norm.h"

#include <tuple>

namespace fastgpt {
namespace {

template <typename scalar_t, typename out_t>
void layer_norm_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_t<scalar_t>;
  const int64_t n = x.size(-1);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const A *w = weight.data_ptr<A>(), *b = bias.data_ptr<A>();
  out_t* y_data = y.data_ptr<out_t>();
  A *mean_data = mean.data_ptr<A>(), *rstd_data = rstd.data_ptr<A>();
  for_each_row(x, [&](int64_t row, int64_t) {
    std::tie(mean_data[row], rstd_data[row]) = layer_norm_row(x_data + row * n, y_data + row * n, n, w, b, A(eps));
  });
}

// One row of the backward: dx, and the row's terms of dw and db added to the partials dw, db.
template <typename scalar_t, typename grad_t>
void layer_norm_backward_row(const scalar_t* x, const grad_t* dy, scalar_t* dx, int64_t n,
                             const acc_t<scalar_t>* w, acc_t<scalar_t> mean, acc_t<scalar_t> rstd,
                             acc_t<scalar_t>* dw, acc_t<scalar_t>* db) {
  using V = Vec<scalar_t>;
  const V mean_v(mean), rstd_v(rstd);
  // First pass: the two row means that dx needs. g = dy * w is 0 past the row's end.
  const auto [sum_g, sum_g_xhat] = row_sums<scalar_t, 2>(n, [&](int64_t j, int64_t count) {
    const V g = load(dy + j, count) * V::loadu(w + j, count);
    return std::array<V, 2>{g, g * ((load(x + j, count) - mean_v) * rstd_v)};
  });
  const V mean_g(sum_g / n), mean_g_xhat(sum_g_xhat / n);
  // Last pass (the row is still in L1): dx, and the row's share of dw and db.
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - j);
    const V dy_j = load(dy + j, count);
    const V xhat = (load(x + j, count) - mean_v) * rstd_v;
    store(dx + j, rstd_v * (dy_j * V::loadu(w + j, count) - mean_g - xhat * mean_g_xhat), count);
    at::vec::fmadd(dy_j, xhat, V::loadu(dw + j, count)).store(dw + j, count);
    (dy_j + V::loadu(db + j, count)).store(db + j, count);
  }
}

template <typename scalar_t, typename grad_t>
void layer_norm_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                                at::Tensor& dweight_partials, at::Tensor& dbias_partials) {
  using A = acc_t<scalar_t>;
  const int64_t n = x.size(-1);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const grad_t* dy_data = grad_y.data_ptr<grad_t>();
  const A *w = weight.data_ptr<A>(), *mean_data = mean.data_ptr<A>(), *rstd_data = rstd.data_ptr<A>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  A *dw = dweight_partials.data_ptr<A>(), *db = dbias_partials.data_ptr<A>();
  for_each_row(x, [&](int64_t row, int64_t thread) {
    const int64_t offset = row * n;
    layer_norm_backward_row(x_data + offset, dy_data + offset, dx_data + offset, n, w, mean_data[row],
                            rstd_data[row], dw + thread * n, db + thread * n);
  });
}

void check_rows(const at::Tensor& x) {
  check_input(x, "layer_norm", "x");
  TORCH_CHECK(x.dim() >= 1, "fastgpt::layer_norm: expects at least one dimension");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps, c10::optional<at::ScalarType> out_dtype) {
  check_rows(x);
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.size(-1);
  const auto stats_options = x.options().dtype(accumulate_type(x));
  const at::Tensor w = affine_parameter(weight, n, 1.0, stats_options);
  const at::Tensor b = affine_parameter(bias, n, 0.0, stats_options);
  const auto wanted = out_dtype.value_or(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(paired_dtype(x.scalar_type(), wanted)));
  const auto row_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = at::empty(row_shape, stats_options), rstd = at::empty(row_shape, stats_options);
  dispatch_pair(x.scalar_type(), y.scalar_type(), "fastgpt::layer_norm_forward", [&](auto x_type, auto y_type) {
    layer_norm_forward_kernel<decltype(x_type), decltype(y_type)>(xc, w, b, eps, y, mean, rstd);
  });
  return {y.to(wanted), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(x);
  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = grad_y.to(paired_dtype(x.scalar_type(), grad_y.scalar_type())).contiguous();
  const int64_t n = x.size(-1);
  const auto acc_options = x.options().dtype(accumulate_type(x));
  const at::Tensor w = affine_parameter(weight, n, 1.0, acc_options);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dweight_partials = at::zeros({at::get_num_threads(), n}, acc_options);
  at::Tensor dbias_partials = at::zeros({at::get_num_threads(), n}, acc_options);
  dispatch_pair(x.scalar_type(), dyc.scalar_type(), "fastgpt::layer_norm_backward", [&](auto x_type, auto grad_type) {
    layer_norm_backward_kernel<decltype(x_type), decltype(grad_type)>(dyc, xc, w, mean.contiguous(),
                                                                      rstd.contiguous(), dx, dweight_partials,
                                                                      dbias_partials);
  });
  return {dx, dweight_partials.sum(0), dbias_partials.sum(0)};
}

// The CPU implementations of the op's kernels; their schemas are in fastgpt/ops/definitions/layer_norm.py.
TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_layer_norm_forward", &layer_norm_forward);
  m.impl("cpp_layer_norm_backward", &layer_norm_backward);
}

}  // namespace fastgpt
