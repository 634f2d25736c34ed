// Cross-entropy of each row of logits against its target class on the CPU, forward and backward.
//
// For a row x of V logits and its target t:
//
//   m = max_j x_j,   lse = m + log(sum_j exp(x_j - m)),   loss = lse - x_t
//   dx_j = g * (exp(x_j - lse) - [j = t])        (g: the gradient of the row's loss)
//
// in fp32 (fp64 for fp64 logits) whatever the logits' storage type (fastgpt/ops/definitions/
// cross_entropy.py has the derivation). The forward reads a row twice, for its max and then for the
// sum of exponentials (by then the row is in L1), and writes two numbers per row; the backward reads
// the row once more and writes dx in the logits' dtype. Rows are split over threads.

#include "row_ops.h"

#include <cmath>
#include <tuple>

namespace fastgpt {
namespace {

// log(sum_j exp(x_j)) of one row, with the max taken out so that no exponential overflows.
template <typename scalar_t>
inline acc_t<scalar_t> log_sum_exp(const scalar_t* x, int64_t n) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const A m = max_of(x, n);
  if (std::isinf(m)) return m;  // every logit -inf, or one +inf: so is the lse
  const V m_v(m), zero(A(0));
  const auto [sum] = row_sums<scalar_t, 1>(n, [&](int64_t j, int64_t count) {
    return std::array<V, 1>{V::set(zero, (load(x + j, count) - m_v).exp_u20(), count)};
  });
  return m + std::log(sum);
}

template <typename scalar_t>
void cross_entropy_forward_kernel(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& loss,
                                  at::Tensor& lse) {
  using A = acc_t<scalar_t>;
  const int64_t n = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const int64_t* t = targets.data_ptr<int64_t>();
  A *loss_data = loss.data_ptr<A>(), *lse_data = lse.data_ptr<A>();
  for_each_row(logits, [&](int64_t row, int64_t) {
    const scalar_t* x_row = x + row * n;
    const A row_lse = log_sum_exp(x_row, n);
    lse_data[row] = row_lse;
    loss_data[row] = row_lse - static_cast<A>(x_row[t[row]]);
  });
}

// One row of the backward: dx = g * softmax(x), then the target's element less g.
template <typename scalar_t>
inline void cross_entropy_backward_row(const scalar_t* x, scalar_t* dx, int64_t n, int64_t target,
                                       acc_t<scalar_t> lse, acc_t<scalar_t> g) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const V lse_v(lse), g_v(g);
  for_each_vector<scalar_t>(0, n, [&](int64_t j, int64_t count) {
    store(dx + j, (load(x + j, count) - lse_v).exp_u20() * g_v, count);
  });
  // Computed again rather than read back from dx, which may hold it rounded to bf16.
  dx[target] = static_cast<scalar_t>((std::exp(static_cast<A>(x[target]) - lse) - A(1)) * g);
}

template <typename scalar_t>
void cross_entropy_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& lse, at::Tensor& dx) {
  using A = acc_t<scalar_t>;
  const int64_t n = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const int64_t* t = targets.data_ptr<int64_t>();
  const A *g = grad_loss.data_ptr<A>(), *lse_data = lse.data_ptr<A>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  for_each_row(logits, [&](int64_t row, int64_t) {
    cross_entropy_backward_row(x + row * n, dx_data + row * n, n, t[row], lse_data[row], g[row]);
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  check_input(logits, "cross_entropy", "logits");
  TORCH_CHECK(targets.device().is_cpu(), "fastgpt::cross_entropy: expects CPU tensors, got targets on ",
              targets.device());
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "fastgpt::cross_entropy: expects logits (N, V) and targets (N,), got ", logits.sizes(), " and ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "fastgpt::cross_entropy: targets must be int64, got ",
              targets.scalar_type());
  // A target outside [0, V) would index outside its row, forward and backward.
  if (targets.numel() > 0) {
    const auto [min_target, max_target] = at::aminmax(targets);
    const int64_t lowest = min_target.item<int64_t>(), highest = max_target.item<int64_t>();
    TORCH_CHECK(lowest >= 0 && highest < logits.size(1),
                "fastgpt::cross_entropy: targets must be class indices in [0, ", logits.size(1), "), got values from ",
                lowest, " to ", highest);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets) {
  check_inputs(logits, targets);
  const at::Tensor x = logits.contiguous(), t = targets.contiguous();
  const auto acc_options = logits.options().dtype(accumulate_type(logits));
  at::Tensor loss = at::empty({logits.size(0)}, acc_options), lse = at::empty({logits.size(0)}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::cross_entropy_forward", [&] {
    cross_entropy_forward_kernel<scalar_t>(x, t, loss, lse);
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse) {
  check_inputs(logits, targets);
  TORCH_CHECK(grad_loss.sizes() == targets.sizes() && lse.sizes() == targets.sizes(),
              "fastgpt::cross_entropy_backward: grad_loss ", grad_loss.sizes(), " and lse ", lse.sizes(),
              " must have one value per row (", targets.size(0), ")");
  const at::Tensor x = logits.contiguous(), t = targets.contiguous();
  // The gradient of a mean comes expanded (stride 0): made a real vector of N numbers.
  const at::Tensor g = grad_loss.to(accumulate_type(logits)).contiguous();
  const at::Tensor lse_c = lse.to(accumulate_type(logits)).contiguous();
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::cross_entropy_backward", [&] {
    cross_entropy_backward_kernel<scalar_t>(g, x, t, lse_c, dx);
  });
  return dx;
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_cross_entropy_forward", &fastgpt::cross_entropy_forward);
  m.impl("cpp_cross_entropy_backward", &fastgpt::cross_entropy_backward);
}
