// Rotary position embeddings on the CPU (the Hugging Face Llama convention), forward and backward.
//
// x is (B, H, T, D) with D even; row t holds position p = offset + t. Channel i < D/2 is paired with
// channel i + D/2, and the pair is rotated by the angle p * theta_i, theta_i = base^(-2i / D):
//
//   y_i       = x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i)
//   y_{i+D/2} = x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)
//
// A rotation's transpose is the rotation by the opposite angle, so the backward is the same kernel
// with sin negated: dx_i = dy_i cos + dy_{i+D/2} sin, dx_{i+D/2} = dy_{i+D/2} cos - dy_i sin.
//
// The angles: each call builds a table of cos and sin for its T positions and D/2 frequencies. The
// angle p * theta_i is formed in fp64 (in fp32 it would be off by up to p * 2^-24 radians, 0.5 mrad at
// position 8192) and its cos and sin taken in fp64 with ATen's vectorised functions (SLEEF's in the
// AVX builds), then rounded to the accumulation type. The table costs T * D/2 of those, against B * H * T * D/2 pair
// rotations that use it, and it stays in cache while every (batch, head) reads it. It is built per
// call, not kept between calls: it is a small fraction of the work (1 / (B * H)), and a kept table would
// need a key (positions, D, base) and a lock for the threads of several callers.
//
// The rows may be any (batch, head, position) strides, as long as the D channels of a row are adjacent:
// the (B, T, H, D) -> (B, H, T, D) transposed views the model makes are read in place, and the output
// is laid out as the input is (as PyTorch's elementwise operations do).

#include "common.h"

#include <cmath>

namespace fastgpt {
namespace {


// cos(p * theta_i) and sign * sin(p * theta_i) for p = offset .. offset + rows - 1 and i < half, as a
// (2, rows, half) tensor in the accumulation type of `options`.
at::Tensor rotation_table(int64_t offset, int64_t rows, int64_t half, double base, double sign,
                          const at::TensorOptions& options) {
  at::Tensor table = at::empty({2, rows, half}, options);
  std::vector<double> theta(half);
  for (int64_t i = 0; i < half; ++i) theta[i] = std::pow(base, -2.0 * static_cast<double>(i) / (2 * half));
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "fastgpt::rotation_table", [&] {
    using V = at::vec::Vectorized<double>;
    scalar_t* cos_data = table.data_ptr<scalar_t>();
    scalar_t* sin_data = cos_data + rows * half;
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementsPerTask / (8 * half)), [&](int64_t begin, int64_t end) {
      double angle[V::size()], cosines[V::size()], sines[V::size()];
      for (int64_t t = begin; t < end; ++t) {
        const double position = static_cast<double>(offset + t);
        for (int64_t i = 0; i < half; i += V::size()) {
          const int64_t count = std::min<int64_t>(V::size(), half - i);
          for (int64_t l = 0; l < count; ++l) angle[l] = position * theta[i + l];
          const V a = V::loadu(angle, count);
          a.cos().store(cosines, count);
          (a.sin() * V(sign)).store(sines, count);
          std::copy_n(cosines, count, cos_data + t * half + i);
          std::copy_n(sines, count, sin_data + t * half + i);
        }
      }
    });
  });
  return table;
}

// Rotates every row of x (rows of D = 2 * half channels at the given strides) into y by the table.
template <typename scalar_t>
void rotate_kernel(const at::Tensor& x, at::Tensor& y, const at::Tensor& table) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const int64_t heads = x.size(1), t_len = x.size(2), half = x.size(3) / 2;
  const int64_t rows = x.size(0) * heads * t_len;
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const A* cos_table = table.data_ptr<A>();
  const A* sin_table = cos_table + t_len * half;
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2);
  const int64_t yb = y.stride(0), yh = y.stride(1), yt = y.stride(2);
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementsPerTask / (2 * half)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * t_len), h = row / t_len % heads, p = row % t_len;
      const scalar_t* x_first = x_data + b * xb + h * xh + p * xt;  // channels 0 .. D/2 - 1
      const scalar_t* x_second = x_first + half;                     // channels D/2 .. D - 1
      scalar_t* y_first = y_data + b * yb + h * yh + p * yt;
      scalar_t* y_second = y_first + half;
      const A* cos_row = cos_table + p * half;
      const A* sin_row = sin_table + p * half;
      for_each_vector<scalar_t>(0, half, [&](int64_t i, int64_t count) {
        const V c = V::loadu(cos_row + i, count), s = V::loadu(sin_row + i, count);
        const V first = load(x_first + i, count), second = load(x_second + i, count);
        store(y_first + i, at::vec::fmsub(first, c, second * s), count);
        store(y_second + i, at::vec::fmadd(second, c, first * s), count);
      });
    }
  });
}

at::Tensor rotate(const at::Tensor& x, int64_t offset, double base, double sign, const char* op) {
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 4, "fastgpt::", op, ": expects a (B, H, T, D) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, "fastgpt::", op, ": the head dimension must be even, got ", x.size(3));
  TORCH_CHECK(base > 0, "fastgpt::", op, ": base must be positive, got ", base);
  // The kernel's vector loads need a row's channels adjacent; any other strides are read in place.
  const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (x.numel() == 0) return y;
  const at::Tensor table = rotation_table(offset, x.size(2), x.size(3) / 2, base, sign,
                                          x.options().dtype(accumulate_type(x)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::rotary",
                                 [&] { rotate_kernel<scalar_t>(xc, y, table); });
  return y;
}

}  // namespace

at::Tensor rotary_forward(const at::Tensor& x, int64_t offset, double base) {
  return rotate(x, offset, base, 1.0, "rotary_forward");
}

at::Tensor rotary_backward(const at::Tensor& grad_y, int64_t offset, double base) {
  return rotate(grad_y, offset, base, -1.0, "rotary_backward");
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_rotary_forward", &fastgpt::rotary_forward);
  m.impl("cpp_rotary_backward", &fastgpt::rotary_backward);
}
