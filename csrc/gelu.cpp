// GELU with GPT-2's tanh approximation on the CPU, forward and backward, one element at a time:
//
//   u = c (x + a x^3),   c = sqrt(2 / pi),   a = 0.044715
//   y = x (1 + tanh u) / 2
//   dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) c (1 + 3 a x^2) / 2
//
// Why a kernel for an elementwise function: PyTorch's CPU GELU computes tanh with a library tanh
// that takes several times as long as the surrounding arithmetic, and in the default model the MLP's
// GELU, forward and backward, was a tenth of a training step. Here tanh u = 1 - 2 / (exp(2u) + 1),
// with the vectorised exp that ATen's own softmax uses (exp_u20, within 20 units in the last place).
// The identity saturates correctly: exp(2u) overflowing to infinity gives tanh u = 1, and
// underflowing to 0 gives -1. Near u = 0 it loses relative precision in tanh u, but y adds x / 2 to
// x tanh(u) / 2, so y keeps an error of a few units in the last place of x.
//
// Each element is read once and written once, in fp32 (fp64 for fp64 input) whatever the storage
// type. Work is split over threads in chunks large enough to be worth waking a thread for.

#include "common.h"

#include <cmath>

namespace fastgpt {
namespace {

constexpr int64_t kElementsPerTask = 1 << 14;
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCubic = 0.044715;

template <typename V>
V tanh_via_exp(const V& u) {
  using A = typename V::value_type;
  const V one(A(1)), two(A(2));
  return one - two / ((two * u).exp_u20() + one);
}

// Calls body(i, count) for the vectors of [begin, end): whole vectors (count = the vector width, which
// the compiler sees, so loads and stores are not masked), then one partial vector for the tail.
template <typename scalar_t, typename Body>
inline void for_each_vector(int64_t begin, int64_t end, const Body& body) {
  constexpr int64_t W = Vec<scalar_t>::size();
  int64_t i = begin;
  for (; i + W <= end; i += W) body(i, W);
  if (i < end) body(i, end - i);
}

template <typename scalar_t>
void gelu_forward_kernel(const scalar_t* x, scalar_t* y, int64_t n) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const V c(static_cast<A>(kSqrt2OverPi)), a(static_cast<A>(kCubic)), half(A(0.5)), one(A(1));
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
    for_each_vector<scalar_t>(begin, end, [&](int64_t i, int64_t count) {
      const V xv = load(x + i, count);
      const V t = tanh_via_exp(c * at::vec::fmadd(a * xv, xv * xv, xv));
      store(y + i, half * xv * (one + t), count);
    });
  });
}

template <typename scalar_t>
void gelu_backward_kernel(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, int64_t n) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const V c(static_cast<A>(kSqrt2OverPi)), a(static_cast<A>(kCubic)), three_a(static_cast<A>(3 * kCubic));
  const V half(A(0.5)), one(A(1));
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
    for_each_vector<scalar_t>(begin, end, [&](int64_t i, int64_t count) {
      const V xv = load(x + i, count);
      const V x2 = xv * xv;
      const V t = tanh_via_exp(c * at::vec::fmadd(a * xv, x2, xv));
      const V du_dx = c * at::vec::fmadd(three_a, x2, one);
      const V dy_dx = half * at::vec::fmadd(xv * (one - t * t), du_dx, one + t);
      store(grad_x + i, load(grad_y + i, count) * dy_dx, count);
    });
  });
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastgpt::gelu: expects CPU tensors, got ", name, " on ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble,
              "fastgpt::gelu: supports float32, bfloat16 and float64, got ", dtype, " for ", name);
}

}  // namespace

at::Tensor gelu_forward(const at::Tensor& x) {
  check_input(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::gelu_forward", [&] {
    gelu_forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.numel());
  });
  return y;
}

at::Tensor gelu_backward(const at::Tensor& grad_y, const at::Tensor& x) {
  check_input(x, "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "fastgpt::gelu_backward: grad_y must have x's shape and dtype");
  const at::Tensor xc = x.contiguous(), grad_yc = grad_y.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::gelu_backward", [&] {
    gelu_backward_kernel<scalar_t>(grad_yc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                   grad_x.data_ptr<scalar_t>(), xc.numel());
  });
  return grad_x;
}

}  // namespace fastgpt
