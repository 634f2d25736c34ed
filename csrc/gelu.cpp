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

struct GeluKernels {  // for elementwise_forward and elementwise_backward
  static constexpr const char* kName = "gelu";
  template <typename T> static void forward(const T* x, T* y, int64_t n) { gelu_forward_kernel(x, y, n); }
  template <typename T> static void backward(const T* grad_y, const T* x, T* grad_x, int64_t n) {
    gelu_backward_kernel(grad_y, x, grad_x, n);
  }
};

}  // namespace

// The CPU implementations of the op's kernels; their schemas are in fastgpt/ops/definitions/gelu.py.
TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_gelu_forward", &elementwise_forward<GeluKernels>);
  m.impl("cpp_gelu_backward", &elementwise_backward<GeluKernels>);
}

}  // namespace fastgpt
