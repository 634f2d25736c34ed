// Pieces shared by the CPU kernels: the accumulation type, vector loads and stores that convert
// between a tensor's storage type and that accumulation type, and a row-major matrix product.
//
// Every kernel file is compiled once per instruction set (AVX-512, AVX2, none; see setup.py). The
// ISA is picked by the CPU_CAPABILITY macros that at::vec reads, so `Vec` below is 16 floats wide
// in the AVX-512 build, 8 in the AVX2 build and a plain array otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fastgpt {

// fp32 and bf16 inputs accumulate in fp32; fp64 (used by gradcheck) stays fp64.
template <typename scalar_t> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename scalar_t> using acc_t = typename AccumulateType<scalar_t>::type;

template <typename scalar_t> using Vec = at::vec::Vectorized<acc_t<scalar_t>>;

// Loads `count` (at most one vector's worth of) elements of `scalar_t` as an accumulation vector;
// missing lanes read as zero.
template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* data, int64_t count = Vec<scalar_t>::size()) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return Vec<scalar_t>::loadu(data, count);
  } else {
    // Reduced precision: widen through a half-filled vector of scalar_t (twice as many lanes).
    auto narrow = at::vec::Vectorized<scalar_t>::loadu(data, count);
    return std::get<0>(at::vec::convert_to_float<scalar_t>(narrow));
  }
}

// Stores the first `count` lanes of an accumulation vector as `scalar_t` (rounding to nearest even).
template <typename scalar_t>
inline void store(scalar_t* data, const Vec<scalar_t>& value, int64_t count = Vec<scalar_t>::size()) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    value.store(data, count);
  } else {
    at::vec::convert_from_float<scalar_t>(value, value).store(data, count);
  }
}

// A matrix in memory whose rows are `row_stride` elements apart and whose columns are adjacent: a
// (T, D) slice of a (B, H, T, D) tensor, whatever the strides of B, H and T.
template <typename T>
struct Rows {
  T* data;
  int64_t row_stride;
  T* row(int64_t i) const { return data + i * row_stride; }
};

// The matrix products come from the BLAS that libtorch_cpu exports (MKL in the official wheels).
// Its Fortran interface is column-major: a row-major C = A B is the column-major C^T = B^T A^T, so
// the operands are passed in swapped order.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b,
                         const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const double* alpha, const double* a, const int* lda, const double* b,
                         const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, where op(X) is X or X^T as `transpose_*`
// says, op(A) is m x k and op(B) is k x n; lda, ldb, ldc are the row strides of A, B and C as stored.
template <typename T>
inline void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = transpose_a ? 'T' : 'N', tb = transpose_b ? 'T' : 'N';
  const int mi = m, ni = n, ki = k, lda_i = lda, ldb_i = ldb, ldc_i = ldc;
  fortran_gemm(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
}

}  // namespace fastgpt
