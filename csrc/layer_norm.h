// The row-level pieces of the CPU LayerNorm (the math is in layer_norm.cpp): vectorised sums over
// a row, and the forward of one row, which the fused decoding step (decode.cpp) applies too.
#pragma once

#include "common.h"

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

// Rows per task: enough to amortise scheduling, few enough to balance two threads on small inputs.
constexpr int64_t kRowsPerTask = 16;

// Calls row_body(row, thread) for each row of x (a row: x's last dimension), the rows split over
// threads; `thread` (at::get_thread_num) lets a backward add each row's terms of the parameters'
// gradients to its own thread's partial sums, which are added once at the end (deterministic for
// a given number of threads).
template <typename RowBody>
inline void for_each_row(const at::Tensor& x, const RowBody& row_body) {
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    for (int64_t row = begin; row < end; ++row) row_body(row, thread);
  });
}

// The sums over a row of n elements of the K vectors term(j, count) returns (an array of K vectors
// for elements j .. j + count - 1, which must be 0 in the lanes past the row's end). Each sum is kept
// as two running sums over alternating vectors: a vector add waits for the one before it to finish
// (3-4 cycles), and with a single running sum per statistic these passes, not memory, bounded the
// speed of the kernels. The order of additions changes only the rounding.
template <typename scalar_t, size_t K, typename Term>
inline std::array<acc_t<scalar_t>, K> row_sums(int64_t n, const Term& term) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int64_t W = V::size();
  std::array<V, K> even, odd;
  even.fill(V(A(0)));
  odd.fill(V(A(0)));
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const std::array<V, K> a = term(j, W), b = term(j + W, W);
    for (size_t k = 0; k < K; ++k) {
      even[k] += a[k];
      odd[k] += b[k];
    }
  }
  for (; j < n; j += W) {  // at most two vectors left, the last one partial
    const std::array<V, K> a = term(j, std::min<int64_t>(W, n - j));
    for (size_t k = 0; k < K; ++k) even[k] += a[k];
  }
  std::array<A, K> sums;
  for (size_t k = 0; k < K; ++k) {
    sums[k] = at::vec::vec_reduce_all<A>([](auto& x, auto& y) { return x + y; }, even[k] + odd[k]);
  }
  return sums;
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
