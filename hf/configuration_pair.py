"""The configuration of a Pair Transformer in Hugging Face transformers: model.py's architecture flags, as export.py
writes them into config.json (read by modeling_pair.py)."""

from transformers import PretrainedConfig


class PairConfig(PretrainedConfig):
    """Each field is the train.py flag of the same name; vocab_size is the tokenizer's, padded_vocab_size the rows of
    the embedding and head (a multiple of 64). transformers makes this a dataclass (fields with defaults)."""

    model_type = "pair"
    attribute_map = {  # the names the rest of transformers reads
        "hidden_size": "embedding_dim",
        "num_hidden_layers": "num_blocks",
        "num_attention_heads": "num_heads",
        "max_position_embeddings": "context_len",
    }

    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    num_blocks: int = 6
    num_heads: int = 8
    embedding_dim: int = 512
    context_len: int = 1024
    pos_emb: str = "rope"  # rope | learned
    activation: str = "relu2"  # relu2 | gelu | gelu_tanh
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    bias: bool = False
    tie_embeddings: bool = False
    qk_norm: bool = True
    attn_sink: bool = True
    logit_softcap: float = 0.0
    dropout: float = 0.0
    use_cache: bool = True
    tie_word_embeddings: bool = False  # (tie_embeddings is done by the model itself: there is no lm_head to tie)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
