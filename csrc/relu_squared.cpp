// ReLU^2, the MLP activation of modded-nanogpt's blocks, on the CPU, forward and backward, one element
// at a time:
//
//   y = r^2,   dy/dx = 2 r,   where r = max(x, 0)
//
// Why a kernel for an elementwise function: PyTorch runs `F.relu(x).square()` as two passes over
// memory forward and three backward (the square's gradient, then the ReLU's), each reading and writing
// whole tensors. Here it is one pass each way: every input element is read once and every output
// element written once, in fp32 (fp64 for fp64 input) whatever the storage type.

#include "common.h"

namespace fastgpt {
namespace {

template <typename scalar_t>
void relu_squared_forward_kernel(const scalar_t* x, scalar_t* y, int64_t n) {
  using V = Vec<scalar_t>;
  const V zero(acc_t<scalar_t>(0));
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
    for_each_vector<scalar_t>(begin, end, [&](int64_t i, int64_t count) {
      const V r = at::vec::maximum(load(x + i, count), zero);  // NaN stays NaN, as in F.relu
      store(y + i, r * r, count);
    });
  });
}

template <typename scalar_t>
void relu_squared_backward_kernel(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, int64_t n) {
  using V = Vec<scalar_t>;
  const V zero(acc_t<scalar_t>(0)), two(acc_t<scalar_t>(2));
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
    for_each_vector<scalar_t>(begin, end, [&](int64_t i, int64_t count) {
      const V r = at::vec::maximum(load(x + i, count), zero);
      store(grad_x + i, two * r * load(grad_y + i, count), count);
    });
  });
}

struct ReluSquaredKernels {  // for elementwise_forward and elementwise_backward
  static constexpr const char* kName = "relu_squared";
  template <typename T> static void forward(const T* x, T* y, int64_t n) { relu_squared_forward_kernel(x, y, n); }
  template <typename T> static void backward(const T* grad_y, const T* x, T* grad_x, int64_t n) {
    relu_squared_backward_kernel(grad_y, x, grad_x, n);
  }
};

}  // namespace
}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_relu_squared_forward", &fastgpt::elementwise_forward<fastgpt::ReluSquaredKernels>);
  m.impl("cpp_relu_squared_backward", &fastgpt::elementwise_backward<fastgpt::ReluSquaredKernels>);
}
