// The row-level pieces of the CPU LayerNorm (the math is in layer_norm.cpp): vectorised sums over
// a row, and the forward of one row, which the fused decoding step (decode.cpp) applies too.
#pragma once

#include "common.h"
#include "row_ops.h"  // for_each_row, row_sums

#include <array>
#include <cmath>
#include <utility>

namespace fastgpt {
// Internal linkage, as if each file that includes this had written it: the compiler inlines these
// as freely as a file's own functions, and no build's copy can stand in for another's
// (each instruction set's build holds its own).
namespace {

// The norms read or write one tensor beside x in a dtype of its own: under autocast, y in bf16 beside
// an fp32 x (the norm's output feeds bf16 matrix products), and y's gradient, which comes back in
// bf16. Kernels exist for any mix of fp32 and bf16; another pair is converted to x's dtype by the
// caller, which `paired_dtype` tells.
inline bool fp32_and_bf16(at::ScalarType a, at::ScalarType b) {
  return (a == at::kFloat && b == at::kBFloat16) || (a == at::kBFloat16 && b == at::kFloat);
}

inline at::ScalarType paired_dtype(at::ScalarType x_dtype, at::ScalarType wanted) {
  return wanted == x_dtype || fp32_and_bf16(x_dtype, wanted) ? wanted : x_dtype;
}

// Calls body(x_type{}, other_type{}) with values of x's storage type and of the other tensor's, a
// pair that paired_dtype allows.
template <typename Body>
void dispatch_pair(at::ScalarType x_dtype, at::ScalarType other, const char* name, const Body& body) {
  if (x_dtype == at::kFloat && other == at::kBFloat16) return body(float{}, at::BFloat16{});
  if (x_dtype == at::kBFloat16 && other == at::kFloat) return body(at::BFloat16{}, float{});
  TORCH_CHECK(other == x_dtype, name, ": no kernel for ", other, " beside ", x_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_dtype, "fastgpt::norm", [&] { body(scalar_t{}, scalar_t{}); });
}

// A norm's weight or bias in the accumulation type; a missing one is the identity (fill: ones, zeros).
inline at::Tensor affine_parameter(const c10::optional<at::Tensor>& p, int64_t n, double fill,
                                   const at::TensorOptions& options) {
  return p.has_value() ? p->to(options.dtype()).contiguous() : at::full({n}, fill, options);
}

template <typename scalar_t>
inline acc_t<scalar_t> sum_of(const scalar_t* x, int64_t n) {
  using V = Vec<scalar_t>;
  return row_sums<scalar_t, 1>(n, [&](int64_t j, int64_t count) { return std::array<V, 1>{load(x + j, count)}; })[0];
}

template <typename scalar_t>
inline acc_t<scalar_t> sum_of_squared_deviations(const scalar_t* x, int64_t n, acc_t<scalar_t> mean) {
  using V = Vec<scalar_t>;
  return row_sums<scalar_t, 1>(n, [&](int64_t j, int64_t count) {
    // Lanes past the row's end load as 0: mask them so they add nothing.
    const V deviation = V::set(V(acc_t<scalar_t>(0)), load(x + j, count) - V(mean), count);
    return std::array<V, 1>{deviation * deviation};
  })[0];
}

// The row functions below take plain values, not the captures of the parallel_for lambda: a vector
// store may alias anything (the intrinsics' types are declared so), and after each one the
// compiler would reload every captured pointer and length from memory.

// One row of the forward: y = (x - mean) * rstd * w + b; returns {mean, rstd}.
template <typename scalar_t, typename out_t>
inline std::pair<acc_t<scalar_t>, acc_t<scalar_t>> layer_norm_row(const scalar_t* x, out_t* y, int64_t n,
                                                           const acc_t<scalar_t>* w, const acc_t<scalar_t>* b,
                                                           acc_t<scalar_t> eps) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const A mean = sum_of(x, n) / n;
  const A rstd = A(1) / std::sqrt(sum_of_squared_deviations(x, n, mean) / n + eps);
  const V mean_v(mean), rstd_v(rstd);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - j);
    const V xhat = (load(x + j, count) - mean_v) * rstd_v;
    store(y + j, at::vec::fmadd(xhat, V::loadu(w + j, count), V::loadu(b + j, count)), count);
  }
  return {mean, rstd};
}

}  // namespace
}  // namespace fastgpt
