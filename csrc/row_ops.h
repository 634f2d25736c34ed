// Vectorised operations on rows of numbers, shared by the kernels: the rows of a tensor split over
// threads, sums over a row, and the softmax pieces of the attention kernels (on rows of a tile), the
// cross-entropy (on rows of logits) and the fused decoding step (on one query's scores and weight rows).
#pragma once

#include "common.h"

#include <algorithm>
#include <array>
#include <limits>

namespace fastgpt {
// Internal linkage, as if each file that includes this had written it: the compiler inlines these
// as freely as a file's own functions, and no build's copy can stand in for another's (each
// instruction set's build holds its own).
namespace {

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

// The largest of x's n elements, in the accumulation type (x may be stored in bf16).
template <typename scalar_t>
acc_t<scalar_t> max_of(const scalar_t* x, int64_t n) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  const V lowest(-std::numeric_limits<A>::infinity());
  V best = lowest;
  for_each_vector<scalar_t>(0, n, [&](int64_t j, int64_t count) {
    best = at::vec::maximum(best, V::set(lowest, load(x + j, count), count));  // lanes past the end: -inf
  });
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a, b); }, best);
}

// x_j <- exp(x_j - shift) for j < visible and 0 for visible <= j < n; returns the sum. It reads whole
// vectors, so x must have room for n rounded up to a whole number of vectors. Only the vectors that
// hold visible scores are exponentiated: on the diagonal, about half of a row is in its future.
template <typename T>
T exponentiate_and_sum(T* x, int64_t visible, int64_t n, T shift) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0)), shift_v(shift);
  V total = zero;
  int64_t j = 0;
  for (; j < visible; j += V::size()) {
    const V e = V::set(zero, (V::loadu(x + j) - shift_v).exp_u20(), visible - j);
    e.store(x + j, std::min<int64_t>(V::size(), n - j));
    total += e;
  }
  for (; j < n; j += V::size()) zero.store(x + j, std::min<int64_t>(V::size(), n - j));
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, total);
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  using V = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - j);
    (V::loadu(x + j, count) * V(factor)).store(x + j, count);
  }
}

// The dot products of kRows rows (n elements each, consecutive in memory) with x.
template <typename T, int kRows>
std::array<T, kRows> dot_rows(const T* rows, int64_t n, const T* x) {
  using V = at::vec::Vectorized<T>;
  std::array<V, kRows> acc;
  acc.fill(V(T(0)));
  for_each_vector<T>(0, n, [&](int64_t i, int64_t count) {
    const V xv = V::loadu(x + i, count);  // lanes past n read as 0, so they add nothing
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[r] = at::vec::fmadd(V::loadu(rows + r * n + i, count), xv, acc[r]);
  });
  std::array<T, kRows> sums;
  for (int r = 0; r < kRows; ++r) {
    sums[r] = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc[r]);
  }
  return sums;
}

}  // namespace
}  // namespace fastgpt
