// GELU with GPT-2's tanh approximation on the CPU: the backward kernel and the torch ops. The math,
// and why fastgpt has its own GELU kernel, are in gelu.h, with the forward kernel.

#include "gelu.h"

namespace fastgpt {
namespace {

template <typename scalar_t>
void gelu_backward_kernel(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, int64_t n) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const V c(static_cast<A>(kSqrt2OverPi)), a(static_cast<A>(kCubic)), three_a(static_cast<A>(3 * kCubic));
  const V half(A(0.5)), one(A(1));
  at::parallel_for(0, n, kGeluElementsPerTask, [&](int64_t begin, int64_t end) {
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

// The CPU implementations of the op's kernels; their schemas are in fastgpt/ops/definitions/gelu.py.
TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_gelu_forward", &gelu_forward);
  m.impl("cpp_gelu_backward", &gelu_backward);
}

}  // namespace fastgpt
