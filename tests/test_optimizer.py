"""optimizer.py: Newton-Schulz, Muon, the Muon/AdamW split, gradient accumulation, the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize, tiny_config, train_losses

from model import GPT
from optimizer import POLAR_EXPRESS, Muon, build_optimizers, lr_multiplier, newton_schulz, ns_coefficients, set_lr


def conditioned(m: int, n: int, generator: torch.Generator, smallest: float = 0.02) -> torch.Tensor:
    """A random (m, n) matrix whose singular values are spread log-uniformly over [smallest, 1]."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    return (u * torch.logspace(0, math.log10(smallest), k)) @ v.T


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


# Measured (5 seeds): well-conditioned inputs give singular values in [0.67, 1.15], mean 0.80-0.90; square Gaussian
# matrices keep a few tiny input singular values small (the quintic cannot lift them in 5 steps).


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128), (96, 24)])
@pytest.mark.parametrize("seed", [0, 1])
def test_newton_schulz_singular_values_near_one(shape, seed):
    x = conditioned(*shape, torch.Generator().manual_seed(seed))
    y = newton_schulz(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    s = singular_values(y)
    assert s.min() > 0.5 and s.max() < 1.3, s
    assert 0.75 < s.mean() < 1.0


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)])
def test_newton_schulz_on_gaussian_matrices(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = singular_values(newton_schulz(x))
    assert s.max() < 1.3
    assert (s > 0.5).float().mean() >= 0.95
    assert 0.75 < s.mean() < 1.0


def test_newton_schulz_approximates_the_polar_factor():
    """The output is U f(S) V^T with the input's singular vectors: close in direction to U V^T, not any orthogonal."""
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    polar = u @ vh
    y = newton_schulz(x).double()
    cosine = (y * polar).sum() / (y.norm() * polar.norm())
    assert cosine > 0.98
    gram = x.double().T @ y  # = V S f(S) V^T: symmetric, positive definite
    torch.testing.assert_close(gram, gram.T, atol=0.05 * gram.abs().max().item(), rtol=0)
    assert torch.linalg.eigvalsh((gram + gram.T) / 2).min() > 0


def test_newton_schulz_is_scale_invariant():
    x = conditioned(32, 48, torch.Generator().manual_seed(3))
    torch.testing.assert_close(newton_schulz(1000 * x), newton_schulz(x), atol=2e-2, rtol=0)


@pytest.mark.parametrize("shape", [(6, 48, 48), (3, 96, 24), (4, 24, 96)])
def test_batched_newton_schulz_equals_per_matrix(shape):
    g = torch.Generator().manual_seed(4)
    # matrices of very different scales: each must be normalised on its own
    stack = torch.stack([conditioned(*shape[1:], g) * 10.0**i for i in range(shape[0])])
    batched = newton_schulz(stack)
    assert batched.shape == stack.shape
    for i in range(shape[0]):
        torch.testing.assert_close(batched[i], newton_schulz(stack[i]), atol=1e-2, rtol=0)
        s = singular_values(batched[i])
        assert s.min() > 0.5 and s.max() < 1.3


# --muon_ns_coeffs (issue 14): the quintic stays the default, bit for bit; Polar Express ends closer to one.


def newton_schulz_before_polar_express(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """optimizer.newton_schulz as it was before --muon_ns_coeffs, verbatim: the default must still compute this."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = (
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            if x.dim() == 3
            else torch.addmm(gram, gram, gram, beta=b, alpha=c)
        )
        x = torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else torch.addmm(x, poly, x, beta=a)
    return (x.mT if tall else x).to(update.dtype)


@pytest.mark.parametrize("shape", [(64, 64), (96, 24), (24, 96), (3, 48, 16), (3, 16, 48)])
@pytest.mark.parametrize("steps", [1, 5, 7])
def test_default_newton_schulz_is_bit_identical_to_before(shape, steps):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(steps))
    expected = newton_schulz_before_polar_express(x, steps)
    assert torch.equal(newton_schulz(x, steps), expected)
    assert torch.equal(newton_schulz(x, steps, "quintic"), expected)


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128), (96, 24)])
@pytest.mark.parametrize("seed", [0, 1])
def test_both_iterations_drive_singular_values_toward_one(coefficients, shape, seed):
    """Singular values spread over [0.02, 1] end in a band around one; Polar Express's band is narrower, and the
    polar factor's directions are kept either way."""
    x = conditioned(*shape, torch.Generator().manual_seed(seed))
    y = newton_schulz(x, 5, coefficients)
    assert y.shape == x.shape and y.dtype == x.dtype
    s = singular_values(y)
    low, high = (0.6, 1.2) if coefficients == "quintic" else (0.8, 1.2)  # measured: [0.68, 1.14] and [0.86, 1.15]
    assert low < s.min() and s.max() < high, s
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    polar = u @ vh
    assert (y.double() * polar).sum() / (y.double().norm() * polar.norm()) > 0.98


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)])
def test_polar_express_ends_closer_to_one_than_the_quintic(shape):
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(*shape, generator=g), conditioned(*shape, g)):
        quintic = singular_values(newton_schulz(x, 5, "quintic"))
        polar = singular_values(newton_schulz(x, 5, "polar_express"))
        assert (polar - 1).abs().mean() < 0.7 * (quintic - 1).abs().mean()  # measured: 0.53 of it at worst
        assert abs(polar.mean() - 1) < 0.05


@pytest.mark.parametrize("steps", [6, 8, 12])
def test_polar_express_past_its_five_steps_repeats_the_last_and_stays_near_one(steps):
    assert ns_coefficients("polar_express", steps) == [*POLAR_EXPRESS, *[POLAR_EXPRESS[-1]] * (steps - 5)]
    assert ns_coefficients("polar_express", 3) == list(POLAR_EXPRESS[:3])
    x = conditioned(64, 32, torch.Generator().manual_seed(steps))
    s, at_five = (singular_values(newton_schulz(x, n, "polar_express")) for n in (steps, 5))
    assert s.min() > 0.9 and s.max() < 1.15, s  # measured: [0.96, 1.13] at 6 steps, [1.02, 1.05] at 12
    assert s.max() - s.min() < at_five.max() - at_five.min()


@pytest.mark.parametrize("shape", [(6, 48, 48), (3, 96, 24)])
def test_batched_polar_express_equals_per_matrix(shape):
    stack = torch.stack([conditioned(*shape[1:], torch.Generator().manual_seed(i)) * 10.0**i for i in range(shape[0])])
    batched = newton_schulz(stack, 5, "polar_express")
    for i in range(shape[0]):
        torch.testing.assert_close(batched[i], newton_schulz(stack[i], 5, "polar_express"), atol=1e-2, rtol=0)


@pytest.mark.parametrize("momentum", [0.9, 0.95])
def test_muon_takes_its_momentum_from_the_config(momentum):
    cfg = tiny_config(muon_momentum=momentum)
    model = GPT(cfg, 65)
    muon = build_optimizers(model, cfg)[0]
    assert muon.param_groups[0]["momentum"] == momentum
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    muon.step()
    first = muon.param_groups[0]["params"][0]
    # from a zero buffer, one step leaves (1 - momentum) x the gradient in it
    torch.testing.assert_close(muon.state[first]["momentum_buffer"], torch.full_like(first, 1 - momentum))


def test_muon_takes_its_coefficients_from_the_config():
    cfg = tiny_config(muon_ns_coeffs="polar_express")
    muon = build_optimizers(GPT(cfg, 65), cfg)[0]
    assert isinstance(muon, Muon) and muon.param_groups[0]["ns_coefficients"] == "polar_express"
    default = tiny_config()
    assert build_optimizers(GPT(default, 65), default)[0].param_groups[0]["ns_coefficients"] == "quintic"
    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.zeros(16, 24))
    p.grad = torch.randn(16, 24, generator=g)
    Muon([p], lr=1.0, ns_coefficients="polar_express").step()  # first step: -lr * NS((1 - 0.95^2) * gradient)
    expected = -newton_schulz((1 - 0.95**2) * p.grad, 5, "polar_express")
    torch.testing.assert_close(p.detach(), expected, atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_first_step(shape, weight_decay):
    """With a zero momentum buffer the Nesterov update is a multiple of the gradient, and NS ignores scale."""
    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(*shape, generator=g))
    grad = torch.randn(*shape, generator=g)
    before = p.detach().clone()
    p.grad = grad.clone()
    lr = 0.05
    Muon([p], lr=lr, weight_decay=weight_decay).step()
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    expected = before * (1 - lr * weight_decay) - lr * scale * newton_schulz(grad)
    torch.testing.assert_close(p.detach(), expected, atol=2e-3, rtol=0)


def test_muon_momentum_accumulates():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    optimizer = Muon([p], lr=0.1)
    grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(6))
    for _ in range(3):
        p.grad = grad.clone()
        optimizer.step()
    buffer = optimizer.state[p]["momentum_buffer"]
    torch.testing.assert_close(buffer, (1 - 0.95**3) * grad)


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


# ----------------------------------------------------------------------------------------------------------------
# Parameter partition


def _partition(optimizers):
    return [[p for group in o.param_groups for p in group["params"]] for o in optimizers]


def test_muon_gets_block_matrices_adamw_the_rest():
    cfg = tiny_config(pos_emb="learned", weight_decay=0.1)
    model = GPT(cfg, 65)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizers = build_optimizers(model, cfg)
    assert [type(o) for o in optimizers] == [Muon, torch.optim.AdamW]
    muon, adamw = _partition(optimizers)
    every = muon + adamw
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))  # each exactly once

    muon_names = {names[id(p)] for p in muon}
    adamw_names = {names[id(p)] for p in adamw}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert all(p.dim() == 2 for p in muon)
    for name in ("token_emb.weight", "pos_emb.weight", "lm_head.weight", "final_norm.weight"):
        assert name in adamw_names, name
    for block in range(cfg.num_blocks):
        for name in ("attn.sink", "attn_norm.weight", "mlp_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight"):
            assert f"blocks.{block}.{name}" in adamw_names
        for name in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"):
            assert f"blocks.{block}.{name}" in muon_names

    decay, no_decay = optimizers[1].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() != 2 for p in no_decay["params"])
    assert optimizers[0].param_groups[0]["lr"] == cfg.muon_lr and decay["lr"] == cfg.lr


def test_use_muon_false_gives_adamw_everything():
    cfg = tiny_config(use_muon=False)
    model = GPT(cfg, 65)
    optimizers = build_optimizers(model, cfg)
    assert [type(o) for o in optimizers] == [torch.optim.AdamW]
    (params,) = _partition(optimizers)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert len(params) == len(list(model.parameters()))


@pytest.mark.parametrize("use_muon", [True, False])
def test_embedding_lr_gives_the_input_tables_their_own_group(use_muon):
    extras = dict(pos_emb="learned", bigram_embedding=True, value_embeddings=True, weight_decay=0.1)
    cfg = tiny_config(use_muon=use_muon, embedding_lr=0.3, **extras)
    model = GPT(cfg, 65)
    names = {id(p): n for n, p in model.named_parameters()}
    adamw = build_optimizers(model, cfg)[-1]
    decay, no_decay, tables = adamw.param_groups
    table_names = {names[id(p)] for p in tables["params"]}
    values = {f"value_embs.{i}.weight" for i in range(cfg.num_blocks)}
    assert table_names == {"token_emb.weight", "pos_emb.weight", "bigram_emb.weight", *values}
    assert tables["lr"] == tables["initial_lr"] == 0.3 and tables["weight_decay"] == 0.0
    assert decay["lr"] == cfg.lr and decay["weight_decay"] == 0.1  # the head and the rest keep --lr and the decay
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}
    assert not table_names & {names[id(p)] for p in decay["params"] + no_decay["params"]}
    # unset (the default), the layout is the one older checkpoints hold: two groups, the tables decayed at --lr
    plain = tiny_config(use_muon=use_muon, **extras)
    assert len(build_optimizers(GPT(plain, 65), plain)[-1].param_groups) == 2
    # a tied token table is the head too: it keeps the head's learning rate
    tied = tiny_config(embedding_lr=0.3, tie_embeddings=True)
    tied_model = GPT(tied, 65)
    tied_names = {id(p): n for n, p in tied_model.named_parameters()}
    groups = build_optimizers(tied_model, tied)[-1].param_groups
    assert "token_emb.weight" in {tied_names[id(p)] for p in groups[0]["params"]}
    assert len(groups) == 2  # no other table: no third group


def test_embedding_lr_follows_the_schedule():
    cfg = tiny_config(embedding_lr=0.3)
    optimizers = build_optimizers(GPT(cfg, 65), cfg)
    set_lr(optimizers, 0.5)
    assert optimizers[-1].param_groups[2]["lr"] == pytest.approx(0.15)
    assert optimizers[-1].param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5)


def test_set_lr_scales_from_the_initial_lr():
    cfg = tiny_config()
    optimizers = build_optimizers(GPT(cfg, 65), cfg)
    set_lr(optimizers, 0.5)
    set_lr(optimizers, 0.25)  # not compounding
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(cfg.muon_lr * 0.25)
    assert all(group["lr"] == pytest.approx(cfg.lr * 0.25) for group in optimizers[1].param_groups)


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_optimizers_reduce_the_loss(coefficients):
    cfg = tiny_config(lr=3e-3, muon_ns_coeffs=coefficients)
    model = GPT(cfg, 65)
    optimizers = build_optimizers(model, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(65, (4, cfg.context_len), generator=g)
    y = (x * 7 + 3) % 65  # a learnable map
    losses = train_losses(model, optimizers, x, y, 30)
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------------------------------------
# Gradient accumulation


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_accumulated_micro_batches_equal_one_big_batch(pos_emb, dtype, tol):
    cfg = tiny_config(pos_emb=pos_emb)
    model = randomize(GPT(cfg, 65), seed=2).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(65, (16, cfg.context_len), generator=g)
    y = torch.randint(65, (16, cfg.context_len), generator=g)
    model(x, y).backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
        (model(xb, yb) / 4).backward()
    for name, p in model.named_parameters():
        assert big[name].abs().max() > 0, name
        torch.testing.assert_close(p.grad, big[name], atol=tol, rtol=tol, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def _cfg(schedule="cosine", warmup=10, floor=0.1, cooldown=0.4):
    return tiny_config(lr_schedule=schedule, warmup_steps=warmup, min_lr_frac=floor, cooldown_frac=cooldown)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_from_one_over_warmup_to_one(schedule):
    cfg = _cfg(schedule, warmup=8)
    values = [lr_multiplier(step, 100, cfg) for step in range(8)]
    assert values == pytest.approx([(i + 1) / 8 for i in range(8)])
    assert lr_multiplier(8, 100, cfg) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_decay_ends_at_min_lr_frac(schedule, floor):
    cfg = _cfg(schedule, floor=floor)
    total = 200
    assert lr_multiplier(total - 1, total, cfg) == pytest.approx(floor)  # the last step the loop runs (0-based)
    assert lr_multiplier(total, total, cfg) == pytest.approx(floor)
    assert lr_multiplier(total + 50, total, cfg) == pytest.approx(floor)
    values = [lr_multiplier(step, total, cfg) for step in range(cfg.warmup_steps, total + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))  # never rises after warmup
    assert min(values) == pytest.approx(floor) and values[0] == pytest.approx(1.0)


def test_schedule_shapes_at_the_midpoint():
    total, warmup = 111, 10  # decay steps 10..110: the last step (110) sits at the floor
    middle = warmup + (total - 1 - warmup) // 2
    assert lr_multiplier(middle, total, _cfg("cosine", floor=0.2)) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_multiplier(middle, total, _cfg("linear", floor=0.2)) == pytest.approx(1 - 0.8 * 0.5)
    wsd = _cfg("wsd", floor=0.2, cooldown=0.4)
    assert lr_multiplier(middle, total, wsd) == pytest.approx(1.0)  # still flat at 50%
    assert lr_multiplier(warmup + 60, total, wsd) == pytest.approx(1.0)  # the cooldown starts at 60%
    assert lr_multiplier(warmup + 80, total, wsd) == pytest.approx(1 - 0.8 * 0.5)  # halfway through the cooldown


def test_constant_stays_one():
    cfg = _cfg("constant")
    assert all(lr_multiplier(step, 100, cfg) == 1.0 for step in range(10, 150))
    assert lr_multiplier(50, 100, cfg, time_frac=1.0) == 1.0


def test_no_warmup_starts_at_full_lr():
    assert lr_multiplier(0, 100, _cfg("cosine", warmup=0)) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_time_fraction_pushes_progress(schedule):
    cfg = _cfg(schedule, floor=0.1)
    step, total = 20, 1000  # barely into the decay by steps
    by_steps = lr_multiplier(step, total, cfg)
    assert lr_multiplier(step, total, cfg, time_frac=1.0) == pytest.approx(0.1)
    assert lr_multiplier(step, total, cfg, time_frac=2.0) == pytest.approx(0.1)
    assert lr_multiplier(step, total, cfg, time_frac=0.9) < by_steps
    assert lr_multiplier(step, total, cfg, time_frac=0.0) == by_steps
    # the larger of step and time progress wins: a small time fraction does not undo step progress
    late = lr_multiplier(900, total, cfg)
    assert lr_multiplier(900, total, cfg, time_frac=0.1) == late
    if schedule == "cosine":
        assert lr_multiplier(step, total, cfg, time_frac=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
