// SwiGLU, the MLP activation of Llama's blocks, on the CPU, forward and backward, one element at a
// time. On x = [a, b], the gate a and the up projection b side by side in the last dimension (..., 2N),
// as one matrix product of the model computes them:
//
//   s = sigmoid(a) = 1 / (1 + exp(-a)),   y = silu(a) b = a s b                      (..., N)
//   da = dy b s (1 + a (1 - s)),   db = dy a s                                      (..., 2N) together
//
// Why a kernel for an elementwise function: PyTorch runs `F.silu(a) * b` as two passes over memory
// forward and, with the gradient of the split into a and b, four backward, each reading and writing
// whole tensors. Here it is one pass each way: every input element is read once and every output
// element written once, in fp32 (fp64 for fp64 input) whatever the storage type. Taking the gate and
// up halves as one tensor lets the backward write the gradient of that one matrix product's output
// directly, with no concatenation of da and db.

#include "common.h"

#include <vector>

namespace fastgpt {
namespace {

template <typename V>
inline V sigmoid(const V& a) {
  using A = typename V::value_type;
  const V one(A(1));
  return one / (one + a.neg().exp_u20());  // exp(-a) = inf for very negative a gives 0, as it should
}

// For each of `rows` rows of x (2N: gate, then up) and of y (N), calls body(gate, up, y, count) on
// each vector of the row's N columns.
template <typename scalar_t, typename Body>
inline void for_each_swiglu_vector(int64_t rows, int64_t n, const Body& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(n, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t row = begin; row < end; ++row) {
                       for_each_vector<scalar_t>(0, n, [&](int64_t j, int64_t count) { body(row, j, count); });
                     }
                   });
}

template <typename scalar_t>
void swiglu_forward_kernel(const scalar_t* x, scalar_t* y, int64_t rows, int64_t n) {
  using V = Vec<scalar_t>;
  for_each_swiglu_vector<scalar_t>(rows, n, [&](int64_t row, int64_t j, int64_t count) {
    const scalar_t* gate = x + row * 2 * n + j;
    const V a = load(gate, count), b = load(gate + n, count);
    store(y + row * n + j, a * sigmoid(a) * b, count);
  });
}

template <typename scalar_t>
void swiglu_backward_kernel(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, int64_t rows, int64_t n) {
  using V = Vec<scalar_t>;
  const V one(acc_t<scalar_t>(1));
  for_each_swiglu_vector<scalar_t>(rows, n, [&](int64_t row, int64_t j, int64_t count) {
    const scalar_t* gate = x + row * 2 * n + j;
    scalar_t* grad_gate = grad_x + row * 2 * n + j;
    const V a = load(gate, count), b = load(gate + n, count), dy = load(grad_y + row * n + j, count);
    const V s = sigmoid(a);
    store(grad_gate, dy * b * s * at::vec::fmadd(a, one - s, one), count);
    store(grad_gate + n, dy * a * s, count);
  });
}

// ---- Op entry points ---------------------------------------------------------------------------

// The shape of SwiGLU's output, (..., N), for x of shape (..., 2N).
std::vector<int64_t> swiglu_output_shape(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "fastgpt::", op,
              ": x must be (..., 2N), the gate and up halves side by side, got shape ", x.sizes());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() /= 2;
  return shape;
}

}  // namespace

at::Tensor swiglu_forward(const at::Tensor& x) {
  check_input(x, "swiglu_forward", "x");
  const std::vector<int64_t> shape = swiglu_output_shape(x, "swiglu_forward");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(shape, x.options());
  const int64_t n = shape.back(), rows = n == 0 ? 0 : y.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::swiglu_forward", [&] {
    swiglu_forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, n);
  });
  return y;
}

at::Tensor swiglu_backward(const at::Tensor& grad_y, const at::Tensor& x) {
  check_input(x, "swiglu_backward", "x");
  const std::vector<int64_t> shape = swiglu_output_shape(x, "swiglu_backward");
  check_gradient(grad_y, x, shape, "swiglu_backward");
  const at::Tensor xc = x.contiguous(), grad_yc = grad_y.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  const int64_t n = shape.back(), rows = n == 0 ? 0 : grad_yc.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::swiglu_backward", [&] {
    swiglu_backward_kernel<scalar_t>(grad_yc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                     grad_x.data_ptr<scalar_t>(), rows, n);
  });
  return grad_x;
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_swiglu_forward", &fastgpt::swiglu_forward);
  m.impl("cpp_swiglu_backward", &fastgpt::swiglu_backward);
}
