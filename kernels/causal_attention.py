"""Causal flash attention: forward and backward kernels in Triton.

The math, for one (batch, head) pair. Q holds Tq queries, K and V hold Tk >= Tq keys and values,
all of head dimension D. The queries are the last Tq positions of the sequence, so query i may look
at keys 0 .. i + (Tk - Tq); call that offset `query_offset`.

    S = scale * Q K^T          (Tq x Tk), with S[i, j] = -inf for j > i + query_offset
    P = softmax(S) row-wise,   O = P V

Forward (FlashAttention-2). Each program owns a block of BLOCK_M query rows and streams the keys and
values in blocks of BLOCK_N, never materialising S. It keeps, per row, the running maximum m_i of
the scores seen so far, the running sum l_i of exp(score - m_i), and the unnormalised output acc.
For each key block:

    m_ij  = max(m_i, rowmax(S_block))
    P_blk = exp(S_block - m_ij)
    alpha = exp(m_i - m_ij)                 (rescales what was accumulated under the old maximum)
    l_i   = alpha * l_i + rowsum(P_blk)
    acc   = alpha * acc + P_blk V_block
    m_i   = m_ij

and at the end O = acc / l_i. Exponentials are exp2, the cheap one on the GPU: the scores are kept
in base 2 by folding log2(e) into the scale (qk_scale = scale * log2(e)), since exp(x) = exp2(x log2 e).
The kernel also saves the log-sum-exp of each row, LSE = m_i + log2(l_i) (base 2), which lets the
backward recompute P = exp2(qk_scale Q K^T - LSE) block by block without a second softmax.

Causality splits each query block's key range in two: keys before the block's diagonal are visible
to every row of the block and need no mask; the keys on the diagonal (one band of BLOCK_M keys) need
the mask j <= i + query_offset; keys beyond the diagonal are never visited.

Backward. With dO the gradient of O and Delta_i = rowsum(dO * O) (computed first, by a small kernel):

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - Delta)                   (the softmax backward, row by row)
    dQ = scale * dS K,    dK = scale * dS^T Q

Two kernels, each writing its own outputs once, so no atomics and bitwise-deterministic results:
one program per block of keys accumulates dK and dV by looping over the queries that see those keys
(first the diagonal band, masked, then all later queries, unmasked), and one program per block of
queries accumulates dQ by looping over the keys it sees (the same split as the forward).

All tiles are computed in fp32 (`tl.dot` accumulates in fp32); the dot operands are in DOT_DTYPE,
the inputs' own dtype on the GPU. fp32 inputs multiply exactly (DOT_PRECISION "ieee") unless PyTorch
allows TF32 for fp32 matmuls (see `fastgpt.kernels.dot_precision`): then they use TF32 tensor cores, as
torch's matmuls do. Triton's CPU interpreter multiplies bf16 as raw integers, so there
(and only there) bf16 operands are upcast to fp32. Head dimensions that are not powers of two are
padded to the next one with masked (zero) loads; sequence lengths need not be multiples of a block.

Memory layout. Inputs are read through their strides (any layout whose rows of D values are
contiguous). The output O, and dQ, dK and dV, are allocated in (B, T, H, D) memory and returned as
(B, H, T, D) views: the model's next step, (B, H, T, D) -> (B, T, H * D), is then a free view instead
of a copy. The incoming gradient dO is read through its strides too.

Grid. Each kernel runs one program per (batch x head, block) pair on a one-dimensional grid (CUDA
allows 2^31 - 1 programs there, but only 65535 in a second dimension, which B * H would exceed). The
programs of one head are adjacent, so that they share its keys and values in the L2 cache, and the
query blocks with the most keys to visit go first, so that the last wave of programs is a short one.
Offsets of whole heads are 64-bit; offsets within one head are 32-bit, which the launchers check.
"""

import torch
import triton
import triton.language as tl

from fastgpt.ops.definitions.causal_attention import empty_heads

from . import autotune, autotuning, dot_precision, interpreting, mend_interpreter, unit_stride_rows

mend_interpreter()

LOG2_E = 1.4426950408889634
MIN_BLOCK = 16  # the smallest tile tl.dot accepts on each side
MAX_HEAD_DIM = 256
SHARED_MEMORY_BYTES = 227 * 1024  # per thread block on Hopper (H100, H200)
SCRATCH_BYTES = 1024  # shared memory the compiler adds beyond the tiles (row statistics, barriers)
# The most tile values a thread may hold (see ConfigPruner.values_per_thread) before registers spill.
# Fitted to sm_90 compiles of every Hopper config of every kernel at head dims 64, 128 and 256 in bf16:
# every config above it spilled to local memory, and 35 of the 48 that did not spill are below it.
MAX_VALUES_PER_THREAD = 144
INT32_LIMIT = 2 ** 31


# ---------------------------------------------------------------------------------------------
# Block sizes: autotuned on the GPU, one fixed choice in the (slow, single-threaded) interpreter
# ---------------------------------------------------------------------------------------------

def make_configs(tiles):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# A 64-row tile is one warpgroup's wgmma on Hopper (4 warps), a 128-row tile two (8 warps). The block
# that is looped over (BLOCK_N in the forward and dQ, BLOCK_M in dK/dV) divides the one that stays
# resident, so that the diagonal band is a whole number of looped blocks.
# Eight warps on a 64 x 32 tile, and 32-key blocks in dK/dV, are for the largest head dims, whose
# tiles do not fit the registers of fewer threads (a 64 x 64 tile over eight warps spilled at 256).
HOPPER_FORWARD_TILES = [(m, n, w, s) for m, w in ((64, 4), (128, 8)) for n in (32, 64, 128) if n <= m
                        for s in (3, 4)] + [(64, 32, 8, s) for s in (3, 4)]
HOPPER_BACKWARD_DKDV_TILES = [(m, n, w, 3) for n in (32, 64, 128) for m in (32, 64) if m <= n for w in (4, 8)]
HOPPER_BACKWARD_DQ_TILES = [(m, n, w, 3) for m in (64, 128) for n in (32, 64) if n <= m for w in (4, 8)]
# Without autotuning (the interpreter, which has no GPU to time configs and runs one program at a
# time; or FASTGPT_TRITON_AUTOTUNE=0): one small tile per kernel, with more than one looped block per
# diagonal band so that the tests exercise that.
SINGLE_TILES = {"forward": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}


class ConfigPruner:
    """The `early_config_prune` of an attention kernel: drops the configs that cannot be fast.

    `looped_block` names the block ("BLOCK_M" or "BLOCK_N") whose tiles the kernel streams through
    in its loop; the other block stays resident, as `resident_tiles` input tiles and `accumulators`
    fp32 (block x head dim) tiles; `score_tiles` fp32 (BLOCK_M x BLOCK_N) tiles (scores,
    probabilities, their gradients) are live at once inside the loop. A config is dropped when
      - one of its blocks is longer than its sequence (rounded up to a power of two): the extra rows
        are padding, computed for nothing;
      - its tiles do not fit in shared memory (the kernel would not launch): each pipeline stage
        holds two looped tiles (K and V, or Q and dO), plus the resident input tiles and some scratch;
      - its tiles would not fit in a thread's registers, so that they would spill to local memory
        (see `values_per_thread`);
      - the inputs are fp32 multiplied exactly (not TF32) and it is not the smallest tile over the
        most warps: exact fp32 products run on CUDA cores, where the tile matters little, and each
        large one takes tens of seconds to compile. Exact fp32 is the precise path, not the fast one.
    If nothing is left, the config with the fewest values per thread is kept: it always runs.
    tests/test_triton_kernels.py compiles every config kept for Hopper and checks that none spills.
    """

    def __init__(self, looped_block, resident_tiles, accumulators, score_tiles):
        self.looped_block = looped_block
        self.resident_block = "BLOCK_N" if looped_block == "BLOCK_M" else "BLOCK_M"
        self.resident_tiles = resident_tiles
        self.accumulators = accumulators
        self.score_tiles = score_tiles

    def shared_memory_bytes(self, config, head_dim, element_size):
        blocks = config.kwargs
        tile_rows = config.num_stages * 2 * blocks[self.looped_block] + self.resident_tiles * blocks[self.resident_block]
        return tile_rows * head_dim * element_size + SCRATCH_BYTES

    def values_per_thread(self, config, head_dim, element_size):
        """The register words one thread of `config` needs for its tiles, as the limit counts them.

        The fp32 accumulators count in full; the resident input tiles, which the compiler keeps in
        registers for the matrix products, in words (element_size / 4 a value); the score tiles as
        many words, as the compiler never keeps all of them live at once in fp32, and feeds the
        probabilities to the second product in the inputs' dtype.
        """
        blocks = config.kwargs
        resident = blocks[self.resident_block] * head_dim
        words_per_value = element_size / 4
        values = (self.accumulators * resident + self.resident_tiles * resident * words_per_value
                  + self.score_tiles * blocks["BLOCK_M"] * blocks["BLOCK_N"] * words_per_value)
        return values / (32 * config.num_warps)

    def useful(self, config, head_dim, element_size, lengths, smallest):
        blocks = config.kwargs
        if any(blocks[name] > max(lengths[name], smallest[name]) for name in lengths):
            return False
        if self.shared_memory_bytes(config, head_dim, element_size) > SHARED_MEMORY_BYTES:
            return False
        return self.values_per_thread(config, head_dim, element_size) <= MAX_VALUES_PER_THREAD

    def __call__(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        head_dim, element_size = args["HEAD_DIM_PADDED"], args["Q"].element_size()
        lengths = {"BLOCK_M": args["tune_len_q"], "BLOCK_N": args["tune_len_k"]}
        smallest = {name: min(c.kwargs[name] for c in configs) for name in lengths}
        kept = [c for c in configs if self.useful(c, head_dim, element_size, lengths, smallest)]
        if args["Q"].dtype == torch.float32 and args.get("DOT_PRECISION", "ieee") == "ieee":
            # Exact fp32 products unroll into fused multiply-adds whose operands all sit in registers:
            # the smallest tile over the most warps.
            return [min(configs, key=lambda c: (_tile_area(c), -c.num_warps, c.num_stages))]
        return kept or [min(configs, key=lambda c: (self.values_per_thread(c, head_dim, element_size), _tile_area(c)))]


def _tile_area(config):
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


# resident: Q; accumulator: O; score tiles: S and P
FORWARD_PRUNER = ConfigPruner("BLOCK_N", resident_tiles=1, accumulators=1, score_tiles=2)
# resident: K, V; accumulators: dK, dV; score tiles: P, dP, dS
BACKWARD_DKDV_PRUNER = ConfigPruner("BLOCK_M", resident_tiles=2, accumulators=2, score_tiles=3)
# resident: Q, dO; accumulator: dQ; score tiles: P, dP, dS
BACKWARD_DQ_PRUNER = ConfigPruner("BLOCK_N", resident_tiles=2, accumulators=1, score_tiles=3)


def _configs(hopper_tiles, kernel):
    return make_configs(hopper_tiles if autotuning() else [SINGLE_TILES[kernel]])


FORWARD_CONFIGS = _configs(HOPPER_FORWARD_TILES, "forward")
BACKWARD_DKDV_CONFIGS = _configs(HOPPER_BACKWARD_DKDV_TILES, "dkdv")
BACKWARD_DQ_CONFIGS = _configs(HOPPER_BACKWARD_DQ_TILES, "dq")

# Tuning is keyed on the head dimension and on the sequence lengths rounded up to powers of two
# (tune_len_q, tune_len_k), so that a growing sequence (generation) does not retune at every length.
TUNING_KEY = ["HEAD_DIM", "DOT_PRECISION", "tune_len_q", "tune_len_k"]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rows_tile(rows, n_rows, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr):
    """Column indices and the mask of a (len(rows), HEAD_DIM_PADDED) tile of one head's (T, D) matrix."""
    dims = tl.arange(0, HEAD_DIM_PADDED)
    mask = rows[:, None] < n_rows
    if HEAD_DIM != HEAD_DIM_PADDED:
        mask = mask & (dims[None, :] < HEAD_DIM)
    return dims, mask


@triton.jit
def _load_rows(base, rows, stride_t, n_rows, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """Rows `rows` of one head's (T, D) matrix as a (len(rows), HEAD_DIM_PADDED) tile; padding reads 0."""
    dims, mask = _rows_tile(rows, n_rows, HEAD_DIM, HEAD_DIM_PADDED)
    return tl.load(base + rows[:, None] * stride_t + dims[None, :], mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _store_rows(base, tile, rows, stride_t, n_rows, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr):
    """Store a tile into rows `rows` of one head's (T, D) matrix, in that matrix's dtype."""
    dims, mask = _rows_tile(rows, n_rows, HEAD_DIM, HEAD_DIM_PADDED)
    tl.store(base + rows[:, None] * stride_t + dims[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_start(base, batch_head, n_heads, stride_b, stride_h):
    """Where the (T, D) matrix of one (batch, head) pair starts in a (B, H, T, D) tensor (64-bit offsets)."""
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    return base + batch * stride_b + head * stride_h


@triton.jit
def _kv_head_start(base, batch_head, n_heads, kv_group, stride_b, stride_h):
    """Where the keys (or values) that query head `batch_head` attends with start in a (B, H / kv_group,
    T, D) tensor: grouped-query attention shares one key/value head among kv_group query heads."""
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads // kv_group).to(tl.int64)
    return base + batch * stride_b + head * stride_h


@triton.jit
def _backward_head_inputs(Q, K, V, DO, LSE, DELTA, batch_head, n_heads, kv_group, stride_qb, stride_qh,
                          stride_kb, stride_kh, stride_vb, stride_vh, stride_dob, stride_doh, seq_len_q):
    """Where one (batch, head)'s Q, dO, LSE and Delta start, and the K and V of the key/value head it
    attends with: what both backward kernels read."""
    rows = batch_head.to(tl.int64) * seq_len_q
    return (_head_start(Q, batch_head, n_heads, stride_qb, stride_qh),
            _kv_head_start(K, batch_head, n_heads, kv_group, stride_kb, stride_kh),
            _kv_head_start(V, batch_head, n_heads, kv_group, stride_vb, stride_vh),
            _head_start(DO, batch_head, n_heads, stride_dob, stride_doh), LSE + rows, DELTA + rows)


@triton.jit
def _load_query_rows(Q, DO, LSE, DELTA, queries, stride_qt, stride_dot, seq_len_q,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """q, dO, LSE and Delta of a block of query rows. Rows past the end load as zeros (dO = 0,
    Delta = 0), so their dS is zero."""
    q = _load_rows(Q, queries, stride_qt, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
    do = _load_rows(DO, queries, stride_dot, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
    lse = tl.load(LSE + queries, mask=queries < seq_len_q, other=0.0)
    delta = tl.load(DELTA + queries, mask=queries < seq_len_q, other=0.0)
    return q, do, lse, delta


@triton.jit
def _program_block(n_blocks, HEAVY_FIRST: tl.constexpr):
    """(batch x head index, block index) of this program on the one-dimensional grid.

    The blocks of one head are adjacent; with HEAVY_FIRST the last block (the one with the most
    causal work for a query block) comes first.
    """
    program = tl.program_id(0)
    batch_head = program // n_blocks
    block = program % n_blocks
    if HEAVY_FIRST:
        block = n_blocks - 1 - block
    return batch_head, block


@triton.jit
def _diagonal_keys(query_start, query_offset, seq_len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys [start, end) that a block of queries sees only partly: its diagonal band.

    Every key before `start` is visible to all BLOCK_M queries; `start` is rounded down to a key
    block so that the unmasked loop takes whole blocks. No query of the block sees a key at `end`
    or later.
    """
    start = (query_start + query_offset) // BLOCK_N * BLOCK_N
    end = tl.minimum(query_start + query_offset + BLOCK_M, seq_len_k)
    return start, end


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _forward_key_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, queries, key_start, key_end,
                        query_offset, seq_len_k, qk_scale,
                        CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online-softmax update of (acc, l_i, m_i) over the key blocks in [key_start, key_end).

    Scores stay unscaled (q k^T) until the exponent, where scaling and subtracting the running
    maximum are one fused multiply-add: exp2(qk * qk_scale - m).
    """
    for start_n in range(key_start, key_end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, keys, stride_kt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        v = _load_rows(V, keys, stride_vt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if CAUSAL_MASK:
            qk = tl.where(keys[None, :] <= queries[:, None] + query_offset, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@autotune(FORWARD_CONFIGS, TUNING_KEY, FORWARD_PRUNER)
@triton.jit
def _attention_forward_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_ob, stride_oh, stride_ot,
        n_heads, kv_group, seq_len_q, seq_len_k, qk_scale, tune_len_q, tune_len_k,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, DOT_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch_head, block = _program_block(tl.cdiv(seq_len_q, BLOCK_M), True)
    query_start = block * BLOCK_M
    Q = _head_start(Q, batch_head, n_heads, stride_qb, stride_qh)
    K = _kv_head_start(K, batch_head, n_heads, kv_group, stride_kb, stride_kh)
    V = _kv_head_start(V, batch_head, n_heads, kv_group, stride_vb, stride_vh)
    O = _head_start(O, batch_head, n_heads, stride_ob, stride_oh)
    LSE += batch_head.to(tl.int64) * seq_len_q
    query_offset = seq_len_k - seq_len_q

    queries = query_start + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, queries, stride_qt, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

    # Every row of the block sees at least its own diagonal key, so m_i is finite by the end.
    diagonal_start, diagonal_end = _diagonal_keys(query_start, query_offset, seq_len_k, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _forward_key_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, queries, 0, diagonal_start,
                                        query_offset, seq_len_k, qk_scale, False,
                                        HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _forward_key_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, queries, diagonal_start,
                                        diagonal_end, query_offset, seq_len_k, qk_scale, True,
                                        HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE, DOT_PRECISION, BLOCK_N)

    _store_rows(O, acc / l_i[:, None], queries, stride_ot, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED)
    tl.store(LSE + queries, m_i + tl.math.log2(l_i), mask=queries < seq_len_q)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _backward_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                           n_heads, seq_len_q,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = rowsum(dO_i * O_i) for one block of one head's query rows."""
    batch_head, block = _program_block(tl.cdiv(seq_len_q, BLOCK_M), False)
    O = _head_start(O, batch_head, n_heads, stride_ob, stride_oh)
    DO = _head_start(DO, batch_head, n_heads, stride_dob, stride_doh)
    DELTA += batch_head.to(tl.int64) * seq_len_q
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(O, rows, stride_ot, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED, tl.float32)
    do = _load_rows(DO, rows, stride_dot, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED, tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < seq_len_q)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, keys, query_start, query_end,
                       query_offset, seq_len_q, qk_scale,
                       CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK and dV of one key block over the query blocks in [query_start, query_end).

    Works on transposed tiles (keys x queries) so that the results come out with keys as rows.
    Query rows past the end load as zeros, which makes their dO, and so their share of dK and dV, zero.
    """
    for start_m in range(query_start, query_end, BLOCK_M):
        queries = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, queries, stride_qt, stride_dot, seq_len_q,
                                             HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)

        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(keys[:, None] <= queries[None, :] + query_offset, p_t, 0.0)
        dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_key_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, queries, key_start, key_end,
                   query_offset, seq_len_k, qk_scale,
                   CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ (without the final scale) of one query block over the key blocks in [key_start, key_end)."""
    for start_n in range(key_start, key_end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, keys, stride_kt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        v = _load_rows(V, keys, stride_vt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(keys[None, :] <= queries[:, None] + query_offset, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_backward_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt, stride_dkb, stride_dkh, stride_dkt,
        n_heads, kv_group, seq_len_q, seq_len_k, scale, qk_scale, tune_len_q, tune_len_k,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, DOT_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_BLOCKS: tl.constexpr):
    """One program's share of the backward: with KEY_BLOCKS, dK and dV of one block of BLOCK_N keys
    (over every query that sees it); otherwise dQ of one block of BLOCK_M queries (over every key it
    sees). The two are launched one after the other, each autotuned on its own (below)."""
    # dK/dV: the first key blocks are seen by the most queries, so the natural order is heavy first;
    # dQ: the last query blocks see the most keys, so they go first.
    n_blocks = tl.cdiv(seq_len_k, BLOCK_N) if KEY_BLOCKS else tl.cdiv(seq_len_q, BLOCK_M)
    batch_head, block = _program_block(n_blocks, not KEY_BLOCKS)
    Q, K, V, DO, LSE, DELTA = _backward_head_inputs(Q, K, V, DO, LSE, DELTA, batch_head, n_heads, kv_group,
                                                    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                                                    stride_vh, stride_dob, stride_doh, seq_len_q)
    query_offset = seq_len_k - seq_len_q

    if KEY_BLOCKS:
        DK = _head_start(DK, batch_head, n_heads, stride_dkb, stride_dkh)  # dV has dK's layout
        DV = _head_start(DV, batch_head, n_heads, stride_dkb, stride_dkh)
        key_start = block * BLOCK_N
        keys = key_start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, keys, stride_kt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        v = _load_rows(V, keys, stride_vt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)

        # Query i sees key j when i >= j - query_offset. The queries in the band of BLOCK_N rows
        # starting at key_start - query_offset see part of this key block; every later query sees
        # all of it, and no earlier query sees any of it.
        diagonal_start = tl.maximum(key_start - query_offset, 0)
        diagonal_end = tl.maximum(key_start + BLOCK_N - query_offset, 0)
        full_start = diagonal_start + tl.cdiv(diagonal_end - diagonal_start, BLOCK_M) * BLOCK_M
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, keys, diagonal_start,
                                    full_start, query_offset, seq_len_q, qk_scale, True,
                                    HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE, DOT_PRECISION, BLOCK_M)
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, keys, full_start,
                                    seq_len_q, query_offset, seq_len_q, qk_scale, False,
                                    HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE, DOT_PRECISION, BLOCK_M)
        _store_rows(DK, dk * scale, keys, stride_dkt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED)
        _store_rows(DV, dv, keys, stride_dkt, seq_len_k, HEAD_DIM, HEAD_DIM_PADDED)
    else:
        DQ = _head_start(DQ, batch_head, n_heads, stride_dqb, stride_dqh)
        query_start = block * BLOCK_M
        queries = query_start + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, queries, stride_qt, stride_dot, seq_len_q,
                                             HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE)
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

        diagonal_start, diagonal_end = _diagonal_keys(query_start, query_offset, seq_len_k, BLOCK_M, BLOCK_N)
        dq = _dq_key_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, queries, 0, diagonal_start,
                            query_offset, seq_len_k, qk_scale, False,
                            HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE, DOT_PRECISION, BLOCK_N)
        dq = _dq_key_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, queries, diagonal_start,
                            diagonal_end, query_offset, seq_len_k, qk_scale, True,
                            HEAD_DIM, HEAD_DIM_PADDED, DOT_DTYPE, DOT_PRECISION, BLOCK_N)
        _store_rows(DQ, dq * scale, queries, stride_dqt, seq_len_q, HEAD_DIM, HEAD_DIM_PADDED)


# The same kernel twice, autotuned apart: the dK/dV programs keep a key block resident and stream
# query blocks, the dQ programs the other way round, so their best tiles differ. KEY_BLOCKS in the
# key keeps their timings apart in the cache on disk, which knows them by the kernel's source.
_attention_backward_dkdv_kernel = autotune(BACKWARD_DKDV_CONFIGS, TUNING_KEY + ["KEY_BLOCKS"], BACKWARD_DKDV_PRUNER)(
    _attention_backward_kernel)
_attention_backward_dq_kernel = autotune(BACKWARD_DQ_CONFIGS, TUNING_KEY + ["KEY_BLOCKS"], BACKWARD_DQ_PRUNER)(
    _attention_backward_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
DELTA_BLOCK = 64  # rows per program of the small Delta kernel


def dot_dtype(dtype):
    """The dtype of the tl.dot operands for inputs of `dtype` (see the module docstring for bf16)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TRITON_DTYPES[dtype]


def _head_dims(head_dim):
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel takes head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    return {"HEAD_DIM": head_dim, "HEAD_DIM_PADDED": max(MIN_BLOCK, triton.next_power_of_2(head_dim))}


def heads_major_grid(batch_heads, n_blocks):
    """The one-dimensional launch grid of (batch x head, block) programs; raises if CUDA cannot launch it."""
    programs = batch_heads * n_blocks
    if programs >= INT32_LIMIT:
        raise ValueError(f"attention over {batch_heads} (batch x head) pairs in {n_blocks} blocks needs {programs} "
                         f"programs, more than a CUDA grid holds (2^31 - 1): use a smaller batch")
    return (programs,)


def check_offsets_within_a_head(name, x):
    """Offsets inside one head's (T, D) matrix are 32-bit in the kernels: make sure they fit."""
    _, _, seq_len, head_dim = x.shape
    if seq_len and (seq_len - 1) * x.stride(2) + head_dim >= INT32_LIMIT:
        raise ValueError(f"{name} spans {(seq_len - 1) * x.stride(2) + head_dim} elements within one head, "
                         f"more than the Triton attention kernels index (2^31): use a shorter sequence")


def _shape_args(q, k):
    """The launch arguments that describe q's and k's shapes, shared by all attention kernels."""
    batch, n_heads, seq_len_q, head_dim = q.shape
    seq_len_k = k.shape[2]
    return dict(n_heads=n_heads, kv_group=n_heads // k.shape[1], seq_len_q=seq_len_q, seq_len_k=seq_len_k,
                tune_len_q=triton.next_power_of_2(seq_len_q), tune_len_k=triton.next_power_of_2(seq_len_k),
                DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype), **_head_dims(head_dim))


def _strides(*tensors):
    """The (batch, head, time) strides of each (B, H, T, D) tensor, in order."""
    return [stride for x in tensors for stride in x.stride()[:3]]


def _prepare(named):
    """Each (B, H, T, D) input with contiguous rows, its within-head offsets checked."""
    prepared = []
    for name, x in named.items():
        x = unit_stride_rows(x)
        check_offsets_within_a_head(name, x)
        prepared.append(x)
    return prepared


def _grid(batch_heads, seq_len, block):
    return lambda meta: heads_major_grid(batch_heads, triton.cdiv(seq_len, meta[block]))


def forward(q, k, v, scale):
    """O (a (B, H, T, D) view of (B, T, H, D) memory) and the base-2 log-sum-exp (B, H, Tq) in fp32."""
    if not scale > 0:  # the kernels scale scores after taking their maximum, which needs scale > 0
        raise ValueError(f"the Triton attention kernels take a positive scale, got {scale}")
    q, k, v = _prepare({"q": q, "k": k, "v": v})
    batch, n_heads, seq_len_q, head_dim = q.shape
    out = empty_heads(q.shape, q)
    check_offsets_within_a_head("the output", out)
    lse = torch.empty((batch, n_heads, seq_len_q), dtype=torch.float32, device=q.device)
    _attention_forward_kernel[_grid(batch * n_heads, seq_len_q, "BLOCK_M")](
        q, k, v, out, lse, *_strides(q, k, v, out), qk_scale=scale * LOG2_E, **_shape_args(q, k))
    return out, lse


def backward(grad_out, q, k, v, out, lse, scale):
    """(dQ, dK, dV) of causal attention, given the forward's inputs, output and log-sum-exp.

    The gradients are (B, H, T, D) views of (B, T, H, D) memory, like the forward's output. With
    grouped-query attention (k and v with H / kv_group heads), each query head's share of dK and dV is
    written to a buffer of H heads and the kv_group shares of a key/value head are summed afterwards,
    in fp32: deterministic, at the price of that buffer.
    """
    q, k, v, out, grad_out = _prepare({"q": q, "k": k, "v": v, "the output": out, "its gradient": grad_out})
    batch, n_heads, seq_len_q, head_dim = q.shape
    seq_len_k = k.shape[2]
    kv_heads = k.shape[1]
    dq = empty_heads(q.shape, q)
    # With grouped-query attention, buffers of H heads, each query head's share (summed below).
    dk = empty_heads((batch, n_heads, seq_len_k, head_dim), k)
    dv = empty_heads((batch, n_heads, seq_len_k, head_dim), v)
    for name, x in (("dq", dq), ("dk", dk)):
        check_offsets_within_a_head(name, x)
    delta = torch.empty_like(lse)

    batch_heads = batch * n_heads
    _backward_delta_kernel[heads_major_grid(batch_heads, triton.cdiv(seq_len_q, DELTA_BLOCK))](
        out, grad_out, delta, *_strides(out, grad_out), n_heads, seq_len_q,
        BLOCK_M=DELTA_BLOCK, **_head_dims(head_dim))
    args = (q, k, v, grad_out, lse, delta, dq, dk, dv, *_strides(q, k, v, grad_out, dq, dk))
    sizes = dict(qk_scale=scale * LOG2_E, scale=scale, **_shape_args(q, k))
    _attention_backward_dkdv_kernel[_grid(batch_heads, seq_len_k, "BLOCK_N")](*args, KEY_BLOCKS=True, **sizes)
    _attention_backward_dq_kernel[_grid(batch_heads, seq_len_q, "BLOCK_M")](*args, KEY_BLOCKS=False, **sizes)
    if kv_heads != n_heads:
        dk, dv = (_sum_over_groups(grad, kv_heads) for grad in (dk, dv))
    return dq, dk, dv


def _sum_over_groups(grad, kv_heads):
    """A (B, H, T, D) view of (B, T, H, D) memory summed over each group of H / kv_heads adjacent heads."""
    batch, n_heads, seq_len, head_dim = grad.shape
    memory = grad.transpose(1, 2).view(batch, seq_len, kv_heads, n_heads // kv_heads, head_dim)
    return memory.sum(3, dtype=torch.float32).to(grad.dtype).transpose(1, 2)
