"""The techniques of model.py that add weights (issue 14), each flag on its own and all together: the look-back
(--smear, --bigram_embedding), --value_embeddings and multi-token prediction (--mtp_weight). Each must keep the model causal, give the same logits with and
without the KV cache, start as a no-op, train, and leave the default model exactly as it was. (--muon_ns_coeffs:
test_optimizer.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fed_through_cache, randomize, tiny_config, train_losses

from config import BIGRAM_ROWS_MAX, UserError, bigram_rows
from model import GPT, generate
from optimizer import Muon, build_optimizers

VOCAB = 65  # Tiny Shakespeare's characters
FLAGS = {  # a name for the test ids: the flags it sets
    "smear": dict(smear=True),
    "bigram": dict(bigram_embedding=True),
    "value": dict(value_embeddings=True),
    "mtp": dict(mtp_weight=0.5),
    "all": dict(smear=True, bigram_embedding=True, value_embeddings=True, mtp_weight=0.5),
}
ADDED = {  # flag: the tensors it adds to the state dict, with their shapes (tiny_config: 32 dim)
    "smear": {"smear.gate": (12,), "smear.scale": (1,)},
    "bigram_embedding": {"bigram_emb.weight": ((VOCAB + 1) * VOCAB, 32)},
    "value_embeddings": {f"value_embs.{layer}.weight": (128, 32) for layer in range(2)},  # padded vocab, 2 blocks
    "mtp_weight": {"mtp_head.weight": (128, 32)},
}
ADDED_PREFIXES = ("smear.", "bigram_emb.", "value_embs.", "mtp_head.")


def model_with(flags: str, seed: int = 1, **overrides) -> GPT:
    """A model with the flags of FLAGS[flags] and random weights everywhere (the look-back too: not a no-op)."""
    return randomize(GPT(tiny_config(FLAGS[flags], **overrides), VOCAB), seed=seed).eval()


def random_ids(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# What each computes


def test_smear_adds_a_gated_share_of_the_previous_tokens_embedding():
    model = model_with("smear")
    idx = random_ids((2, 16))
    table, gate, scale = model.token_emb.weight, model.smear.gate, model.smear.scale
    x = table[idx]
    expected = x.clone()
    for t in range(1, idx.size(1)):  # position 0 has no previous token
        expected[:, t] += scale * torch.sigmoid((x[:, t, :12] * gate).sum(-1, keepdim=True)) * table[idx[:, t - 1]]
    with torch.no_grad():
        torch.testing.assert_close(model.look_back(x, idx, None), expected)


def test_bigram_rows_are_previous_id_then_id_with_a_row_per_id_for_none():
    model = model_with("bigram")
    idx = random_ids((2, 16))
    rows = [idx[:, 0]] + [(idx[:, t - 1] + 1) * VOCAB + idx[:, t] for t in range(1, 16)]  # row id: no previous
    expected = model.token_emb.weight[idx] + model.bigram_emb.weight[torch.stack(rows, dim=1)]
    with torch.no_grad():
        torch.testing.assert_close(model.look_back(model.token_emb(idx), idx, None), expected)
    assert bigram_rows(VOCAB) == model.bigram_emb.num_embeddings == 66 * 65


def test_a_value_embedding_joins_the_value_like_the_qkv_bias_does():
    """Rows all equal to c add c to every token's value: exactly what c in the value part of qkv's bias does."""
    plain = randomize(GPT(tiny_config(bias=True), VOCAB), seed=4).eval()
    model = GPT(tiny_config(bias=True, value_embeddings=True), VOCAB).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    c = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))  # one vector per layer
    with torch.no_grad():
        for layer, block in enumerate(plain.blocks):
            model.value_embs[layer].weight.copy_(c[layer].expand(128, 32))
            block.attn.qkv.bias[64:] += c[layer]  # qkv's output is (q, k, v), each (heads x head_dim)
        idx = random_ids((2, 16))
        torch.testing.assert_close(model(idx), plain(idx), atol=1e-5, rtol=1e-5)


def test_the_mtp_head_adds_the_loss_on_the_token_after_next_in_training_only():
    model = model_with("mtp")
    idx, targets = random_ids((2, 16)), random_ids((2, 16), seed=1)
    targets[0, 5] = -1  # an ignored target is ignored by both heads
    hidden = {}
    model.final_norm.register_forward_hook(lambda module, args, out: hidden.update(out=out))

    def cross_entropy(scores, wanted):  # mean over the positions with a target
        keep = wanted != -1
        return torch.nn.functional.cross_entropy(scores[keep], wanted[keep])

    with torch.no_grad():
        logits = model(idx)
        mtp_logits = (hidden["out"] @ model.mtp_head.weight.T).masked_fill(model.vocab_mask, float("-inf"))
        next_token = cross_entropy(logits.flatten(0, 1), targets.flatten())
        after_next = cross_entropy(mtp_logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())  # none after the last
        assert model(idx, targets).item() == pytest.approx(next_token.item(), rel=1e-6)  # eval: the next token only
        model.train()
        assert model(idx, targets).item() == pytest.approx((next_token + 0.5 * after_next).item(), rel=1e-5)
        assert torch.equal(model(idx), logits)  # the logits are the next-token head's in either mode


# ----------------------------------------------------------------------------------------------------------------
# Causality, and the KV cache


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_future_tokens_do_not_change_past_logits(flags, pos_emb):
    model = model_with(flags, pos_emb=pos_emb)
    g = torch.Generator().manual_seed(0)
    idx = random_ids((2, 16))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 1, 5, 15):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(VOCAB - 1, (2,), generator=g)) % VOCAB
            logits = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=1e-6)
            assert (logits[:, t, :VOCAB] - base[:, t, :VOCAB]).abs().max() > 1e-3  # the test can see a change


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("prefill", [0, 1, 6])
def test_kv_cache_matches_full_forward(flags, prefill):
    """Fed one token at a time after a prefill, the model sees each token's predecessor through the cache."""
    model = model_with(flags)
    cfg = model.cfg
    idx = random_ids((2, cfg.context_len), seed=1)
    full, incremental, cache = fed_through_cache(model, idx, prefill)
    assert cache.length == cfg.context_len and torch.equal(cache.last_ids, idx[:, -1:])
    assert torch.isneginf(incremental[..., VOCAB:]).all()
    torch.testing.assert_close(incremental[..., :VOCAB], full[..., :VOCAB], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("prompt_len", [0, 1, 5, 23])
def test_greedy_generation_same_with_and_without_cache(flags, prompt_len):
    """45 new tokens run past context_len 16 several times: each restarted window has no previous token either way."""
    model = model_with(flags, seed=6)
    prompt = random_ids((prompt_len,), seed=prompt_len).tolist()
    cached = list(generate(model, prompt, 45, temperature=0, use_cache=True))
    uncached = list(generate(model, prompt, 45, temperature=0, use_cache=False))
    assert cached == uncached
    assert len(set(cached)) > 1  # the random model does not collapse to one id (else the test proves little)


# ----------------------------------------------------------------------------------------------------------------
# Weights, init, and the default model


@pytest.mark.parametrize("flags", list(FLAGS))
def test_each_flag_adds_only_its_tensors(flags):
    default = {n: tuple(p.shape) for n, p in GPT(tiny_config(), VOCAB).state_dict().items()}
    added = {n: s for flag in FLAGS[flags] for n, s in ADDED[flag].items()}
    shapes = {n: tuple(p.shape) for n, p in GPT(tiny_config(FLAGS[flags]), VOCAB).state_dict().items()}
    assert shapes == default | added
    assert not any(n.startswith(ADDED_PREFIXES) for n in default)


@pytest.mark.parametrize("flags", list(FLAGS))
def test_a_fresh_model_starts_as_the_default_one(flags):
    """The look-back starts at zero and draws no random numbers: every other tensor is the default model's, and so
    are the logits and the first loss (log vocab)."""
    torch.manual_seed(0)
    default = GPT(tiny_config(), VOCAB)
    torch.manual_seed(0)
    model = GPT(tiny_config(FLAGS[flags]), VOCAB)
    weights = model.state_dict()
    for name, tensor in default.state_dict().items():
        assert torch.equal(weights.pop(name), tensor), name
    assert weights and all(t.eq(0).all() for t in weights.values())  # what is left: the added tensors, all zeros
    idx, targets = random_ids((2, 16)), random_ids((2, 16), seed=1)
    with torch.no_grad():
        assert torch.equal(model(idx), default(idx))
        first_loss = (1 + model.cfg.mtp_weight) * math.log(VOCAB)  # training mode: each head's first loss is log V
        assert model(idx, targets).item() == pytest.approx(first_loss, abs=1e-5)


@pytest.mark.parametrize("flags", list(FLAGS))
def test_zeroed_added_weights_give_the_default_models_logits_exactly(flags):
    default = randomize(GPT(tiny_config(), VOCAB), seed=2).eval()
    model = GPT(tiny_config(FLAGS[flags]), VOCAB).eval()
    missing, unexpected = model.load_state_dict(default.state_dict(), strict=False)
    assert not unexpected and all(n.startswith(ADDED_PREFIXES) for n in missing)
    with torch.no_grad():
        for name in missing:
            model.get_parameter(name).zero_()
        idx = random_ids((2, 16))
        assert torch.equal(model(idx), default(idx))


def test_the_default_model_never_looks_back(monkeypatch):
    model = randomize(GPT(tiny_config(), VOCAB))
    assert model.smear is None and model.bigram_emb is None and model.value_embs is None and model.mtp_head is None
    monkeypatch.setattr(GPT, "look_back", lambda *args: pytest.fail("look_back ran with both flags off"))
    model(random_ids((2, 16)))


def test_the_added_tables_count_as_embeddings():
    counts = GPT(tiny_config(bigram_embedding=True, value_embeddings=True), VOCAB).num_params()
    plain = GPT(tiny_config(), VOCAB).num_params()
    assert counts["embedding"] == plain["embedding"] + 66 * 65 * 32 + 2 * 128 * 32
    assert counts["non_embedding"] == plain["non_embedding"]


@pytest.mark.parametrize("flags", list(FLAGS))
def test_a_checkpoint_keeps_the_flags_and_the_added_weights(flags, tmp_path):
    from checkpoint import load_checkpoint, save_checkpoint
    from tokenizer import CharTokenizer

    model = model_with(flags)
    chars = "".join(chr(ord("!") + i) for i in range(VOCAB))
    loaded, _, _ = load_checkpoint(save_checkpoint(tmp_path, 1, model, CharTokenizer(chars).to_dict()))
    assert all(getattr(loaded.cfg, name) == value for name, value in FLAGS[flags].items())
    assert all(torch.equal(loaded.state_dict()[n], p) for n, p in model.state_dict().items())


def test_a_large_vocabulary_is_refused_before_the_table_is_made():
    assert bigram_rows(1023) <= BIGRAM_ROWS_MAX < bigram_rows(1024)
    with pytest.raises(UserError, match="--bigram_embedding needs a small vocabulary: char's 1,024 ids"):
        GPT(tiny_config(bigram_embedding=True), 1024)


# ----------------------------------------------------------------------------------------------------------------
# Optimizers and training


@pytest.mark.parametrize("use_muon", [True, False])
def test_the_added_weights_go_to_adamw_like_the_embeddings(use_muon):
    cfg = tiny_config(FLAGS["all"], use_muon=use_muon, weight_decay=0.1)
    model = GPT(cfg, VOCAB)
    optimizers = build_optimizers(model, cfg)
    adamw = optimizers[-1]
    decay, no_decay = ({id(p) for p in group["params"]} for group in adamw.param_groups)
    tables = (model.bigram_emb, *model.value_embs, model.token_emb, model.mtp_head)
    assert {id(table.weight) for table in tables} <= decay  # tables and the heads: as the token embedding's
    assert {id(model.smear.gate), id(model.smear.scale)} <= no_decay  # vectors: as norms and sinks
    if use_muon:
        assert isinstance(optimizers[0], Muon)
        muon = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
        assert not muon & {id(p) for p in (*model.smear.parameters(), *(table.weight for table in tables))}


@pytest.mark.parametrize("flags", list(FLAGS))
def test_each_flag_trains(flags):
    """A target that depends on the previous token and this one: the loss falls, and the added weights learn."""
    cfg = tiny_config(FLAGS[flags], lr=3e-3)
    torch.manual_seed(0)
    model = GPT(cfg, VOCAB)
    optimizers = build_optimizers(model, cfg)
    x = random_ids((4, cfg.context_len))
    y = (x + torch.roll(x, 1, dims=1) * 7) % VOCAB
    losses = train_losses(model, optimizers, x, y, 30)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0]
    added = [p for n, p in model.named_parameters() if n.startswith(ADDED_PREFIXES)]
    assert added and all(p.abs().sum() > 0 for p in added)
