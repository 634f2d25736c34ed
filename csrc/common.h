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
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastgpt {

// fp32 and bf16 inputs accumulate in fp32; fp64 (used by gradcheck) stays fp64.
template <typename scalar_t> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename scalar_t> using acc_t = typename AccumulateType<scalar_t>::type;

// The same choice for a tensor at run time: the dtype of the statistics and parameter gradients an
// op returns, and of the scratch it computes in.
inline at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t> using Vec = at::vec::Vectorized<acc_t<scalar_t>>;

// Elements per task of the elementwise kernels: enough to be worth waking a thread for.
constexpr int64_t kElementsPerTask = 1 << 14;

// A whole fp32 vector's worth of bf16 values, widened or rounded (to nearest even) with the
// instruction set's own conversions: a bf16 is the upper half of an fp32. ATen's Vectorized<BFloat16>
// holds twice as many lanes as a float vector, so converting one float vector through it would
// convert twice the lanes needed (GELU's bf16 kernels take 9% longer that way). Each build names its
// registers: a float vector, and the integer one that holds as many bf16 values.
#if defined(CPU_CAPABILITY_AVX512)
using FloatRegister = __m512;
using BF16Register = __m256i;
inline BF16Register load_bf16_register(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store_bf16_register(void* p, BF16Register v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
using FloatRegister = __m256;
using BF16Register = __m128i;
inline BF16Register load_bf16_register(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void store_bf16_register(void* p, BF16Register v) { _mm_storeu_si128(static_cast<__m128i*>(p), v); }
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kWholeVectorBF16 = true;
inline at::vec::Vectorized<float> widen_vector(const c10::BFloat16* data) {
  FloatRegister widened;
  at::vec::cvtbf16_fp32(load_bf16_register(data), widened);
  return widened;
}
inline void narrow_vector(c10::BFloat16* data, const at::vec::Vectorized<float>& value) {
  store_bf16_register(data, at::vec::cvtfp32_bf16(FloatRegister(value)));
}
#else
constexpr bool kWholeVectorBF16 = false;
#endif

// Loads `count` (at most one vector's worth of) elements of `scalar_t` as an accumulation vector;
// missing lanes read as zero.
template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* data, int64_t count = Vec<scalar_t>::size()) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return Vec<scalar_t>::loadu(data, count);
  } else {
    if constexpr (kWholeVectorBF16) {
      if (count == Vec<scalar_t>::size()) return widen_vector(data);
    }
    // A partial vector: through a half-filled vector of scalar_t, which loads only `count` lanes.
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
    if constexpr (kWholeVectorBF16) {
      if (count == Vec<scalar_t>::size()) return narrow_vector(data, value);
    }
    at::vec::convert_from_float<scalar_t>(value, value).store(data, count);
  }
}

// Calls body(i, count) for the vectors of [begin, end): whole vectors (count = the vector width, which
// the compiler sees, so loads and stores are not masked), then one partial vector for the tail.
template <typename scalar_t, typename Body>
inline void for_each_vector(int64_t begin, int64_t end, const Body& body) {
  constexpr int64_t W = Vec<scalar_t>::size();
  int64_t i = begin;
  for (; i + W <= end; i += W) body(i, W);
  if (i < end) body(i, end - i);
}

// A matrix in memory whose rows are `row_stride` elements apart and whose columns are adjacent: a
// (T, D) slice of a (B, H, T, D) tensor, whatever the strides of B, H and T.
template <typename T>
struct Rows {
  T* data;
  int64_t row_stride;
  T* row(int64_t i) const { return data + i * row_stride; }
};

// ---- Small matrix products -----------------------------------------------------------------------
//
// The attention tiles are small (at most 64 x 256 x D): BLAS spends much of its time packing them,
// and the BLAS in torch's wheels runs AVX2 code on AMD CPUs. This is the textbook register-blocked kernel
// instead: C (m x n) = alpha * A B (+ C), computed in tiles of kTileRows x (kTileVecs vectors),
// whose accumulators stay in registers while p runs over the shared dimension:
//
//   acc[r][v] += broadcast(A(r, p)) * B(p, v-th vector of columns)
//
// A is read one element at a time, so it may be stored either way round: A(r, p) is
// a[r * a_row_stride + p * a_col_stride], and a transposed operand is the same kernel with the two
// strides swapped. B is read by rows, which must be contiguous (the caller transposes if need be).

// Four rows divide the attention kernels' 64-row blocks evenly, and on the diagonal, where a group
// of rows is computed up to the keys its last row sees, smaller groups compute fewer masked scores.
// (With AVX-512, 4 x 4 tiles measured 2-4% faster than 6 x 4 on attention forward and backward. With
// AVX2, 6 x 2 tiles made attention forward and backward 2% faster at T = 128 and D = 32, but the
// forward 15-20% slower at T = 1024 and D = 64, on a Xeon limited to AVX2.)
constexpr int kTileRows = 4;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileVecs = 4;  // 16 accumulators of the 32 vector registers
#else
constexpr int kTileVecs = 2;  // 8 accumulators of the 16 vector registers
#endif

template <typename T, int kRows, int kVecs, bool kFullWidth>
inline void matmul_tile(int64_t cols, int64_t depth, T alpha, const T* a, int64_t a_row_stride,
                        int64_t a_col_stride, const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V(T(0));
  for (int64_t p = 0; p < depth; ++p) {
    V b_row[kVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      b_row[v] = kFullWidth ? V::loadu(b + p * ldb + v * W)
                            : V::loadu(b + p * ldb + v * W, std::min<int64_t>(cols - v * W, W));
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V a_rp(a[r * a_row_stride + p * a_col_stride]);
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) acc[r][v] = at::vec::fmadd(a_rp, b_row[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      const int64_t count = kFullWidth ? W : std::clamp<int64_t>(cols - v * W, 0, W);
      if (count == 0) continue;
      T* out = c + r * ldc + v * W;
      V result = acc[r][v] * V(alpha);
      if (accumulate) result = result + V::loadu(out, count);
      result.store(out, count);
    }
  }
}

// One column tile for every row: full tiles of kTileRows rows, then one tile for the leftover rows.
template <typename T, int kVecs, bool kFullWidth>
inline void matmul_column_tile(int64_t rows, int64_t cols, int64_t depth, T alpha, const T* a,
                               int64_t a_row_stride, int64_t a_col_stride, const T* b, int64_t ldb,
                               T* c, int64_t ldc, bool accumulate) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) {
    matmul_tile<T, kTileRows, kVecs, kFullWidth>(cols, depth, alpha, a + r * a_row_stride, a_row_stride,
                                                 a_col_stride, b, ldb, c + r * ldc, ldc, accumulate);
  }
  const auto rest = [&](auto rows_left) {
    matmul_tile<T, decltype(rows_left)::value, kVecs, kFullWidth>(
        cols, depth, alpha, a + r * a_row_stride, a_row_stride, a_col_stride, b, ldb, c + r * ldc, ldc, accumulate);
  };
  static_assert(kTileRows == 4, "the leftover rows are dispatched for tiles of four rows");
  switch (rows - r) {
    case 1: rest(std::integral_constant<int, 1>{}); break;
    case 2: rest(std::integral_constant<int, 2>{}); break;
    case 3: rest(std::integral_constant<int, 3>{}); break;
    default: break;
  }
}

// C (m x n, rows ldc apart) = alpha * A B, plus C's old value if `accumulate`; A is m x k as
// described above, B is k x n with rows ldb apart.
template <typename T>
void matmul(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row_stride, int64_t a_col_stride,
            const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  int64_t j = 0;
  for (; j + kTileVecs * W <= n; j += kTileVecs * W) {
    matmul_column_tile<T, kTileVecs, true>(m, kTileVecs * W, k, alpha, a, a_row_stride, a_col_stride,
                                           b + j, ldb, c + j, ldc, accumulate);
  }
  // The columns left over: one narrower tile, its last vector filled only in part.
  const auto rest = [&](auto vecs) {
    matmul_column_tile<T, decltype(vecs)::value, false>(m, n - j, k, alpha, a, a_row_stride, a_col_stride,
                                                        b + j, ldb, c + j, ldc, accumulate);
  };
  switch ((n - j + W - 1) / W) {  // at most kTileVecs, which is at most 4
    case 1: rest(std::integral_constant<int, 1>{}); break;
    case 2: rest(std::integral_constant<int, 2>{}); break;
    case 3: rest(std::integral_constant<int, 3>{}); break;
    case 4: rest(std::integral_constant<int, 4>{}); break;
    default: break;
  }
}

// dst (cols x rows, rows dst_stride apart) = src^T, src being rows x cols with rows src_stride apart,
// each element converted from S to D (bf16 widened to fp32, say) on the way.
//
// The source rows are usually far apart (q, k and v are views of one (B, T, 3, H, D) projection),
// too far for the hardware prefetcher to guess the next one, and a scalar copy that waits for each
// row to arrive from memory spent most of its time stalled. So rows a few ahead are requested
// while the current one is copied.
template <typename S, typename D>
void transpose(const S* src, int64_t src_stride, int64_t rows, int64_t cols, D* dst, int64_t dst_stride) {
  constexpr int64_t kRowsAhead = 8, kLine = 64 / sizeof(S);
  for (int64_t i = 0; i < std::min(rows, kRowsAhead); ++i)
    for (int64_t j = 0; j < cols; j += kLine) __builtin_prefetch(src + i * src_stride + j);
  for (int64_t i = 0; i < rows; ++i) {
    if (i + kRowsAhead < rows)
      for (int64_t j = 0; j < cols; j += kLine) __builtin_prefetch(src + (i + kRowsAhead) * src_stride + j);
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = static_cast<D>(src[i * src_stride + j]);
  }
}

// dst[j] = src[j] for j < n, converted from S to D, one of which is the other's accumulation type:
// bf16 widened to fp32, or fp32 rounded to bf16 (to nearest even). Rows are short (a head's D), so
// a copy is a few vector moves in place: as a call to memmove it cost attention 3% of its time.
template <typename S, typename D>
inline void convert_row(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    using V = at::vec::Vectorized<S>;
    for_each_vector<S>(0, n, [&](int64_t j, int64_t count) { V::loadu(src + j, count).store(dst + j, count); });
  } else {
    static_assert(std::is_same_v<acc_t<S>, acc_t<D>>, "converts between a type and its accumulation type");
    for_each_vector<S>(0, n, [&](int64_t j, int64_t count) { store<D>(dst + j, load<S>(src + j, count), count); });
  }
}

// ---- Op entry points -----------------------------------------------------------------------------

// Refuses a tensor the kernels are not built for: they take CPU tensors in float32, bfloat16 or float64.
inline void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastgpt::", op, ": expects CPU tensors, got ", name, " on ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble,
              "fastgpt::", op, ": supports float32, bfloat16 and float64, got ", dtype, " for ", name);
}

// Refuses a gradient without the shape of the output it belongs to and the input's dtype.
inline void check_gradient(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(grad_y.sizes() == shape && grad_y.scalar_type() == x.scalar_type(), "fastgpt::", op,
              ": grad_y must have shape ", shape, " and x's dtype ", x.scalar_type(), ", got ", grad_y.sizes(),
              " and ", grad_y.scalar_type());
}

// The torch ops of an elementwise function y = f(x), given its kernels as a type with a kName and two
// static function templates over n contiguous elements: forward(x, y, n) and backward(grad_y, x,
// grad_x, n), which computes grad_x = grad_y f'(x).
template <typename Kernels>
at::Tensor elementwise_forward(const at::Tensor& x) {
  check_input(x, Kernels::kName, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::elementwise_forward", [&] {
    Kernels::forward(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.numel());
  });
  return y;
}

template <typename Kernels>
at::Tensor elementwise_backward(const at::Tensor& grad_y, const at::Tensor& x) {
  check_input(x, Kernels::kName, "x");
  check_gradient(grad_y, x, x.sizes(), Kernels::kName);
  const at::Tensor xc = x.contiguous(), grad_yc = grad_y.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastgpt::elementwise_backward", [&] {
    Kernels::backward(grad_yc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                      xc.numel());
  });
  return grad_x;
}

}  // namespace fastgpt
