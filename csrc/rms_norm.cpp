// RMSNorm over the last dimension on the CPU, forward and backward.
//
// For one row x of N numbers, with weight w (ones when there is none):
//
//   rstd = 1 / sqrt(sum_j x_j^2 / N + eps),   xhat_j = x_j * rstd,   y_j = xhat_j * w_j
//
// Backward, with dy the gradient of y and g_j = dy_j * w_j:
//
//   dx_j = rstd * (g_j - xhat_j * mean_k(g_k * xhat_k))
//   dw_j = sum over rows of dy_j * xhat_j
//
// (LayerNorm's formulas without the mean and the bias.) It is built the way layer_norm.cpp is, from
// the same row sums (layer_norm.h): statistics in fp32 (fp64 for fp64 input) whatever the storage
// type, y and its gradient in bf16 beside an fp32 x under autocast (see paired_dtype), one pass for
// the row's statistic and one that writes the output while the row is still in L1, rows split over
// threads, and in the backward each thread's dw terms summed into its own partial, the partials
// added once at the end (deterministic for a given number of threads).

#include "layer_norm.h"

#include <tuple>

namespace fastgpt {
namespace {

// One row of the forward: y = x * rstd * w; returns rstd.
template <typename scalar_t, typename out_t>
inline acc_t<scalar_t> rms_norm_row(const scalar_t* x, out_t* y, int64_t n, const acc_t<scalar_t>* w,
                                    acc_t<scalar_t> eps) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const auto [sum_squares] = row_sums<scalar_t, 1>(n, [&](int64_t j, int64_t count) {
    const V xj = load(x + j, count);  // lanes past the row's end load as 0
    return std::array<V, 1>{xj * xj};
  });
  const A rstd = A(1) / std::sqrt(sum_squares / n + eps);
  const V rstd_v(rstd);
  for_each_vector<scalar_t>(0, n, [&](int64_t j, int64_t count) {
    store(y + j, load(x + j, count) * rstd_v * V::loadu(w + j, count), count);
  });
  return rstd;
}

template <typename scalar_t, typename out_t>
void rms_norm_forward_kernel(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                             at::Tensor& rstd) {
  using A = acc_t<scalar_t>;
  const int64_t n = x.size(-1);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const A* w = weight.data_ptr<A>();
  out_t* y_data = y.data_ptr<out_t>();
  A* rstd_data = rstd.data_ptr<A>();
  for_each_row(x, [&](int64_t row, int64_t) {
    rstd_data[row] = rms_norm_row(x_data + row * n, y_data + row * n, n, w, A(eps));
  });
}

// One row of the backward: dx, and (when dw is not null) the row's terms of dw added to the partial dw.
template <typename scalar_t, typename grad_t>
inline void rms_norm_backward_row(const scalar_t* x, const grad_t* dy, scalar_t* dx, int64_t n,
                                  const acc_t<scalar_t>* w, acc_t<scalar_t> rstd, acc_t<scalar_t>* dw) {
  using V = Vec<scalar_t>;
  const V rstd_v(rstd);
  // sum_k g_k x_k, then mean_k(g_k * xhat_k) = rstd * that / N.
  const auto [sum_g_x] = row_sums<scalar_t, 1>(n, [&](int64_t j, int64_t count) {
    return std::array<V, 1>{load(dy + j, count) * V::loadu(w + j, count) * load(x + j, count)};
  });
  const V mean_g_xhat(sum_g_x * rstd / n);
  for_each_vector<scalar_t>(0, n, [&](int64_t j, int64_t count) {
    const V dy_j = load(dy + j, count);
    const V xhat = load(x + j, count) * rstd_v;
    store(dx + j, rstd_v * (dy_j * V::loadu(w + j, count) - xhat * mean_g_xhat), count);
    if (dw != nullptr) at::vec::fmadd(dy_j, xhat, V::loadu(dw + j, count)).store(dw + j, count);
  });
}

template <typename scalar_t, typename grad_t>
void rms_norm_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dweight_partials) {
  using A = acc_t<scalar_t>;
  const int64_t n = x.size(-1);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const grad_t* dy_data = grad_y.data_ptr<grad_t>();
  const A *w = weight.data_ptr<A>(), *rstd_data = rstd.data_ptr<A>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  A* dw = dweight_partials.defined() ? dweight_partials.data_ptr<A>() : nullptr;  // none without a weight
  for_each_row(x, [&](int64_t row, int64_t thread) {
    const int64_t offset = row * n;
    rms_norm_backward_row(x_data + offset, dy_data + offset, dx_data + offset, n, w, rstd_data[row],
                          dw == nullptr ? nullptr : dw + thread * n);
  });
}

void check_rows(const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  check_input(x, "rms_norm", "x");
  TORCH_CHECK(x.dim() >= 1, "fastgpt::rms_norm: expects at least one dimension");
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == x.size(-1)),
              "fastgpt::rms_norm: weight must have shape (", x.size(-1), "), the size of x's last dimension");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps, std::optional<at::ScalarType> out_dtype) {
  check_rows(x, weight);
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.size(-1);
  const auto acc_options = x.options().dtype(accumulate_type(x));
  const at::Tensor w = affine_parameter(weight, n, 1.0, acc_options);
  const auto wanted = out_dtype.value_or(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(paired_dtype(x.scalar_type(), wanted)));
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), acc_options);
  dispatch_pair(x.scalar_type(), y.scalar_type(), "fastgpt::rms_norm_forward", [&](auto x_type, auto y_type) {
    rms_norm_forward_kernel<decltype(x_type), decltype(y_type)>(xc, w, eps, y, rstd);
  });
  return {y.to(wanted), rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd) {
  check_rows(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "fastgpt::rms_norm_backward: grad_y has shape ", grad_y.sizes(),
              ", x has ", x.sizes());
  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = grad_y.to(paired_dtype(x.scalar_type(), grad_y.scalar_type())).contiguous();
  const int64_t n = x.size(-1);
  const auto acc_options = x.options().dtype(accumulate_type(x));
  const at::Tensor w = affine_parameter(weight, n, 1.0, acc_options);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  // Without a weight there is no dweight to sum (and an empty one is returned).
  at::Tensor dweight_partials = weight.has_value() ? at::zeros({at::get_num_threads(), n}, acc_options) : at::Tensor();
  const at::Tensor rstdc = rstd.to(accumulate_type(x)).contiguous();
  dispatch_pair(x.scalar_type(), dyc.scalar_type(), "fastgpt::rms_norm_backward", [&](auto x_type, auto grad_type) {
    rms_norm_backward_kernel<decltype(x_type), decltype(grad_type)>(dyc, xc, w, rstdc, dx, dweight_partials);
  });
  return {dx, weight.has_value() ? dweight_partials.sum(0) : at::empty({0}, acc_options)};
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_rms_norm_forward", &fastgpt::rms_norm_forward);
  m.impl("cpp_rms_norm_backward", &fastgpt::rms_norm_backward);
}
