// Causal attention on the CPU, forward and backward, in the manner of FlashAttention-2.
//
// The math, for one (batch, head), queries q_i (i < Tq), keys and values k_j, v_j (j < Tk), and the
// queries sitting at the end of the key sequence (offset = Tk - Tq, query i sees keys j <= offset + i):
//
//   s_ij = scale * q_i . k_j                    (only for visible j)
//   m_i  = max_j s_ij,   l_i = sum_j exp(s_ij - m_i),   p_ij = exp(s_ij - m_i) / l_i
//   o_i  = sum_j p_ij v_j,   lse_i = m_i + log(l_i)      (lse is kept for the backward)
//
// Forward: the queries are cut into blocks of kBlockQ rows and the keys into blocks of kForwardBlockK
// columns. A query block walks the key blocks from the first to the one holding its last row's
// diagonal, and never visits a block that lies wholly above the diagonal. It keeps a running
// maximum m_i and sum l_i ("online softmax"): when a new block raises the maximum from m to m', the
// sum and the output accumulated so far are multiplied by exp(m - m') before the block's own terms
// are added. Only a kBlockQ x kForwardBlockK tile of scores ever exists, never the Tq x Tk matrix.
//
// Backward, with do_i the gradient of o_i and delta_i = do_i . o_i:
//
//   p_ij  = exp(s_ij - lse_i)                  (recomputed from the stored log-sum-exp)
//   dv_j  = sum_i p_ij do_i
//   dp_ij = do_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
//   dq_i  = scale * sum_j ds_ij k_j,   dk_j = scale * sum_i ds_ij q_i
//
// Each task owns some key blocks of one (batch, head): for each, it walks the query blocks that see
// it and accumulates dk_j and dv_j in its own buffers, so they are written once and without races.
// dq_i collects terms from every key block; each task adds its terms to its own dq partial (Tq x D),
// and the partials are summed once at the end. When there are fewer (batch, head) pairs than
// threads, a head's key blocks are dealt out round-robin to several tasks (each with its own
// partial), so the backward is parallel over more than batch x heads; extra memory stays O(Tq) per
// (batch, head) and the result does not depend on timing (no atomics).
//
// Grouped-query attention: k and v may have fewer heads (Hkv) than q (H), Hkv dividing H; query head h
// attends with key/value head h / (H / Hkv), the query heads of a group sharing it (Hugging Face's
// repeat_kv convention, without the repeated copies: the shared head is read in place). In the
// backward, dk_j and dv_j of a shared head sum the terms of every query head of its group: a task owns
// some key blocks of one (batch, key/value head) and walks, for each block, the queries of each of the
// group's heads in turn, so each sum is formed in one fixed order by one task, as for H = Hkv.
//
// The tiles are computed in fp32 (fp64 for gradcheck's fp64 inputs). bf16 tensors are read and
// written in place: a task widens what it multiplies into fp32 scratch (the forward a head's keys and
// values once, the backward each block of keys, both each block of queries) and rounds each output
// block to bf16 as it stores it, so no fp32 copy of q, k, v, their gradients or the output is ever
// made. The tile products are the register-blocked `matmul` of common.h.
//
// The output and the gradients dq, dk, dv are (B, H, T, D) views of (B, T, H, D) memory, the layout in
// which the model's projections make q, k, v and read the output back: (B, T, H * D) is then a view
// of them, not a copy (the op's contract, fastgpt/ops/definitions/causal_attention.py).

#include "row_ops.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace fastgpt {
namespace {

constexpr int64_t kBlockQ = 64;
// The forward's key blocks are wider than the backward's: each new key block costs the forward a
// rescaling of its running output, while the backward keeps five tiles of a key block live at once
// (scores, their gradient, K^T, V^T, and the dK/dV accumulators). Measured at D = 64 and T from 64
// to 1024: 256 keys make the forward 5-10% faster than 64 do; the backward is fastest at 64.
constexpr int64_t kForwardBlockK = 256;
constexpr int64_t kBackwardBlockK = 64;
// Transposed tiles get rows this many elements longer than they need, so that walking down one of
// their columns does not hit the same cache set on every row.
constexpr int64_t kCachePadding = 16;
constexpr int64_t kKeysTStride = kBackwardBlockK + kCachePadding;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How many of the `cols` keys starting at k0 the query at position `query_position` may see.
int64_t visible_keys(int64_t query_position, int64_t k0, int64_t cols) {
  return std::clamp<int64_t>(query_position + 1 - k0, 0, cols);
}

// The (T, D) matrix of one (batch, head) of a (B, H, T, D) tensor with unit stride along D.
template <typename T>
Rows<T> head(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Rows [first, first + count) of `src`, each `dim` long, in the compute type T: the rows themselves
// when they are stored in it, else their widened copy in `scratch` (count x dim, packed).
template <typename S, typename T = acc_t<S>>
Rows<const T> in_compute_type(const Rows<S>& src, int64_t first, int64_t count, int64_t dim, T* scratch) {
  if constexpr (std::is_same_v<S, T>) {
    return {src.row(first), src.row_stride};
  } else {
    for (int64_t i = 0; i < count; ++i) convert_row(src.row(first + i), scratch + i * dim, dim);
    return {scratch, dim};
  }
}

// Room for `size` values of T in which in_compute_type widens rows; none when S is T already.
template <typename S, typename T = acc_t<S>>
std::vector<T> widening_scratch(int64_t size) {
  return std::vector<T>(std::is_same_v<S, T> ? 0 : size);
}

// Stores `rows` rows of `dim` computed values (packed) as rows [first, first + rows) of `dst`.
template <typename T, typename S>
void store_rows(const T* values, int64_t rows, int64_t dim, const Rows<S>& dst, int64_t first) {
  for (int64_t i = 0; i < rows; ++i) convert_row(values + i * dim, dst.row(first + i), dim);
}

// ---- Forward -----------------------------------------------------------------------------------

// How many tasks share one head's blocks: enough that every thread has work even when batch x heads
// is small, never more than there are blocks.
int64_t tasks_per_head(int64_t batch_heads, int64_t blocks) {
  const int64_t wanted = 4 * at::get_num_threads();
  return std::clamp<int64_t>(ceil_div(wanted, std::max<int64_t>(batch_heads, 1)), 1, std::max<int64_t>(blocks, 1));
}

// S is the tensors' storage type; T = acc_t<S> is what the tiles are computed in (and lse's type).
template <typename S, typename T = acc_t<S>>
void attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor& out, at::Tensor& lse, T scale) {
  const int64_t heads = q.size(1), t_q = q.size(2), t_k = k.size(2), dim = q.size(3);
  const int64_t group = heads / k.size(1);  // query heads per key/value head
  const int64_t offset = t_k - t_q;
  const int64_t q_blocks = ceil_div(t_q, kBlockQ);
  // A task takes every chunks-th query block of one head, so that long and short (near the start,
  // causally cheap) blocks are dealt out evenly.
  const int64_t chunks = tasks_per_head(q.size(0) * heads, q_blocks);

  at::parallel_for(0, q.size(0) * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    // K^T of one head, which the product Q K^T reads by rows. Its rows are padded apart so that a
    // power-of-two T does not map a column of it onto a single cache set.
    const int64_t keys_t_stride = t_k + kCachePadding;
    std::vector<T> keys_t(dim * keys_t_stride);
    // Scratch for one block of queries; a short Tq (decoding) needs only as many rows as it has.
    const int64_t block_rows = std::min(kBlockQ, t_q);
    std::vector<T> scores(block_rows * kForwardBlockK), acc(block_rows * dim), row_max(block_rows), row_sum(block_rows);
    // A block of queries and one head's values in T, for inputs stored otherwise.
    std::vector<T> queries = widening_scratch<S>(block_rows * dim), values = widening_scratch<S>(t_k * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * chunks), h = task / chunks % heads, chunk = task % chunks;
      const Rows<S> Q = head<S>(q, b, h), K = head<S>(k, b, h / group), V = head<S>(v, b, h / group);
      const Rows<S> O = head<S>(out, b, h);
      transpose(K.data, K.row_stride, t_k, dim, keys_t.data(), keys_t_stride);
      const Rows<const T> Vh = in_compute_type(V, 0, t_k, dim, values.data());

      for (int64_t q_block = chunk; q_block < q_blocks; q_block += chunks) {
        const int64_t q0 = q_block * kBlockQ, rows = std::min(kBlockQ, t_q - q0);
        const Rows<const T> Qb = in_compute_type(Q, q0, rows, dim, queries.data());
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), T(0));
        std::fill(acc.begin(), acc.end(), T(0));
        // The block's last query sees keys [0, keys_seen): every key block past that is skipped.
        const int64_t keys_seen = offset + q0 + rows;
        for (int64_t k0 = 0; k0 < keys_seen; k0 += kForwardBlockK) {
          const int64_t cols = std::min(kForwardBlockK, keys_seen - k0);
          // S = scale * Q K^T, for each tile of rows only up to the keys its last row sees.
          for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
            const int64_t tile = std::min<int64_t>(kTileRows, rows - r0);
            const int64_t needed = visible_keys(offset + q0 + r0 + tile - 1, k0, cols);
            matmul<T>(tile, needed, dim, scale, Qb.row(r0), Qb.row_stride, 1, keys_t.data() + k0,
                      keys_t_stride, scores.data() + r0 * kForwardBlockK, kForwardBlockK, false);
          }
          for (int64_t i = 0; i < rows; ++i) {
            T* s = scores.data() + i * kForwardBlockK;
            const int64_t visible = visible_keys(offset + q0 + i, k0, cols);
            if (visible == 0) {  // the whole block is in this row's future
              std::fill(s, s + cols, T(0));
              continue;
            }
            const T new_max = std::max(row_max[i], max_of(s, visible));
            const T correction = std::exp(row_max[i] - new_max);  // 0 on the first block
            row_sum[i] = row_sum[i] * correction + exponentiate_and_sum(s, visible, cols, new_max);
            if (correction != T(1)) scale_row(acc.data() + i * dim, dim, correction);
            row_max[i] = new_max;
          }
          // acc += P V, again leaving out the keys in the future of a whole tile of rows.
          for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
            const int64_t tile = std::min<int64_t>(kTileRows, rows - r0);
            const int64_t needed = visible_keys(offset + q0 + r0 + tile - 1, k0, cols);
            matmul<T>(tile, dim, needed, T(1), scores.data() + r0 * kForwardBlockK, kForwardBlockK, 1, Vh.row(k0),
                      Vh.row_stride, acc.data() + r0 * dim, dim, true);
          }
        }
        T* block_lse = lse.data_ptr<T>() + (b * heads + h) * t_q + q0;
        for (int64_t i = 0; i < rows; ++i) {  // key 0 is visible to every query, so row_sum > 0
          scale_row(acc.data() + i * dim, dim, T(1) / row_sum[i]);
          convert_row(acc.data() + i * dim, O.row(q0 + i), dim);
          block_lse[i] = row_max[i] + std::log(row_sum[i]);
        }
      }
    }
  });
}

// ---- Backward ----------------------------------------------------------------------------------

template <typename S, typename T = acc_t<S>>
void attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               at::Tensor& dq_partials, at::Tensor& dk, at::Tensor& dv, T scale) {
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), t_q = q.size(2), t_k = k.size(2);
  const int64_t dim = q.size(3), offset = t_k - t_q, group = heads / kv_heads;
  const int64_t k_blocks = ceil_div(t_k, kBackwardBlockK), chunks = dq_partials.size(0);
  const int64_t dq_stride = heads * dim;

  at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBlockQ * kBackwardBlockK), dprobs(kBlockQ * kBackwardBlockK);
    std::vector<T> dk_acc(kBackwardBlockK * dim), dv_acc(kBackwardBlockK * dim);
    std::vector<T> keys_t(dim * kKeysTStride), values_t(dim * kKeysTStride);  // K_j^T, V_j^T
    std::vector<T> group_delta(group * t_q);
    // Blocks of queries, of their output gradients and of keys in T, for inputs stored otherwise.
    std::vector<T> queries = widening_scratch<S>(kBlockQ * dim), grad_outs = widening_scratch<S>(kBlockQ * dim);
    std::vector<T> keys = widening_scratch<S>(kBackwardBlockK * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (kv_heads * chunks), g = task / chunks % kv_heads, chunk = task % chunks;
      const Rows<S> K = head<S>(k, b, g), V = head<S>(v, b, g), dK = head<S>(dk, b, g), dV = head<S>(dv, b, g);
      // The group's query heads are h = first_head .. first_head + group - 1.
      const int64_t first_head = g * group;
      // This task's dq partial of head h: rows dq_stride apart, as dq_partials is (chunks, B, Tq, H, D).
      const auto dq_partial_of = [&](int64_t h) {
        return dq_partials.data_ptr<T>() + ((chunk * batch + b) * t_q * heads + h) * dim;
      };
      // delta_i = do_i . o_i, one number per query, computed where it is used rather than in a pass
      // of its own over dO and O. (When a head is split over several tasks, each computes it.)
      for (int64_t r = 0; r < group; ++r) {
        const Rows<S> dO = head<S>(grad_out, b, first_head + r), O = head<S>(out, b, first_head + r);
        for (int64_t i = 0; i < t_q; ++i) {
          const T* grad_out_row = in_compute_type(dO, i, 1, dim, grad_outs.data()).data;
          const T* out_row = in_compute_type(O, i, 1, dim, queries.data()).data;
          group_delta[r * t_q + i] = dot_rows<T, 1>(grad_out_row, dim, out_row)[0];
        }
        for (int64_t i = 0; i < t_q; ++i) std::fill_n(dq_partial_of(first_head + r) + i * dq_stride, dim, T(0));
      }

      for (int64_t key_block = chunk; key_block < k_blocks; key_block += chunks) {
        const int64_t k0 = key_block * kBackwardBlockK, cols = std::min(kBackwardBlockK, t_k - k0);
        std::fill(dk_acc.begin(), dk_acc.end(), T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        transpose(K.row(k0), K.row_stride, cols, dim, keys_t.data(), kKeysTStride);
        transpose(V.row(k0), V.row_stride, cols, dim, values_t.data(), kKeysTStride);
        const Rows<const T> Kb = in_compute_type(K, k0, cols, dim, keys.data());
        // Query i sees key k0 once offset + i >= k0: earlier query blocks are skipped.
        const int64_t first_query = std::max<int64_t>(k0 - offset, 0) / kBlockQ * kBlockQ;
        for (int64_t r = 0; r < group; ++r) {
          const int64_t h = first_head + r;
          const Rows<S> Q = head<S>(q, b, h), dO = head<S>(grad_out, b, h);
          const T* head_lse = lse.data_ptr<T>() + (b * heads + h) * t_q;
          const T* head_delta = group_delta.data() + r * t_q;
          T* dq_partial = dq_partial_of(h);
          for (int64_t q0 = first_query; q0 < t_q; q0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, t_q - q0);
            const Rows<const T> Qb = in_compute_type(Q, q0, rows, dim, queries.data());
            const Rows<const T> dOb = in_compute_type(dO, q0, rows, dim, grad_outs.data());
            // P = exp(scale * Q K^T - lse) and dP = dO V^T, each group of rows only up to the keys
            // its last row sees; P is zero in the future.
            for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
              const int64_t tile = std::min<int64_t>(kTileRows, rows - r0);
              const int64_t needed = visible_keys(offset + q0 + r0 + tile - 1, k0, cols);
              matmul<T>(tile, needed, dim, scale, Qb.row(r0), Qb.row_stride, 1, keys_t.data(),
                        kKeysTStride, probs.data() + r0 * kBackwardBlockK, kBackwardBlockK, false);
              matmul<T>(tile, needed, dim, T(1), dOb.row(r0), dOb.row_stride, 1, values_t.data(),
                        kKeysTStride, dprobs.data() + r0 * kBackwardBlockK, kBackwardBlockK, false);
            }
            // dS = P * (dP - delta), kept in dprobs; zero in the future.
            for (int64_t i = 0; i < rows; ++i) {
              using Vt = at::vec::Vectorized<T>;
              const int64_t visible = visible_keys(offset + q0 + i, k0, cols);
              T* p = probs.data() + i * kBackwardBlockK;
              T* ds = dprobs.data() + i * kBackwardBlockK;
              exponentiate_and_sum(p, visible, cols, head_lse[q0 + i]);  // the sum is not needed: lse normalises
              const Vt row_delta(head_delta[q0 + i]);
              for (int64_t j = 0; j < cols; j += Vt::size()) {
                const int64_t count = std::clamp<int64_t>(visible - j, 0, Vt::size());
                const Vt d = Vt::set(Vt(T(0)), Vt::loadu(p + j) * (Vt::loadu(ds + j) - row_delta), count);
                d.store(ds + j, std::min<int64_t>(Vt::size(), cols - j));
              }
            }
            // dV += P^T dO and dK += scale * dS^T Q, for each group of keys only over the queries that
            // see its first key: on the diagonal the earlier queries' P and dS are zero.
            for (int64_t j0 = 0; j0 < cols; j0 += kTileRows) {
              const int64_t keys = std::min<int64_t>(kTileRows, cols - j0);
              const int64_t first = std::clamp<int64_t>(k0 + j0 - offset - q0, 0, rows);
              if (first == rows) break;  // no query of this block sees these keys, nor the later ones
              matmul<T>(keys, dim, rows - first, T(1), probs.data() + first * kBackwardBlockK + j0, 1, kBackwardBlockK,
                        dOb.row(first), dOb.row_stride, dv_acc.data() + j0 * dim, dim, true);
              matmul<T>(keys, dim, rows - first, scale, dprobs.data() + first * kBackwardBlockK + j0, 1,
                        kBackwardBlockK, Qb.row(first), Qb.row_stride, dk_acc.data() + j0 * dim, dim, true);
            }
            // dQ += scale * dS K
            for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
              const int64_t tile = std::min<int64_t>(kTileRows, rows - r0);
              const int64_t needed = visible_keys(offset + q0 + r0 + tile - 1, k0, cols);
              matmul<T>(tile, dim, needed, scale, dprobs.data() + r0 * kBackwardBlockK, kBackwardBlockK, 1,
                        Kb.data, Kb.row_stride, dq_partial + (q0 + r0) * dq_stride, dq_stride, true);
            }
          }
        }
        store_rows(dk_acc.data(), cols, dim, dK, k0);
        store_rows(dv_acc.data(), cols, dim, dV, k0);
      }
    }
  });
}

// ---- Op entry points ---------------------------------------------------------------------------

// An uninitialised (B, H, T, D) tensor of these sizes laid out as (B, T, H, D) in memory.
at::Tensor empty_heads(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty({sizes[0], sizes[2], sizes[1], sizes[3]}, options).transpose(1, 2);
}

// In q's dtype (the public op takes one dtype for all), with unit stride along D (what the
// kernels' vector loads need).
at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor converted = t.to(dtype);
  return converted.stride(3) == 1 ? converted : converted.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_input(*t, "causal_attention", name);
    TORCH_CHECK(t->dim() == 4, "fastgpt::causal_attention: expects (B, H, T, D) tensors, got ", name, " of shape ",
                t->sizes());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "fastgpt::causal_attention: k and v must have one shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "fastgpt::causal_attention: q ", q.sizes(),
              " and k ", k.sizes(), " must agree in batch size and head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "fastgpt::causal_attention: the ", k.size(1),
              " key/value heads must divide the ", q.size(1), " query heads");
  TORCH_CHECK(k.size(2) >= q.size(2), "fastgpt::causal_attention: needs Tk >= Tq");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  check_inputs(q, k, v);
  const auto dtype = q.scalar_type();
  const at::Tensor qc = prepared(q, dtype), kc = prepared(k, dtype), vc = prepared(v, dtype);
  at::Tensor out = empty_heads(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(accumulate_type(q)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "fastgpt::causal_attention_forward", [&] {
    attention_forward_kernel<scalar_t>(qc, kc, vc, out, lse, static_cast<acc_t<scalar_t>>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_inputs(q, k, v);
  const auto dtype = q.scalar_type();
  const at::Tensor qc = prepared(q, dtype), kc = prepared(k, dtype), vc = prepared(v, dtype);
  const at::Tensor doc = prepared(grad_out, dtype), oc = prepared(out, dtype);
  const at::Tensor lsec = lse.to(accumulate_type(q)).contiguous();
  // A task owns key blocks of one (batch, key/value head): that is what the work is split over.
  const int64_t chunks = tasks_per_head(k.size(0) * k.size(1), ceil_div(k.size(2), kBackwardBlockK));
  // dq gathers terms from every task of a head, so its partials are kept in the compute type.
  at::Tensor dq_partials = at::empty({chunks, q.size(0), q.size(2), q.size(1), q.size(3)},
                                     q.options().dtype(accumulate_type(q)));
  at::Tensor dk = empty_heads(k.sizes(), q.options());
  at::Tensor dv = empty_heads(v.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "fastgpt::causal_attention_backward", [&] {
    attention_backward_kernel<scalar_t>(doc, qc, kc, vc, oc, lsec, dq_partials, dk, dv,
                                        static_cast<acc_t<scalar_t>>(scale));
  });
  at::Tensor dq = chunks == 1 ? dq_partials[0] : dq_partials.sum(0);
  return {dq.to(q.scalar_type()).transpose(1, 2), dk, dv};
}

// The CPU implementations of the op's kernels; their schemas are in fastgpt/ops/definitions/causal_attention.py.
TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_causal_attention_forward", &causal_attention_forward);
  m.impl("cpp_causal_attention_backward", &causal_attention_backward);
}

}  // namespace fastgpt
