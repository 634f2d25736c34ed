"""The GPT model: GPT-2's architecture exactly by default, in the order a reader needs the pieces.

Token and position embeddings feed a stack of blocks; each block is pre-LayerNorm masked multi-head
self-attention followed by a GELU MLP, each with a residual connection; a final LayerNorm and a
language-model head, tied to the token embedding, turn the last hidden states into next-token logits.

The switches of GPTConfig swap single pieces for the ones later models use, each on its own so that
an experiment can measure what it buys: RMSNorm for LayerNorm (`norm`), rotary positions inside
attention for learned embeddings (`position`), SwiGLU or ReLU^2 for GELU (`mlp`), fewer key/value
heads than query heads (`n_kv_head`, grouped-query attention), RMS-normalised queries and keys
(`qk_norm`) and a head with its own weight (`tie_embeddings`). All of them together, without biases,
is Llama's architecture.

Attention, the norms, rotary positions and the MLP activations go through `fastgpt.ops`, which runs
them on the fastest backend available for the tensors' device (fused C++ on CPU, Triton on GPU) or on
the plain-PyTorch reference. Which backend is a run-time choice of the process (`ops.use_backend`),
not part of the model.

Generation decodes one token at a time with a key/value cache, so each new token costs one row of
attention per layer instead of a pass over the whole context.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import hf, ops
from fastgpt.distributed import fully_sharded
from fastgpt.errors import FastGPTError
from fastgpt.hf.gpt2 import MLP_RATIO
from fastgpt.settings import check_values, setting


DEFAULT_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class GPTConfig:
    """The model's settings: its sizes, its architecture switches, and its dropout.

    Each field's `kind` says what a difference in it means:

    - "size" (a size, or whether a tensor exists): the weights' shapes. Fused ops read it off the
      tensors they are given.
    - "switch", the default: a choice of what the model computes. A fused op that computes a whole
      block is used only for a block whose switches it was written for (`block_description`).
      A switch's default is GPT-2's choice, which checkpoints made before the switch existed had.
    - "training": used by training only; a resumed run may change it.

    Sizes and switches are the architecture: a checkpoint resumes, and weights load, only into a
    model with the same ones (`architecture_differences`).
    """

    vocab_size: int = setting(1024, "tokens in the vocabulary; the bpe tokenizer is trained to this many, while the "
                                    "char and gpt2 tokenizers bring their own", kind="size", minimum=1)
    block_size: int = setting(128, "context length in tokens", kind="size", minimum=1)
    n_layer: int = setting(4, "number of transformer blocks", kind="size", minimum=1)
    n_head: int = setting(4, "attention heads per block", kind="size", minimum=1)
    n_embd: int = setting(128, "width of the residual stream", kind="size", minimum=1)
    n_kv_head: int = setting(0, "key/value heads, dividing n_head: grouped-query attention shares each among "
                                "n_head / n_kv_head query heads (0: n_head, GPT-2's; 1: multi-query)",
                             kind="size", minimum=0)
    mlp_hidden: int = setting(0, "width of the MLP's hidden layer (0: 4 n_embd; for swiglu 8/3 n_embd rounded up "
                                 "to a multiple of 64, the same number of weights)", kind="size", minimum=0)
    bias: bool = setting(True, "biases in Linear layers and LayerNorms (GPT-2 has them)", kind="size")
    tie_embeddings: bool = setting(True, "the language-model head shares the token embedding's weight (GPT-2) "
                                         "instead of having its own", kind="size")
    norm: str = setting("layernorm", "the norms: layernorm (GPT-2) or rmsnorm", ["layernorm", "rmsnorm"])
    norm_eps: float = setting(1e-5, "epsilon of every norm, added to the variance (GPT-2: 1e-5)")
    position: str = setting("learned", "positions: learned embeddings added to the tokens' (GPT-2), or rope "
                                       "(rotary positions applied to queries and keys)", ["learned", "rope"])
    rope_base: float = setting(DEFAULT_ROPE_BASE, "rope: the base of the rotary frequencies")
    mlp: str = setting("gelu", "the MLP: gelu (GPT-2, tanh approximation), swiglu (SiLU-gated, Llama's), or relu2 "
                               "(ReLU squared)", ["gelu", "swiglu", "relu2"])
    qk_norm: bool = setting(False, "RMS-normalise each head's queries and keys (no gain) before rope and "
                                   "attention")
    dropout: float = setting(0.0, "dropout probability on embeddings and residual branches", kind="training")

    def validate(self):
        """Refuse values no model can have, with a message saying which and why."""
        check_values(self)
        if self.n_embd % self.n_head:
            raise FastGPTError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                               "each head gets n_embd / n_head channels")
        if self.n_head % self.kv_heads:
            raise FastGPTError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value "
                               "head serves the same number of query heads")
        if self.position == "rope" and self.head_dim % 2:
            raise FastGPTError(f"rope rotates pairs of channels: the head size n_embd / n_head must be even "
                               f"(got {self.head_dim})")
        for name in ("norm_eps", "rope_base"):
            if not getattr(self, name) > 0:
                raise FastGPTError(f"{name} must be positive (got {getattr(self, name)})")
        if self.position != "rope" and self.rope_base != DEFAULT_ROPE_BASE:
            # It would change nothing the model computes, yet count as a switch (resume, export, decoding).
            raise FastGPTError(f"rope_base {self.rope_base} is the base of rotary positions, and position is "
                               f"{self.position}: add --position rope, or leave rope_base at {DEFAULT_ROPE_BASE}")
        if not 0 <= self.dropout < 1:
            raise FastGPTError(f"dropout must be in [0, 1) (got {self.dropout})")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hidden_width(self):
        """The MLP's hidden layer: mlp_hidden, or by default 4 n_embd, or for swiglu, whose input
        projection is two matrices (gate and up), 8/3 n_embd (rounded up to a multiple of 64)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return -(-2 * MLP_RATIO * self.n_embd // 3 // 64) * 64
        return MLP_RATIO * self.n_embd

    def to_dict(self):
        return asdict(self)

    def _of_kind(self, *kinds):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("kind", "switch") in kinds}

    def architecture_differences(self, other):
        """The sizes and switches in which `other` differs from this config: ["n_embd 16 vs 32", ...].
        A size left at 0 counts as what it stands for (n_kv_head 0 is n_head), so that two ways of
        writing one model are not taken for two models."""
        ours, theirs = self._of_kind("size", "switch"), other._of_kind("size", "switch")
        resolved = {"n_kv_head": (self.kv_heads, other.kv_heads), "mlp_hidden": (self.hidden_width, other.hidden_width)}
        differences = []
        for name, value in ours.items():
            shown = resolved.get(name, (value, theirs[name]))
            if value != theirs[name] and shown[0] != shown[1]:
                differences.append(f"{name} {shown[0]} vs {shown[1]}")
        return differences

    def block_description(self):
        """What one block computes, apart from the sizes a fused op reads off its tensors: the
        switches, and whether key/value heads are shared (which a (B, Hkv, T, D) cache alone does not
        tell), as sorted (name, value) pairs. A fused op for a whole block declares the one
        description it computes (fastgpt.ops.block_decoder)."""
        return tuple(sorted({**self._of_kind("switch"), "grouped_query": self.kv_heads != self.n_head}.items()))

    def non_gpt2_switches(self):
        """The switches set to something other than GPT-2's choice: {name: value}."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("kind", "switch") == "switch" and getattr(self, f.name) != f.default}


def without_unused_rope_base(settings):
    """Model settings ({name: value}) with rope_base at its default where positions are learned, where it
    computes nothing: validation refuses it there, and a checkpoint saved before that then resumes,
    loads and exports as the model it is."""
    return settings if settings.get("position", "learned") == "rope" else {**settings, "rope_base": DEFAULT_ROPE_BASE}


def dropout(x, p, training):
    """F.dropout, skipped outright when it would change nothing (evaluation, or p = 0): a one-token
    decoding step is short enough for a call that does nothing to show in its time."""
    return F.dropout(x, p, training) if training and p > 0 else x


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one), computed by fastgpt.ops."""

    def __init__(self, n_embd, bias, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.eps = eps

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (x / sqrt(mean(x^2) + eps), times a gain): LayerNorm without the mean and the bias."""

    def __init__(self, n_embd, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.eps = eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


def norm(config):
    """The norm the config asks for, over the residual stream."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return LayerNorm(config.n_embd, config.bias, config.norm_eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # One projection makes the queries of all heads and the keys and values of all key/value
        # heads at once (GPT-2: as many of each).
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.rope_base = config.rope_base if config.position == "rope" else None
        self.qk_norm_eps = config.norm_eps if config.qk_norm else None

    def forward(self, x, cache=None):
        B, T, C = x.shape
        D = self.head_dim
        # (B, T, (H + 2 Hkv) * D) -> (B, H + 2 Hkv, T, D), a view: the fused kernels read its strides directly.
        qkv = self.c_attn(x).view(B, T, -1, D).transpose(1, 2)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        # Queries and keys are normalised and rotated alike, so each op takes all their heads in one call.
        if self.qk_norm_eps is not None:
            qk = ops.rms_norm(qk, None, self.qk_norm_eps)
        if self.rope_base is not None:
            # The new tokens' positions follow the cached ones'.
            qk = ops.rotary(qk, offset=cache.position if cache is not None else 0, base=self.rope_base)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        if cache is not None:
            # The new queries attend over every cached key as well as the new ones; the op aligns
            # its causal mask to the end, so query i sees the cache and the new keys up to its own.
            k, v = cache.append(k, v)
        # The fused kernels never materialise the attention matrix, so there is no dropout on it:
        # regularisation comes from dropout on the residual branches and the embeddings.
        y = ops.causal_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, C)
        return dropout(self.c_proj(y), self.dropout, self.training)


class KVCache:
    """The keys and values one attention layer has computed so far, in (B, Hkv, T, D) tensors.

    Earlier tokens' keys and values never change (attention is causal), so decoding computes them
    once and each new token only adds its own row. The rows live in one buffer sized for the whole
    context (block_size), allocated when first needed (`reserve`), so adding a token writes one row
    instead of copying every cached row into a new, longer tensor.

    A sliding cache (`slides`, for rotary positions) makes room when full by dropping its oldest rows:
    rotated keys depend only on positions relative to the queries', so the rows it keeps stay valid
    while positions go on counting past block_size.
    """

    def __init__(self, block_size, slides=False):
        self.block_size = block_size
        self.slides = slides
        self.length = 0
        self.dropped = 0  # rows dropped to make room, by a sliding cache
        self.k = self.v = None  # (B, Hkv, block_size, D) buffers, once something is cached

    def __len__(self):
        return self.length

    @property
    def position(self):
        """The position of the next token: how many tokens the cache has seen."""
        return self.dropped + self.length

    def reserve(self, n, batch, n_head, head_dim, like):
        """The two buffers, once it is checked that they have room for n more positions.

        The caller writes the new rows (from row len(self) on), then counts them with `advance`.
        The buffers are allocated at the first call, with `like`'s dtype and device.
        """
        if self.length + n > self.block_size:
            raise ValueError(f"the cache holds at most {self.block_size} positions, not {self.length + n}")
        if self.k is None:
            self.k = like.new_empty(batch, n_head, self.block_size, head_dim)
            self.v = like.new_empty(batch, n_head, self.block_size, head_dim)
        return self.k, self.v

    def advance(self, n):
        """Count n new rows, once they are written (a failed write leaves the cache as it was)."""
        self.length += n

    def append(self, k, v):
        """Add the new tokens' k and v; return (views of) the keys and values of all the tokens held."""
        B, H, T, D = k.shape
        if self.slides and self.length + T > self.block_size:
            self._drop(min(self.length, self.length + T - self.block_size))
        k_buffer, v_buffer = self.reserve(T, B, H, D, k)
        start = self.length
        k_buffer[:, :, start:start + T] = k
        v_buffer[:, :, start:start + T] = v
        self.advance(T)
        return k_buffer[:, :, :start + T], v_buffer[:, :, :start + T]

    def _drop(self, n):
        """Forget the n oldest rows, moving the others to the front of the buffers."""
        kept = self.length - n
        for buffer in (self.k, self.v):
            buffer[:, :, :kept] = buffer[:, :, n:self.length].clone()
        self.length = kept
        self.dropped += n


# GPT-2 uses the tanh approximation of GELU (matching it lets GPT-2 weights load unchanged). SwiGLU
# takes the gate and up projections side by side, [gate, up], as one matrix product makes them.
ACTIVATIONS = {"gelu": ops.gelu, "swiglu": ops.swiglu, "relu2": ops.relu_squared}


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_width
        inputs = 2 * hidden if config.mlp == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, inputs, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.activation = ACTIVATIONS[config.mlp]
        self.dropout = config.dropout

    def forward(self, x):
        return dropout(self.c_proj(self.activation(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x

    def decode(self, x, cache, decoder):
        """forward for one new token per sequence (x: (B, 1, C)), with a cache, as the backend's one
        fused op (`decoder`, from ops.block_decoder); inference only."""
        B, _, C = x.shape
        n_head = self.attn.n_head
        k_buffer, v_buffer = cache.reserve(1, B, n_head, C // n_head, x)
        # One eps serves both LayerNorms: the model gives every norm the same (norm_eps).
        y = decoder(x.view(B, C), self.decode_parameters(), k_buffer, v_buffer, len(cache), self.ln_1.eps)
        cache.advance(1)
        return y.view(B, 1, C)

    def decode_parameters(self):
        """The block's parameters in the fused op's order: weight and bias (or None) of ln_1, the
        attention's two projections, ln_2, and the MLP's two projections.

        They are read from the modules' registries (`_modules`, `_parameters`) rather than as
        attributes: nn.Module resolves each attribute in Python (its __getattr__), and twenty such
        lookups per block took as long as the fused op itself.
        """
        modules = self._modules
        attn, mlp = modules["attn"]._modules, modules["mlp"]._modules
        layers = (modules["ln_1"], attn["c_attn"], attn["c_proj"], modules["ln_2"], mlp["c_fc"], mlp["c_proj"])
        return tuple(p for layer in layers for p in (layer._parameters["weight"], layer._parameters.get("bias")))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()  # a misspelt switch is an error here, not a model that silently lacks it
        self.config = config
        # Asked of the backend at every one-token decoding step, so worked out once.
        self.block_description = config.block_description()
        # Learned positions are an embedding of their own; rotary ones are applied inside attention.
        positions = {"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.position == "learned" else {}
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **positions,
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the output projection reuses the token embedding (fewer parameters, and
            # tokens that mean alike are both embedded and predicted alike).
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02/sqrt(2 n_layer),
        # so the residual stream's variance does not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_positions=True):
        """Parameter count; position embeddings are usually left out (they cost no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def slides(self):
        """Whether the model's window can slide over a cached context one token at a time: with
        rotary positions, which are relative, it can; learned positions are absolute."""
        return self.config.position == "rope"

    def new_cache(self):
        """An empty key/value cache for `forward(..., cache=)`: one KVCache per block."""
        return [KVCache(self.config.block_size, self.slides) for _ in self.transformer.h]

    def forward(self, idx, targets=None, cache=None):
        """Logits for each position of idx (B, T); with targets, also the mean cross-entropy loss.

        With a cache (from `new_cache`), idx holds only the tokens that follow the cached ones: they
        take the next positions, and their keys and values are added to the cache (which, for a
        model that slides, drops its oldest rows to make room).
        """
        B, T = idx.shape
        held = len(cache[0]) if cache else 0
        if T > self.config.block_size or (held + T > self.config.block_size and not self.slides):
            raise ValueError(f"sequence of length {held + T} is longer than the block size {self.config.block_size}")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(held, held + T, device=idx.device))
        x = dropout(x, self.config.dropout, self.training)
        # One new token per sequence, in inference: where the backend fuses this kind of block into
        # one op for this case (ops.block_decoder), each block is that op instead of about twenty.
        # Not under autocast, whose choice of precision per op the fused op would not follow, nor on
        # blocks sharded by FSDP, whose weights are gathered only when a block itself is called.
        inference = (not torch.is_grad_enabled() and not (self.training and self.config.dropout > 0)
                     and not torch.is_autocast_enabled(x.device.type) and not fully_sharded(self.transformer.h[0]))
        decoder = ops.block_decoder(x, self.block_description) if cache and T == 1 and inference else None
        for block, layer_cache in zip(self.transformer.h, cache or [None] * len(self.transformer.h)):
            x = block.decode(x, layer_cache, decoder) if decoder else block(x, layer_cache)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = ops.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1)).mean()
        return logits, loss

    @classmethod
    def from_pretrained(cls, directory):
        """A GPT-2 or Llama saved in the Hugging Face layout in `directory` (see fastgpt.hf), in evaluation
        mode; nothing is downloaded. fastgpt.pretrained.load_pretrained also reads its tokenizer."""
        model = cls(GPTConfig(**hf.read_config(directory)))
        model.load_state_dict(hf.read_state_dict(directory, model.config, model.state_dict()))
        return model.eval()

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0,
                 generator=None, use_cache=True):
        """Extend idx (B, T) by max_new_tokens tokens, one at a time, yielding each new (B, 1) column.

        How each token is chosen is `Sampler`'s business (temperature, top_k, top_p, repetition_penalty).
        The model attends over at most block_size tokens. When the context is full:

        - a model with rotary positions slides its window by one token: its cache drops the oldest
          row and keeps the rest, which stay valid because rotary positions are relative. Each new
          token costs one step, as before. The kept keys of later layers still carry some of what has
          left the window (as in sliding-window attention), so past the context this is not the same
          as a fresh pass over the last block_size tokens, which `use_cache=False` makes;
        - a model with learned positions drops the oldest half instead and goes on from the newest
          half, at positions starting again from 0 as in training: dropping one token per step would
          shift every absolute position at every step, so no cached key would stay valid and each
          step would cost a full pass. The same windows are used with and without the cache, so
          `use_cache=False` gives the same tokens, only slower.
        """
        sampler = Sampler(temperature, top_k, top_p, repetition_penalty)
        if idx.dim() != 2 or idx.size(1) == 0 or idx.dtype != torch.long:
            raise ValueError(f"generate continues a (batch, tokens) tensor of token ids (int64) with at least one "
                             f"token, got {idx.dtype}{tuple(idx.shape)}; give one prompt as prompt[None]")
        if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < self.config.vocab_size:
            raise ValueError(f"generate: the prompt holds token ids outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        block_size = self.config.block_size
        start = max(0, idx.size(1) - block_size)  # where the model's window begins in idx
        cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block_size and self.slides:
                start = idx.size(1) - block_size
            elif idx.size(1) - start > block_size:
                start = idx.size(1) - max(1, block_size // 2)
                cache = None
            # Inference mode skips all autograd bookkeeping, which no_grad still does per op: the
            # cheapest way to run steps this small. The token is copied out of it, so that callers
            # get an ordinary tensor (one they may, say, train on later).
            with torch.inference_mode():
                if not use_cache:
                    logits, _ = self(idx[:, start:])
                elif cache is None:
                    cache = self.new_cache()
                    logits, _ = self(idx[:, start:], cache=cache)
                else:
                    logits, _ = self(idx[:, -1:], cache=cache)
                next_token = sampler(logits[:, -1, :].float(), idx, generator)
            next_token = next_token.clone()
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token


@dataclass
class Sampler:
    """How the next token is chosen from the logits.

    temperature 0 picks the most likely token; otherwise tokens are sampled from the softmax of
    logits / temperature, restricted to the top_k most likely (None or 0: all) and then to the smallest
    set of most likely tokens whose probabilities add up to top_p (nucleus sampling; 1: all).
    repetition_penalty > 1 makes tokens already in the sequence less likely (as in CTRL): a positive
    logit is divided by it, a negative one multiplied.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise FastGPTError(f"temperature must be a finite number at least 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 0:
            raise FastGPTError(f"top_k must be at least 1, or 0 or None for all tokens (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise FastGPTError(f"top_p must be in (0, 1] (got {self.top_p}); 1 keeps every token")
        if not self.repetition_penalty > 0:
            raise FastGPTError(f"repetition_penalty must be positive (got {self.repetition_penalty}); 1 means none")

    def __call__(self, logits, seen, generator=None):
        """The next token (B, 1) for float logits (B, V), given the tokens `seen` so far (B, T)."""
        if self.repetition_penalty != 1.0:
            scores = logits.gather(1, seen)
            scores = torch.where(scores > 0, scores / self.repetition_penalty, scores * self.repetition_penalty)
            logits = logits.scatter(1, seen, scores)
        if self.temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        # Shifting the largest logit to 0 first keeps a tiny temperature from overflowing to inf - inf.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / self.temperature
        if self.top_k:  # None or 0: all
            kth_best = torch.topk(logits, min(self.top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probabilities = torch.softmax(sorted_logits, dim=-1)
            # A token stays if the likelier tokens before it add up to less than top_p, so the
            # likeliest token always stays.
            before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities
            sorted_removed = before >= self.top_p
            removed = torch.empty_like(sorted_removed).scatter_(1, order, sorted_removed)  # vocabulary order
            logits = logits.masked_fill(removed, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1)
        return torch.multinomial(probabilities, num_samples=1, generator=generator)
