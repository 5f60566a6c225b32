"""model.py: attention with a sink against a naive reference, causality, vocab padding, KV cache, sampling, rotary."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fed_through_cache, randomize, tiny_config

from model import (
    GPT,
    KVCache,
    apply_rotary,
    attention_with_sink,
    generate,
    padded_vocab_size,
    rotary_tables,
    sample_next,
    sink_attention_scores,
)

VOCAB = 65  # Tiny Shakespeare's characters


def reference_attention(q, k, v, sink):
    """Textbook causal attention with a per-head sink logit as one extra softmax column whose value is zero.

    q (B, H, Tq, D) are the last Tq positions of k, v (B, H, Tk, D). Returns (output, weights over the keys).
    """
    b, h, tq, d = q.shape
    tk = k.size(-2)
    scores = q @ k.transpose(-1, -2) * d**-0.5
    query_pos = torch.arange(tk - tq, tk)[:, None]
    key_pos = torch.arange(tk)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    if sink is not None:
        sink_column = sink.to(scores.dtype).view(1, h, 1, 1).expand(b, h, tq, 1)
        scores = torch.cat((scores, sink_column), dim=-1)
    weights = scores.softmax(dim=-1)
    if sink is not None:
        weights = weights[..., :-1]
    return weights @ v, weights


def random_qkv(b, h, tq, tk, d, dtype, seed=0, sink_scale=1.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, tk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, tk, d, generator=g, dtype=torch.float64).to(dtype)
    sink = (sink_scale * torch.randn(h, generator=g, dtype=torch.float64)).to(dtype)
    return q, k, v, sink


# ----------------------------------------------------------------------------------------------------------------
# (a) attention with a sink


SINK_PATHS = [attention_with_sink, sink_attention_scores]  # the fused extra key, and the compiled CPU runs' path


@pytest.mark.parametrize("attend", SINK_PATHS)
@pytest.mark.parametrize("d", [8, 6, 16])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_attention_with_sink_matches_reference(attend, d, dtype, tol):
    q, k, v, sink = random_qkv(2, 3, 9, 9, d, dtype)
    assert (sink != 0).all()
    out = attend(q, k, v, sink)
    expected, _ = reference_attention(q.double(), k.double(), v.double(), sink.double())
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("sink_value", [-3.0, 0.0, 2.0, 6.0])
def test_sink_takes_probability_mass(sink_value):
    """With v = 1 each output is the total weight on real keys: 1 - exp(sink) / (exp(sink) + sum exp(scores))."""
    q, k, _, _ = random_qkv(2, 3, 7, 7, 8, torch.float64)
    v = torch.ones_like(k)
    sink = torch.full((3,), sink_value, dtype=torch.float64)
    out = attention_with_sink(q, k, v, sink)

    d = q.size(-1)
    scores = (q @ k.transpose(-1, -2) * d**-0.5).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    log_denominator = torch.logaddexp(scores.logsumexp(dim=-1), sink.view(1, 3, 1))
    sink_weight = torch.exp(sink.view(1, 3, 1) - log_denominator)  # (B, H, T)
    assert ((sink_weight > 0) & (sink_weight < 1)).all()
    torch.testing.assert_close(out, (1 - sink_weight)[..., None].expand_as(out), atol=1e-12, rtol=1e-12)
    assert (out < 1).all()
    # without the sink the weights sum to exactly one
    torch.testing.assert_close(attention_with_sink(q, k, v, None), torch.ones_like(out), atol=1e-12, rtol=0)


@pytest.mark.parametrize("attend", SINK_PATHS)
def test_attention_with_sink_gradients_match_reference(attend):
    q, k, v, sink = random_qkv(2, 3, 8, 8, 8, torch.float64, seed=1)
    cotangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = []
    for fn in (attend, lambda *a: reference_attention(*a)[0]):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sink)]
        (fn(*leaves) * cotangent).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, expected in zip(["q", "k", "v", "sink"], *grads, strict=True):
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_sink", [True, False])
def test_decode_path_one_query_sees_every_key(dtype, tol, with_sink):
    q, k, v, sink = random_qkv(2, 3, 1, 11, 8, dtype, seed=2)
    sink = sink if with_sink else None
    out = attention_with_sink(q, k, v, sink)
    expected, _ = reference_attention(q.double(), k.double(), v.double(), None if sink is None else sink.double())
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_decode_path_equals_last_row_of_full_attention():
    q, k, v, sink = random_qkv(1, 2, 10, 10, 8, torch.float64, seed=3)
    full = attention_with_sink(q, k, v, sink)
    last = attention_with_sink(q[:, :, -1:], k, v, sink)
    torch.testing.assert_close(last, full[:, :, -1:], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_no_sink_is_plain_causal_attention(dtype, tol):
    q, k, v, _ = random_qkv(2, 3, 9, 9, 8, dtype, seed=4)
    out = attention_with_sink(q, k, v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=tol, rtol=tol)
    expected, _ = reference_attention(q.double(), k.double(), v.double(), None)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_very_negative_sink_is_no_sink():
    q, k, v, _ = random_qkv(2, 3, 9, 9, 8, torch.float64, seed=5)
    sink = torch.full((3,), -60.0, dtype=torch.float64)
    torch.testing.assert_close(attention_with_sink(q, k, v, sink), attention_with_sink(q, k, v, None))


@pytest.mark.compile
def test_compiled_cpu_attention_takes_the_scores_path(monkeypatch):
    """Compiled on a CPU, training-shaped attention runs sink_attention_scores (and still matches the reference);
    eager keeps SDPA's fused path."""
    import model

    calls = []
    monkeypatch.setattr(model, "sink_attention_scores", lambda *a: calls.append(1) or sink_attention_scores(*a))
    q, k, v, sink = random_qkv(2, 3, 9, 9, 8, torch.float32, seed=8)
    expected, _ = reference_attention(q.double(), k.double(), v.double(), sink.double())
    torch.testing.assert_close(model.attention_with_sink(q, k, v, sink).double(), expected, atol=1e-5, rtol=1e-5)
    assert not calls
    torch._dynamo.reset()
    out = torch.compile(model.attention_with_sink)(q, k, v, sink)
    assert calls
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path pads the head dim to a multiple of 8")
@pytest.mark.parametrize("d", [8, 12, 16, 64])
def test_attention_with_sink_cuda_path(d):
    q, k, v, sink = random_qkv(2, 3, 33, 33, d, torch.float32, seed=6)
    expected, _ = reference_attention(q.double(), k.double(), v.double(), sink.double())
    out = attention_with_sink(*(t.cuda() for t in (q, k, v, sink)))
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-3, rtol=1e-3)
    last = attention_with_sink(*(t.cuda() for t in (q[:, :, -1:], k, v, sink)))
    torch.testing.assert_close(last.double().cpu(), expected[:, :, -1:], atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# (b) causality


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("attn_sink", [True, False])
def test_future_tokens_do_not_change_past_logits(pos_emb, attn_sink):
    cfg = tiny_config(pos_emb=pos_emb, attn_sink=attn_sink)
    model = randomize(GPT(cfg, VOCAB)).eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(VOCAB, (2, cfg.context_len), generator=g)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, cfg.context_len - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(VOCAB - 1, (2,), generator=g)) % VOCAB
            logits = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=1e-6)
            assert (logits[:, t, :VOCAB] - base[:, t, :VOCAB]).abs().max() > 1e-3  # the test can see a change


# ----------------------------------------------------------------------------------------------------------------
# (c) padded vocab and parameter counts, (d) the first loss


@pytest.mark.parametrize("vocab, padded", [(65, 128), (64, 64), (1, 64), (50257, 50304), (200019, 200064)])
def test_padded_vocab_size(vocab, padded):
    assert padded_vocab_size(vocab) == padded


def test_padded_logits_are_minus_inf():
    cfg = tiny_config()
    model = randomize(GPT(cfg, VOCAB))
    assert model.padded_vocab == 128
    assert model.token_emb.weight.shape[0] == 128 and model.lm_head.weight.shape[0] == 128
    logits = model(torch.randint(VOCAB, (2, cfg.context_len)))
    assert logits.shape == (2, cfg.context_len, 128)
    assert torch.isneginf(logits[..., VOCAB:]).all()
    assert torch.isfinite(logits[..., :VOCAB]).all()


@pytest.mark.parametrize("logit_softcap", [0.0, 5.0])
def test_softcap_keeps_padding_masked_and_bounds_logits(logit_softcap):
    cfg = tiny_config(logit_softcap=logit_softcap)
    model = randomize(GPT(cfg, VOCAB), scale=4.0)
    logits = model(torch.randint(VOCAB, (2, cfg.context_len)))
    assert torch.isneginf(logits[..., VOCAB:]).all()
    if logit_softcap:
        assert logits[..., :VOCAB].abs().max() <= logit_softcap


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_num_params(pos_emb):
    cfg = tiny_config(pos_emb=pos_emb)
    model = GPT(cfg, VOCAB)
    counts = model.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    embedding = 128 * cfg.embedding_dim + (cfg.context_len * cfg.embedding_dim if pos_emb == "learned" else 0)
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    c, blocks = cfg.embedding_dim, cfg.num_blocks
    per_block = 3 * c * c + c * c + 8 * c * c + 2 * c + 2 * cfg.head_dim + cfg.num_heads  # matrices, norms, sink
    assert counts["non_embedding"] == blocks * per_block + c + 128 * c  # + final norm + head


def test_loss_is_the_cross_entropy_of_the_logits_ignoring_minus_one():
    cfg = tiny_config()
    model = randomize(GPT(cfg, 65), seed=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(65, (3, cfg.context_len), generator=g)
    y = torch.randint(65, (3, cfg.context_len), generator=g)
    y[0, :5] = -1  # ignored targets
    logits = model(x)[..., :65].flatten(0, 1)
    kept = y.flatten() != -1
    by_hand = -logits.log_softmax(-1)[kept, y.flatten()[kept]]
    torch.testing.assert_close(model(x, y), by_hand.mean())
    torch.testing.assert_close(model(x, y, reduction="sum"), by_hand.sum())


@pytest.mark.parametrize("vocab", [65, 64, 1000])
def test_initial_loss_is_log_vocab(vocab):
    cfg = tiny_config()
    model = GPT(cfg, vocab)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(vocab, (4, cfg.context_len), generator=g)
    y = torch.randint(vocab, (4, cfg.context_len), generator=g)
    loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(vocab), abs=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad[vocab:].abs().sum() == 0  # padded rows never receive gradient


def test_sequence_longer_than_context_raises():
    cfg = tiny_config()
    model = GPT(cfg, VOCAB)
    with pytest.raises(ValueError, match="context_len"):
        model(torch.zeros(1, cfg.context_len + 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# (e) KV cache


@pytest.mark.parametrize("attn_sink", [True, False])
@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("prefill", [0, 1, 6])
def test_kv_cache_matches_full_forward(attn_sink, pos_emb, prefill):
    cfg = tiny_config(attn_sink=attn_sink, pos_emb=pos_emb)
    model = randomize(GPT(cfg, VOCAB), seed=1).eval()
    idx = torch.randint(VOCAB, (2, cfg.context_len), generator=torch.Generator().manual_seed(1))
    full, incremental, cache = fed_through_cache(model, idx, prefill)
    assert cache.length == cfg.context_len
    assert torch.isneginf(incremental[..., VOCAB:]).all()
    torch.testing.assert_close(incremental[..., :VOCAB], full[..., :VOCAB], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context_len"), torch.no_grad():
        model(idx[:, :1], cache=cache)  # the cache is full


# ----------------------------------------------------------------------------------------------------------------
# (f) generate, (g) sample_next


def _generate(model, prompt, n, **kwargs):
    return list(generate(model, prompt, n, **kwargs))


@pytest.fixture(scope="module")
def sampler_model():
    return randomize(GPT(tiny_config(), VOCAB), seed=3).eval()


@pytest.mark.parametrize("prompt_len", [0, 1, 5, 16, 23])
def test_greedy_generation_same_with_and_without_cache(sampler_model, prompt_len):
    prompt = torch.randint(VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    n = 45  # past context_len 16 several times: the window restarts
    cached = _generate(sampler_model, prompt, n, temperature=0, use_cache=True)
    uncached = _generate(sampler_model, prompt, n, temperature=0, use_cache=False)
    assert len(cached) == n
    assert cached == uncached
    assert all(0 <= i < VOCAB for i in cached)
    assert len(set(cached)) > 1  # the random model does not collapse to one id (else the test proves little)


def test_greedy_generation_is_argmax_of_full_forward(sampler_model):
    prompt = [1, 2, 3]
    n = sampler_model.cfg.context_len - len(prompt)  # stays inside one window
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(sampler_model(torch.tensor([tokens]))[0, -1].argmax()))
    assert _generate(sampler_model, prompt, n, temperature=0) == tokens[len(prompt) :]


def test_top_k_1_is_greedy(sampler_model):
    greedy = _generate(sampler_model, [5, 6], 30, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert _generate(sampler_model, [5, 6], 30, temperature=1.0, top_k=1, generator=g) == greedy


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_is_reproducible_with_a_seeded_generator(sampler_model, use_cache):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return _generate(sampler_model, [7], 40, temperature=1.0, use_cache=use_cache, generator=g)

    first = run(123)
    assert first == run(123)
    assert first != run(124)
    assert all(0 <= i < VOCAB for i in first)


def test_sampling_never_yields_padded_ids(sampler_model):
    g = torch.Generator().manual_seed(0)
    ids = _generate(sampler_model, [], 200, temperature=2.0, generator=g)
    assert max(ids) < VOCAB and len(set(ids)) > 10


def _sample_many(logits_row, n=20_000, seed=0, **kwargs):
    logits = logits_row.expand(n, -1).clone()
    g = torch.Generator().manual_seed(seed)
    kwargs = {"temperature": 1.0, "top_k": None, "top_p": None, **kwargs}
    return sample_next(logits, generator=g, **kwargs).flatten()


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.45, {0}), (0.51, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])  # sorted; id i has the i-th largest probability
    perm = torch.tensor([3, 0, 4, 2, 1])  # shuffle the ids so the sort has work to do
    logits = torch.empty(5)
    logits[perm] = probs.log()
    samples = _sample_many(logits, top_p=top_p)
    seen = set(samples.tolist())
    assert seen == {int(perm[i]) for i in kept}
    if len(kept) > 1:  # kept ids are renormalised, not flattened
        counts = torch.bincount(samples, minlength=5).float()
        top, second = counts[perm[0]], counts[perm[1]]
        assert top / second == pytest.approx(0.5 / 0.3, rel=0.1)


def test_top_p_works_per_row():
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    out = sample_next(logits, 1.0, None, 0.5, g).view(500, 2)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 3).all()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 1.9, 0.0])
    seen = set(_sample_many(logits, top_k=3).tolist())
    assert seen == {1, 3, 4}


def test_temperature_zero_and_top_k_1_are_argmax():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next(logits, 0.0, None, None, None), expected)
    assert torch.equal(sample_next(logits, 1.0, 1, None, None), expected)


# ----------------------------------------------------------------------------------------------------------------
# (h) rotary


def test_rotary_preserves_norms():
    d, t = 16, 64
    cos, sin = rotary_tables(d, t)
    assert cos.shape == sin.shape == (t, d // 2)
    x = torch.randn(2, 3, t, d, generator=torch.Generator().manual_seed(0))
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    assert (rotated[:, :, 1:] - x[:, :, 1:]).abs().max() > 0.1


def test_rotary_scores_depend_only_on_relative_position():
    d, t = 16, 48
    cos, sin = rotary_tables(d, t)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(d, generator=g).expand(1, 1, t, d)
    k = torch.randn(d, generator=g).expand(1, 1, t, d)
    scores = (apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2))[0, 0]  # scores[m, n]
    for offset in range(-t + 1, t):
        diagonal = scores.diagonal(offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    assert abs(float(scores[0, 0]) - float(scores[3, 0])) > 1e-3  # relative position matters


def test_rotary_keeps_dtype():
    cos, sin = rotary_tables(8, 4)
    x = torch.randn(1, 1, 4, 8).bfloat16()
    assert apply_rotary(x, cos, sin).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# (i) GPT-2's flags (issue 15), each on its own: norm, bias, tied head, GELU's tanh approximation

BLOCKS = range(2)  # (tiny_config's)
GPT2_FLAGS = {  # flag: (value, the tensors it adds, those it removes)
    "norm": (
        "layernorm",
        {f"blocks.{i}.{n}.bias" for i in BLOCKS for n in ("attn_norm", "mlp_norm")} | {"final_norm.bias"},
        set(),
    ),
    "bias": (
        True,
        {f"blocks.{i}.{n}.bias" for i in BLOCKS for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")},
        set(),
    ),
    "tie_embeddings": (True, set(), {"lm_head.weight"}),
    "activation": ("gelu_tanh", set(), set()),
}


@pytest.mark.parametrize("flag", list(GPT2_FLAGS))
def test_each_gpt2_flag_alone_changes_only_its_weights(flag):
    value, added, removed = GPT2_FLAGS[flag]
    default = {n: p.shape for n, p in GPT(tiny_config(), VOCAB).state_dict().items()}
    model = GPT(tiny_config(**{flag: value}), VOCAB)
    shapes = {n: p.shape for n, p in model.state_dict().items()}
    assert set(shapes) == (set(default) | added) - removed
    assert {n: s for n, s in shapes.items() if n not in added} == {n: s for n, s in default.items() if n not in removed}
    randomize(model)
    idx = torch.randint(VOCAB, (2, model.cfg.context_len), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (2, model.cfg.context_len, 128) and torch.isfinite(logits[..., :VOCAB]).all()
    model(idx, idx).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_layernorm_and_biases_start_as_the_default_model_does():
    """Zero biases and unit gains: the first loss is still log(vocab)."""
    model = GPT(tiny_config(norm="layernorm", bias=True), VOCAB)
    assert isinstance(model.final_norm, torch.nn.LayerNorm) and isinstance(
        model.blocks[0].attn_norm, torch.nn.LayerNorm
    )
    assert all(p.eq(0).all() for n, p in model.named_parameters() if n.endswith(".bias"))
    idx = torch.randint(VOCAB, (2, model.cfg.context_len), generator=torch.Generator().manual_seed(0))
    assert model(idx, idx).item() == pytest.approx(math.log(VOCAB), abs=1e-5)


def test_tied_head_is_the_token_table():
    model = randomize(GPT(tiny_config(tie_embeddings=True), VOCAB))
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    idx = torch.randint(VOCAB, (2, model.cfg.context_len), generator=torch.Generator().manual_seed(0))
    hidden = []
    model.final_norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    logits = model(idx)
    torch.testing.assert_close(logits[..., :VOCAB], (hidden[0] @ model.token_emb.weight.T)[..., :VOCAB])
    assert model.num_params()["total"] == sum(p.numel() for p in model.parameters())  # the table counted once
    fresh = GPT(tiny_config(tie_embeddings=True), VOCAB)  # a tied table has the head's scale, not N(0, 1)
    assert fresh.token_emb.weight.std().item() == pytest.approx(fresh.cfg.embedding_dim**-0.5, rel=0.1)


def test_gelu_tanh_is_gpt2s_approximation():
    mlp = GPT(tiny_config(activation="gelu_tanh"), VOCAB).blocks[0].mlp
    x = torch.randn(3, mlp.fc.in_features)
    h = mlp.fc(x)
    gpt2_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's "gelu_new"
    torch.testing.assert_close(mlp(x), mlp.proj(gpt2_gelu))
    assert not torch.allclose(F.gelu(h, approximate="tanh"), F.gelu(h), atol=1e-6, rtol=0)  # and not erf's GELU


def test_kv_cache_matches_full_forward_in_the_gpt2_architecture():
    cfg = tiny_config(pos_emb="learned", norm="layernorm", bias=True, tie_embeddings=True, activation="gelu_tanh")
    cfg = tiny_config(cfg.to_dict(), qk_norm=False, attn_sink=False)
    model = randomize(GPT(cfg, VOCAB), seed=1).eval()
    idx = torch.randint(VOCAB, (2, cfg.context_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, 2, torch.device("cpu"), torch.float32)
        pieces = [model(idx[:, :4], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1)[..., :VOCAB], full[..., :VOCAB], atol=1e-5, rtol=1e-5)
