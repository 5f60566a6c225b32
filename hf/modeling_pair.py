"""A Pair Transformer in Hugging Face transformers: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

The same network as the repo's model.py, written again to stand on its own (export.py copies this file and
configuration_pair.py into the folder it writes); the weights keep model.py's names. Read top to bottom:

    logits = head(norm(blocks(token_emb(ids) [+ pos_emb(positions)])))[:, :, :vocab_size]   (soft-capped if asked)
    block:  x = x + attn(norm(x));  x = x + mlp(norm(x))                                       (pre-norm residual)
    attn:   causal softmax attention; optional QK-norm and rotary positions; with a sink, each head's learned logit
            sink[h] joins every softmax denominator (a column whose value is zero), so a head may attend to nothing

norm is RMSNorm or LayerNorm (config.norm), mlp is fc -> activation -> proj, and config.tie_embeddings makes the
token table the head. The embedding and head have padded_vocab_size rows (a multiple of 64); only the first
vocab_size logits are returned. Keys and values of earlier tokens live in a transformers Cache, so generate() costs
one position per new token.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pair import PairConfig

ACTIVATIONS = {
    "relu2": lambda h: F.relu(h).square(),
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def make_norm(config: PairConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if config.norm == "layernorm" else nn.RMSNorm(dim)


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of positions (B, T), each (B, 1, T, head_dim // 2) (the 1: every head)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by the angles of their positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: PairConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads = layer, config.num_heads
        self.head_dim = config.embedding_dim // config.num_heads
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim, bias=config.bias)
        self.proj = nn.Linear(config.embedding_dim, config.embedding_dim, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else None
        self.sink = nn.Parameter(torch.zeros(config.num_heads)) if config.attn_sink else None
        self.rotary = config.pos_emb == "rope"

    def forward(self, x, cos, sin, allowed: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """x (B, T, C); allowed (B, 1, T, T_cached + T): which keys each query may see."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = q.float(), k.float()  # norms and rotations in fp32
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k = q.type_as(v), k.type_as(v)
        if cache is not None:  # the keys and values of every token so far
            k, v = cache.update(k, v, self.layer)
        scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        if self.sink is not None:  # one more column holding sink[h]; dropped after the softmax (its value is zero)
            sink = self.sink.float().view(1, -1, 1, 1).expand(b, -1, t, 1)
            weights = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
        else:
            weights = scores.softmax(dim=-1)
        y = weights.type_as(v) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: PairConfig):
        super().__init__()
        self.fc = nn.Linear(config.embedding_dim, 4 * config.embedding_dim, bias=config.bias)
        self.proj = nn.Linear(4 * config.embedding_dim, config.embedding_dim, bias=config.bias)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: PairConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.embedding_dim)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config, config.embedding_dim)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, allowed, cache):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, allowed, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class PairForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PairConfig
    base_model_prefix = "pair"
    _no_split_modules = ["Block"]
    _keep_in_fp32_modules_strict = ["q_norm", "k_norm"]  # they norm fp32 queries and keys, as model.py does

    def __init__(self, config: PairConfig):
        super().__init__(config)
        d = config.embedding_dim
        self.token_emb = nn.Embedding(config.padded_vocab_size, d)
        self.pos_emb = nn.Embedding(config.context_len, d) if config.pos_emb == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_blocks))
        self.final_norm = make_norm(config, d)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.token_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.token_emb = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T), the tokens after those already in `cache`; attention_mask (B, T_cached + T), 0 for
        padding (left padding shifts the positions, as if it were not there); labels as input_ids (shifted here)."""
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        seen = torch.arange(past + t, device=input_ids.device)
        allowed = (seen[None, :] <= seen[past:, None])[None, None]  # causal: (1, 1, T, T_cached + T)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if position_ids is None:
            position_ids = seen[past:].expand(b, t)
        if int(position_ids.max()) >= config.context_len:
            raise ValueError(
                f"position {int(position_ids.max())} is past this model's context_len {config.context_len}"
            )

        x = self.token_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.dropout(x)
        cos, sin = rotary_angles(position_ids, config.embedding_dim // config.num_heads)
        for block in self.blocks:
            x = block(x, cos, sin, allowed, cache)
        x = self.final_norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.token_emb.weight)
        logits = logits[..., : config.vocab_size]  # the padded rows are no tokens
        if config.logit_softcap:
            logits = config.logit_softcap * torch.tanh(logits / config.logit_softcap)
        loss = None
        if labels is not None:  # each position predicts the next label
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
