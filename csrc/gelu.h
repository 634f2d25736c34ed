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
//
// This header holds the forward, which the fused decoding step (decode.cpp) applies too; gelu.cpp
// holds the backward and the torch ops.
#pragma once

#include "common.h"

namespace fastgpt {
// Internal linkage, as if each file that includes this had written it: the compiler inlines these
// as freely as a file's own functions, and no build's copy can stand in for another's
// (each instruction set's build holds its own).
namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCubic = 0.044715;

template <typename V>
inline V tanh_via_exp(const V& u) {
  using A = typename V::value_type;
  const V one(A(1)), two(A(2));
  return one - two / ((two * u).exp_u20() + one);
}

// y = gelu(x) for n elements; y may be x.
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

}  // namespace
}  // namespace fastgpt
