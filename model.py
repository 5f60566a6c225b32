"""The transformer: token ids in, logits (or, given targets, the loss) out.

Read top to bottom: attention (with the learned attention sink), MLP, block, the optional one-token look-back
(--smear, --bigram_embedding) and value tables (--value_embeddings), the GPT itself, then the KV cache and
`generate` for sampling. This file knows nothing of data, optimizers or logging.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import skip_init

from config import Config, UserError, bigram_rows, check_bigram_rows


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Matmuls are faster when the vocab is a multiple of 64; the extra ids get -inf logits."""
    return math.ceil(vocab_size / multiple) * multiple


def make_norm(cfg: Config, dim: int) -> nn.Module:
    """The norm before each block and the head: RMSNorm (a gain), or GPT-2's LayerNorm (a gain and a bias)."""
    return nn.LayerNorm(dim) if cfg.norm == "layernorm" else nn.RMSNorm(dim)


ACTIVATIONS = {
    "relu2": lambda h: F.relu(h).square(),
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),  # GPT-2's "gelu_new"
}


# ----------------------------------------------------------------------------------------------------------------
# Attention


def rotary_tables(head_dim: int, max_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_len, head_dim // 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention; compiled on a CPU it takes the math path, which inductor fuses into the
    surrounding kernels (the CPU flash kernel is slower at small heads, and 3x slower backward in bf16)."""
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention_with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Causal softmax attention whose denominator also holds exp(sink[h]), so weights may sum to less than one.

    q is (B, H, Tq, D) and holds the last Tq positions of k, v (B, H, Tk, D): Tq == Tk (training, prefill)
    or Tq == 1 (decoding with a KV cache). Without a sink this is plain causal SDPA.

    The sink stays on SDPA's fused path as one extra key: with q' = [q, 1], k' = [k, 0] and a sink key
    [0, sink / scale] whose value is 0, every query scores the sink key exactly `sink` and the sink adds
    exp(sink) to the denominator and nothing to the numerator — the gpt-oss definition, exactly.
    Fused kernels need q, k, v of one width, so v is padded too; on CUDA the width is rounded up to a multiple
    of 8 for FlashAttention. The sink key sits at position 0, so in the (Tk+1)-long causal problem query i must
    be at row i+1: a dummy query fills row 0 and its output is dropped. Compiled on a CPU, where SDPA has no
    fused kernel to keep, training and prefill take sink_attention_scores instead.
    """
    tq, tk = q.size(-2), k.size(-2)
    if sink is None:
        return sdpa(q, k, v, is_causal=tq > 1)
    if q.device.type == "cpu" and torch.compiler.is_compiling() and tq == tk > 1:
        return sink_attention_scores(q, k, v, sink)
    b, h, _, d = q.shape
    extra = 1 if q.device.type != "cuda" else 8 - d % 8
    scale = d**-0.5

    def widen(x: torch.Tensor, first: float) -> torch.Tensor:  # append [first, 0, 0, ...] to the head dim
        tail = x.new_zeros(*x.shape[:-1], extra)
        if first:
            tail[..., 0] = first
        return torch.cat((x, tail), dim=-1)

    sink_key = torch.cat(
        (q.new_zeros(b, h, 1, d), (sink.to(q.dtype) / scale).view(1, h, 1, 1).expand(b, h, 1, 1)), dim=-1
    )
    sink_key = F.pad(sink_key, (0, extra - 1))
    k_ext = torch.cat((sink_key, widen(k, 0.0)), dim=2)
    v_ext = torch.cat((v.new_zeros(b, h, 1, d + extra), widen(v, 0.0)), dim=2)
    q_ext = widen(q, 1.0)
    if tq == 1:  # decoding: the one query sees every cached key, no mask needed
        return sdpa(q_ext, k_ext, v_ext, scale=scale)[..., :d]
    assert tq == tk, "multi-token queries must cover the whole key sequence"
    q_ext = torch.cat((q_ext.new_zeros(b, h, 1, d + extra), q_ext), dim=2)
    out = sdpa(q_ext, k_ext, v_ext, is_causal=True, scale=scale)
    return out[:, :, 1:, :d]


def sink_attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """The same causal attention with a sink (Tq == Tk), written out: scores, the sink as a first score column,
    softmax, drop the column. Compiled CPU runs take it: there SDPA runs its O(T^2) math path anyway, and
    inductor fuses this into a few kernels, where the extra key would widen every head by one (steps 10% slower)."""
    t, d = q.size(-2), q.size(-1)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 scores softmaxed in fp32
    scores = (q @ k.transpose(-2, -1)).to(softmax_dtype) * d**-0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    sink_column = sink.to(softmax_dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.cat((sink_column, scores), dim=-1).softmax(dim=-1)[..., 1:]
    return weights.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.embedding_dim, 3 * cfg.embedding_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.embedding_dim, cfg.embedding_dim, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.sink = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.attn_sink else None
        self.rotary = cfg.pos_emb == "rope"

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        value_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if value_emb is not None:  # --value_embeddings: this layer's embedding of each token joins its value
            v = v + value_emb.view(b, t, self.num_heads, self.head_dim).transpose(1, 2).type_as(v)
        q, k = q.float(), k.float()  # norms and rotations in fp32 (under autocast qkv comes out in bf16)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.type_as(v), k.type_as(v)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attention_with_sink(q, k, v, self.sink)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.embedding_dim, 4 * cfg.embedding_dim, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.embedding_dim, cfg.embedding_dim, bias=cfg.bias)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.embedding_dim)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, cfg.embedding_dim)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        value_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, layer, value_emb))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


# ----------------------------------------------------------------------------------------------------------------
# Looking one token back (--smear, --bigram_embedding): each token's embedding also learns from the token before it.
# Both start as zeros, a no-op, and are made without random draws, so the rest of the model's init (for a seed) is
# the same as without them: an ablation compares the same start. GPT.look_back wires them in.


class Smear(nn.Module):
    """modded-nanogpt's smear: x_t + scale * sigmoid(gate . x_t[:width]) * x_{t-1}, with x_{t-1} the previous token's
    embedding (zero before a sequence's first token). One gate value per position, from the first `width` channels."""

    def __init__(self, dim: int, width: int = 12):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(min(width, dim)))
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x[..., : self.gate.numel()] @ self.gate).unsqueeze(-1)
        return x + self.scale * gate * previous


def bigram_embedding(cfg: Config, vocab_size: int) -> nn.Embedding:
    """A table with a row for every (previous id, id) pair and one for every id with no previous one: row
    (previous + 1) * vocab_size + id, previous = -1 at a sequence's first position. UserError for a large vocabulary."""
    check_bigram_rows(vocab_size, cfg.tokenizer)
    return nn.Embedding.from_pretrained(torch.zeros(bigram_rows(vocab_size), cfg.embedding_dim), freeze=False)


def value_embeddings(cfg: Config, vocab_size: int) -> nn.ModuleList:
    """modded-nanogpt's value embeddings: each layer's own table of the tokens, added to its attention values, so a
    head can carry a token's identity forward without it being read out of the residual stream. Zeros, no draws."""
    return nn.ModuleList(
        nn.Embedding.from_pretrained(torch.zeros(vocab_size, cfg.embedding_dim), freeze=False)
        for _ in range(cfg.num_blocks)
    )


# ----------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size)
        self.token_emb = nn.Embedding(self.padded_vocab, cfg.embedding_dim)
        self.pos_emb = nn.Embedding(cfg.context_len, cfg.embedding_dim) if cfg.pos_emb == "learned" else None
        self.smear = Smear(cfg.embedding_dim) if cfg.smear else None
        self.bigram_emb = bigram_embedding(cfg, vocab_size) if cfg.bigram_embedding else None
        self.value_embs = value_embeddings(cfg, self.padded_vocab) if cfg.value_embeddings else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_norm = make_norm(cfg, cfg.embedding_dim)
        # tied: the head is the token table itself (one tensor, so no second copy in the state dict)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.embedding_dim, self.padded_vocab, bias=False)
        # --mtp_weight: made without random draws (like the added tables), so the rest starts as without it
        mtp = cfg.mtp_weight > 0
        self.mtp_head = skip_init(nn.Linear, cfg.embedding_dim, self.padded_vocab, bias=False) if mtp else None
        cos, sin = rotary_tables(cfg.head_dim, cfg.context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("vocab_mask", torch.arange(self.padded_vocab) >= vocab_size, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-variance activations at any depth: fan-in init for input matrices, zero for every matrix that writes
        into the residual stream (each block starts as the identity) and for the head (first loss = log(vocab)).
        Biases start at zero; a tied token table is the head too, so it gets the head's fan-in scale, not zero.
        The look-back (smear, bigram table) and the value tables start at zero: no-ops."""
        zero = ("lm_head.", "mtp_head.", "smear.", "bigram_emb.", "value_embs.")  # heads, and the added tables
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", ".sink", ".bias")) or name.startswith(zero):
                nn.init.zeros_(p)
            elif name == "token_emb.weight" and self.lm_head is None:
                nn.init.normal_(p, std=p.size(1) ** -0.5)
            elif name.endswith("emb.weight"):
                nn.init.normal_(p, std=1.0)
            elif p.dim() == 2:
                nn.init.normal_(p, std=p.size(1) ** -0.5)
            else:
                nn.init.ones_(p)  # norm gains

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, padded_vocab); padded ids get -inf so they are never predicted.
        With targets (B, T): the next-token cross-entropy instead, in fp32, "mean" or "sum" over the targets;
        targets of -1 are ignored (the final evaluation masks the overlap of its last window with them). In training
        mode with --mtp_weight the loss adds that weight times the second head's loss on the token after next."""
        b, t = idx.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.context_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than context_len {self.cfg.context_len}")
        x = self.token_emb(idx)
        if self.smear is not None or self.bigram_emb is not None:
            x = self.look_back(x, idx, cache)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + t, device=idx.device))
        x = self.dropout(x)
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, self.value_embs[layer](idx) if self.value_embs is not None else None)
        if cache is not None:
            cache.length += t
            cache.last_ids = idx[:, -1:]
        x = self.final_norm(x)
        logits = self.head_logits(x, self.lm_head)
        if targets is None:
            return logits

        def cross_entropy(scores: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(scores.float().flatten(0, 1), wanted.flatten(), ignore_index=-1, reduction=reduction)

        loss = cross_entropy(logits, targets)
        if self.mtp_head is None or not self.training:
            return loss
        # --mtp_weight: a second head predicts the token after next (none known at the last position: -1)
        after_next = torch.cat((targets[:, 1:], targets.new_full((b, 1), -1)), dim=1)
        return loss + self.cfg.mtp_weight * cross_entropy(self.head_logits(x, self.mtp_head), after_next)

    def head_logits(self, x: torch.Tensor, head: nn.Linear | None) -> torch.Tensor:
        """A head's logits of the final hidden states x (None: the tied token table), softcapped, padded ids -inf."""
        logits = head(x) if head is not None else F.linear(x, self.token_emb.weight)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits.masked_fill(self.vocab_mask, float("-inf"))

    def look_back(self, x: torch.Tensor, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The token embeddings x of idx with --smear and --bigram_embedding applied. Each needs the id before every
        position: -1 (none) before a sequence's first, or with a cache the last id it was fed, so feeding a sequence
        piece by piece gives what feeding it whole does."""
        before = cache.last_ids if cache is not None and cache.length else idx.new_full((idx.size(0), 1), -1)
        previous = torch.cat((before, idx[:, :-1]), dim=1)
        if self.smear is not None:
            x = self.smear(x, self.token_emb(previous.clamp(min=0)) * (previous >= 0).unsqueeze(-1))
        if self.bigram_emb is not None:
            x = x + self.bigram_emb((previous + 1) * self.vocab_size + idx)
        return x

    def num_params(self) -> dict[str, int]:
        """Parameter counts: total, embeddings (token, learned positions, bigrams, value tables), and the rest (head
        included)."""
        total = sum(p.numel() for p in self.parameters())
        tables = (self.token_emb, self.pos_emb, self.bigram_emb, *(self.value_embs or ()))
        embedding = sum(table.weight.numel() for table in tables if table is not None)
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# ----------------------------------------------------------------------------------------------------------------
# Generation


class KVCache:
    """Keys and values of every block for the tokens seen so far, so each new token costs one position."""

    def __init__(self, cfg: Config, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_blocks, batch_size, cfg.num_heads, cfg.context_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # advanced by GPT.forward once every block has written
        self.last_ids: torch.Tensor | None = None  # (batch, 1): the id fed last, the one before the next (look_back)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next id from logits (B, V): greedy at temperature 0, else softmax after top-k / top-p filtering.
    Any finite temperature > 0 is well defined: the logits are shifted to a maximum of 0 before the division, so a
    tiny one tends to greedy and a huge one to uniform over the real ids, never to NaN."""
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    temperature = min(max(temperature, 1e-30), 1e30)  # (past these float32 rounds to 0 or inf; the result is the same)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # and always the likeliest id (a top_p that rounds to 0 in float32 would drop them all)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time.

    When the text outgrows context_len, the window restarts from its last context_len // 2 tokens and (with the
    cache) is re-encoded: both paths see exactly the same window, so greedy output is the same with or without it.
    """
    model.eval()
    device = next(model.parameters()).device
    context_len = model.cfg.context_len
    tokens = list(prompt) or [0]  # an empty prompt starts from id 0 (newline for char, '!' for gpt2)
    start = max(0, len(tokens) - context_len)
    cache, fed = None, start  # fed: tokens[start:fed] are already in the cache
    for _ in range(max_new_tokens):
        if len(tokens) - start > context_len:
            start = len(tokens) - max(1, context_len // 2)  # at least one token, even at context_len 1
            cache, fed = None, start
        if use_cache:
            if cache is None:
                cache = KVCache(model.cfg, 1, device, next(model.parameters()).dtype)
            logits = model(torch.tensor([tokens[fed:]], device=device), cache=cache)[:, -1]
            fed = len(tokens)
        else:
            logits = model(torch.tensor([tokens[start:]], device=device))[:, -1]
        if torch.isnan(logits).any():
            raise UserError(
                f"the model's logits became NaN after {len(tokens)} tokens (its weights overflow); "
                "sample from an earlier checkpoint"
            )
        next_id = int(sample_next(logits, temperature, top_k, top_p, generator))
        tokens.append(next_id)
        yield next_id
