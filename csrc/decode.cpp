// One transformer block for one new token per sequence, as a single op: how fastgpt decodes on the CPU.
//
// For each sequence b, with x (C numbers) the new token's residual stream, p its position, H heads
// of D = C / H channels (head j owns channels jD .. jD + D - 1), and the block's parameters:
//
//   h = LayerNorm_1(x)
//   [q, k, v] = W_attn h + b_attn                              three vectors of C numbers
//   K[b, j, p] = k_j,   V[b, j, p] = v_j                        the new row of the key/value cache
//   s_t = q_j . K[b, j, t] / sqrt(D),   a_j = sum_{t <= p} softmax(s)_t V[b, j, t]    for each head j
//   x = x + W_proj a + b_proj
//   x = x + W_out gelu(W_fc LayerNorm_2(x) + b_fc) + b_out
//
// This is Block.forward of fastgpt/model.py for one token with a cache, and the tests hold the two
// to each other.
//
// Why one op: a decoding step does little arithmetic (the default model's block is 0.2 M multiply-
// adds over 0.8 MB of weights, which this op runs in about 15 microseconds), and run as PyTorch
// operations from Python it was some twenty of them per block, whose fixed costs came to several
// times that. Here a step is a pass over the block's weights and the cached rows, nothing else.
//
// The matrix-vector products read each weight row once for all the sequences, a few rows at a
// time so that the loads of the input are shared and the running sums are independent of each
// other. Work is split over threads only where there is enough of it to be worth waking a thread.

#include "gelu.h"
#include "layer_norm.h"
#include "row_ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace fastgpt {
namespace {

// Work is split over threads in tasks of at least this many multiply-adds: waking a thread costs
// microseconds, about what a product this size takes. (On the default model's block, 2^13, 2^15 and
// 2^18, which keeps its products on one thread, measured within 10% of each other.)
constexpr int64_t kMultiplyAddsPerTask = 1 << 15;

// Weight rows per group: the dot products of kRowsPerGroup rows with one input are computed
// together, so each input vector is loaded once for all of them.
constexpr int kRowsPerGroup = 4;

// Calls body(o, dots) for `rows` consecutive rows in groups of kRowsPerGroup, and for the rows left
// over one at a time; dots[r] is row (o + r)'s dot product with x.
template <typename T, typename Body>
inline void for_each_row_group(const T* w, int64_t first, int64_t last, int64_t n, const T* x, const Body& body) {
  int64_t o = first;
  for (; o + kRowsPerGroup <= last; o += kRowsPerGroup) body(o, dot_rows<T, kRowsPerGroup>(w + o * n, n, x));
  for (; o < last; ++o) body(o, dot_rows<T, 1>(w + o * n, n, x));
}

// y[b] = W x[b] + bias (+ residual[b]) for the `batch` rows of x: W is (out, in) and row-major, as
// nn.Linear keeps it; bias and residual may be null.
template <typename T>
void linear(const T* x, int64_t batch, int64_t in, const T* w, const T* bias, int64_t out, const T* residual,
            T* y) {
  const int64_t groups = (out + kRowsPerGroup - 1) / kRowsPerGroup;
  const int64_t grain = std::max<int64_t>(1, kMultiplyAddsPerTask / (kRowsPerGroup * in * batch));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kRowsPerGroup, last = std::min(end * kRowsPerGroup, out);
    for (int64_t b = 0; b < batch; ++b) {
      const T* res = residual ? residual + b * out : nullptr;
      T* yb = y + b * out;
      for_each_row_group(w, first, last, in, x + b * in, [&](int64_t o, const auto& dots) {
        for (size_t r = 0; r < dots.size(); ++r) {
          yb[o + r] = dots[r] + (bias ? bias[o + r] : T(0)) + (res ? res[o + r] : T(0));
        }
      });
    }
  });
}

// a = softmax(q K^T * scale) V over the first `keys` rows of one head's cache (K, V: rows of D).
// `scores` has room for `keys` numbers rounded up to whole vectors (see exponentiate_and_sum).
template <typename T>
void attend(const T* q, const T* k, const T* v, int64_t keys, int64_t d, T scale, T* scores, T* a) {
  for_each_row_group(k, 0, keys, d, q, [&](int64_t t, const auto& dots) {
    for (size_t r = 0; r < dots.size(); ++r) scores[t + r] = dots[r] * scale;
  });
  const T sum = exponentiate_and_sum(scores, keys, keys, max_of(scores, keys));
  // a (1 x D) = (1 / sum) * scores (1 x keys) V (keys x D): the tile product of common.h.
  matmul<T>(1, d, keys, T(1) / sum, scores, 0, 1, v, d, a, d, /*accumulate=*/false);
}

template <typename T>
struct BlockParameters {
  const T *ln_1_weight, *ln_1_bias, *attn_weight, *attn_bias, *attn_proj_weight, *attn_proj_bias;
  const T *ln_2_weight, *ln_2_bias, *fc_weight, *fc_bias, *mlp_proj_weight, *mlp_proj_bias;
};

template <typename T>
void decode_block_kernel(const T* x, int64_t batch, int64_t c, int64_t hidden, const BlockParameters<T>& p,
                         T* k_cache, T* v_cache, int64_t heads, int64_t capacity, int64_t position, T eps,
                         T* scratch, T* y) {
  const int64_t d = c / heads, keys = position + 1;
  // Scratch, per sequence: the LayerNorm output (C), q k v (3C), the attention output (C), the
  // residual stream after attention (C), the MLP's hidden layer (hidden).
  T* normed = scratch;
  T* qkv = normed + batch * c;
  T* attended = qkv + batch * 3 * c;
  T* mid = attended + batch * c;
  T* mlp = mid + batch * c;

  for (int64_t b = 0; b < batch; ++b) {
    layer_norm_row(x + b * c, normed + b * c, c, p.ln_1_weight, p.ln_1_bias, eps);
  }
  linear(normed, batch, c, p.attn_weight, p.attn_bias, 3 * c, static_cast<const T*>(nullptr), qkv);

  // The new token's keys and values become row `position` of each head's cache; then each head
  // attends over rows 0 .. position.
  const auto head_rows = [&](T* cache, int64_t b, int64_t j) { return cache + ((b * heads + j) * capacity) * d; };
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < heads; ++j) {
      std::copy_n(qkv + b * 3 * c + c + j * d, d, head_rows(k_cache, b, j) + position * d);
      std::copy_n(qkv + b * 3 * c + 2 * c + j * d, d, head_rows(v_cache, b, j) + position * d);
    }
  }
  const T scale = T(1) / std::sqrt(T(d));
  const int64_t grain = std::max<int64_t>(1, kMultiplyAddsPerTask / (2 * keys * d));
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t W = at::vec::Vectorized<T>::size();
    std::vector<T> scores((keys + W - 1) / W * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, j = task % heads;
      attend(qkv + b * 3 * c + j * d, head_rows(k_cache, b, j), head_rows(v_cache, b, j), keys, d, scale,
             scores.data(), attended + b * c + j * d);
    }
  });
  linear(attended, batch, c, p.attn_proj_weight, p.attn_proj_bias, c, x, mid);

  for (int64_t b = 0; b < batch; ++b) {
    layer_norm_row(mid + b * c, normed + b * c, c, p.ln_2_weight, p.ln_2_bias, eps);
  }
  linear(normed, batch, c, p.fc_weight, p.fc_bias, hidden, static_cast<const T*>(nullptr), mlp);
  gelu_forward_kernel(mlp, mlp, batch * hidden);
  linear(mlp, batch, hidden, p.mlp_proj_weight, p.mlp_proj_bias, c, mid, y);
}

// A parameter, contiguous, after checking it has the shape the block gives it and x's dtype and device.
at::Tensor parameter(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "fastgpt::decode_block: ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "fastgpt::decode_block: ", name,
              " must have x's dtype and device (", x.scalar_type(), ", ", x.device(), ")");
  return t.contiguous();
}

// A Linear layer's bias, or an undefined tensor (a null pointer to the kernel) for a layer without one.
at::Tensor optional_bias(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t n, const char* name) {
  return t.has_value() ? parameter(*t, x, {n}, name) : at::Tensor();
}

// A LayerNorm's bias: layer_norm_row always adds one, so a LayerNorm without one adds zeros.
at::Tensor layer_norm_bias(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t n, const char* name) {
  return t.has_value() ? parameter(*t, x, {n}, name) : at::zeros({n}, x.options());
}

}  // namespace

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& ln_1_weight, const c10::optional<at::Tensor>& ln_1_bias,
                        const at::Tensor& attn_weight, const c10::optional<at::Tensor>& attn_bias,
                        const at::Tensor& attn_proj_weight, const c10::optional<at::Tensor>& attn_proj_bias,
                        const at::Tensor& ln_2_weight, const c10::optional<at::Tensor>& ln_2_bias,
                        const at::Tensor& fc_weight, const c10::optional<at::Tensor>& fc_bias,
                        const at::Tensor& mlp_proj_weight, const c10::optional<at::Tensor>& mlp_proj_bias,
                        at::Tensor& k_cache, at::Tensor& v_cache, int64_t position, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "fastgpt::decode_block: expects CPU tensors, got x on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastgpt::decode_block: supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "fastgpt::decode_block: x must be (batch, channels), got shape ", x.sizes());
  TORCH_CHECK(fc_weight.dim() == 2, "fastgpt::decode_block: fc_weight must be (hidden, channels)");
  const int64_t batch = x.size(0), c = x.size(1), hidden = fc_weight.size(0);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "fastgpt::decode_block: k_cache and v_cache must both be (batch, heads, capacity, head_dim)");
  const int64_t heads = k_cache.size(1), capacity = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == batch && heads * k_cache.size(3) == c && c > 0,
              "fastgpt::decode_block: the caches' shape ", k_cache.sizes(), " does not fit x's ", x.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "fastgpt::decode_block: the caches must be contiguous");
  TORCH_CHECK(0 <= position && position < capacity, "fastgpt::decode_block: position ", position,
              " is outside the cache's ", capacity, " rows");
  TORCH_CHECK(k_cache.scalar_type() == x.scalar_type() && v_cache.scalar_type() == x.scalar_type() &&
                  k_cache.device() == x.device() && v_cache.device() == x.device(),
              "fastgpt::decode_block: the caches must have x's dtype and device");

  const at::Tensor tensors[] = {
      parameter(ln_1_weight, x, {c}, "ln_1_weight"),
      layer_norm_bias(ln_1_bias, x, c, "ln_1_bias"),
      parameter(attn_weight, x, {3 * c, c}, "attn_weight"),
      optional_bias(attn_bias, x, 3 * c, "attn_bias"),
      parameter(attn_proj_weight, x, {c, c}, "attn_proj_weight"),
      optional_bias(attn_proj_bias, x, c, "attn_proj_bias"),
      parameter(ln_2_weight, x, {c}, "ln_2_weight"),
      layer_norm_bias(ln_2_bias, x, c, "ln_2_bias"),
      parameter(fc_weight, x, {hidden, c}, "fc_weight"),
      optional_bias(fc_bias, x, hidden, "fc_bias"),
      parameter(mlp_proj_weight, x, {c, hidden}, "mlp_proj_weight"),
      optional_bias(mlp_proj_bias, x, c, "mlp_proj_bias")};

  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (batch == 0) return y;
  at::Tensor scratch = at::empty({batch, 6 * c + hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastgpt::decode_block", [&] {
    const auto data = [&](int i) { return tensors[i].defined() ? tensors[i].data_ptr<scalar_t>() : nullptr; };
    const BlockParameters<scalar_t> parameters{data(0), data(1), data(2), data(3), data(4), data(5),
                                               data(6), data(7), data(8), data(9), data(10), data(11)};
    decode_block_kernel<scalar_t>(xc.data_ptr<scalar_t>(), batch, c, hidden, parameters, k_cache.data_ptr<scalar_t>(),
                                  v_cache.data_ptr<scalar_t>(), heads, capacity, position, scalar_t(eps),
                                  scratch.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
  });
  return y;
}

// The CPU implementation of the fused decoding step; its schema is in fastgpt/ops/cpp.py.
TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_decode_block", &decode_block);
}

}  // namespace fastgpt
