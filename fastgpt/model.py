"""The GPT model, GPT-2's architecture exactly, in the order a reader needs the pieces.

Token and position embeddings feed a stack of blocks; each block is pre-LayerNorm masked multi-head
self-attention followed by a GELU MLP, each with a residual connection; a final LayerNorm and a
language-model head, tied to the token embedding, turn the last hidden states into next-token logits.

Attention and LayerNorm go through `fastgpt.ops`, which runs them on the fastest backend available
for the tensors' device (fused C++ on CPU, Triton on GPU) or on the plain-PyTorch reference.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import ops


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256  # the longest context the model attends over
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has them
    backend: str = "auto"  # which fastgpt.ops backend runs attention and LayerNorm

    def to_dict(self):
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one), eps 1e-5, computed by fastgpt.ops."""

    def __init__(self, n_embd, bias, backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.backend = backend

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, 1e-5, backend=self.backend)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # One projection makes queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.backend = config.backend

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, 3, H, D) -> three (B, H, T, D) views; the fused kernels read these strides directly.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # The fused kernels never materialise the attention matrix, so there is no dropout on it:
        # regularisation comes from dropout on the residual branches and the embeddings.
        y = ops.causal_attention(q, k, v, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU; matching it lets GPT-2 weights load unchanged.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.backend)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.backend)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, config.backend),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        return n - self.transformer.wpe.weight.numel() if exclude_positions else n

    def forward(self, idx, targets=None):
        """Logits for each position of idx (B, T); with targets, also the mean cross-entropy loss."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the block size {self.config.block_size}")
        positions = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def configure_optimizer(self, learning_rate, weight_decay, betas, device_type):
        """AdamW that decays only 2-D weights (matmuls, embeddings), never biases or LayerNorm gains."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused AdamW step is faster on GPUs; on CPU the default implementation is used.
        fused = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens, one at a time, yielding each new (B, 1) column.

        temperature 0 picks the most likely token; otherwise tokens are sampled from the softmax of
        logits / temperature, restricted to the top_k most likely when top_k is given.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth_best, float("-inf"))
                probabilities = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probabilities, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token
