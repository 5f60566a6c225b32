"""Muon for the hidden matrices, AdamW for everything else, the learning-rate schedule, and weight averaging (EMA).

Muon (Keller Jordan, 2024): SGD with Nesterov momentum whose update is replaced by the nearest semi-orthogonal
matrix, found with a quintic Newton-Schulz iteration in bf16. We implement the variant of modded-nanogpt's
record runs: momentum 0.95 with Nesterov, 5 Newton-Schulz steps with coefficients (3.4445, -4.7750, 2.0315),
and updates scaled by sqrt(max(1, rows / cols)) so tall matrices move as much per element as square ones.
It is the simplest variant that earns its speed-up at small scale, and its learning rate is independent of
width. Same-shape matrices are orthogonalised together in one batched matmul chain (fewer, larger kernels).
Under torchrun the gradients arrive averaged by DDP, every rank keeps the same momenta, and the Newton-Schulz
work is shared: each rank orthogonalises its slice of every same-shape stack, then all ranks gather the results.
With --torch_compile (one process), each group's momentum + Newton-Schulz update runs as one compiled graph.
--muon_ns_coeffs polar_express swaps the one quintic for Polar Express's polynomial per step (see POLAR_EXPRESS).
EMA (--ema_decay) keeps an exponential moving average of the weights in a shadow copy of the model (see the class).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from config import Config

# Each Newton-Schulz step maps every singular value s to a s + b s^3 + c s^5. Keller Jordan's quintic repeats one
# polynomial, steep at 0, so 5 steps lift small values into roughly [0.7, 1.2]. Polar Express (Amsel, Persson, Musco,
# Gower 2025, arXiv:2505.16932) picks each step's polynomial to be minimax-optimal for the interval the previous steps
# leave, which ends closer to 1 in the same steps. Its coefficients below were computed for 5 steps with safety factor
# 2e-2 and cushion 2, as modded-nanogpt's train_gpt.py lists them; like it, the input is scaled to a spectral norm of at
# most 1 / 1.02 (the polynomials' margin for bf16 error). Fewer steps take the first ones; more repeat the last (which
# holds singular values near 1: its fixed point ~1.035 attracts).
QUINTIC = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_SAFETY = {"quintic": 1.0, "polar_express": 1.02}


def ns_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    """(a, b, c) of each of `steps` Newton-Schulz steps, for --muon_ns_coeffs quintic or polar_express."""
    if kind == "quintic":
        return [QUINTIC] * steps
    return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]


def newton_schulz(
    update: torch.Tensor, steps: int = 5, coefficients: str = "quintic", eps: float = 1e-7
) -> torch.Tensor:
    """Approximately U V^T of update = U S V^T, for one matrix (m, n) or a stack (b, m, n).

    The quintic iteration pushes every singular value into roughly [0.7, 1.2] in 5 steps; exact orthogonality
    is not needed, speed is. Runs in bf16 (the iteration is robust to it) on the wider orientation.
    coefficients: "quintic" or "polar_express" (see POLAR_EXPRESS above).
    """
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * NS_SAFETY[coefficients] + eps)  # spectral <= Frobenius norm <= 1
    for a, b, c in ns_coefficients(coefficients, steps):
        gram = x @ x.mT
        poly = (
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            if x.dim() == 3
            else torch.addmm(gram, gram, gram, beta=b, alpha=c)
        )
        x = (
            torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else torch.addmm(x, poly, x, beta=a)
        )  # a x + (b G + c G^2) x
    return (x.mT if tall else x).to(update.dtype)


def sharded_newton_schulz(
    updates: torch.Tensor, steps: int, coefficients: str, rank: int, world_size: int
) -> torch.Tensor:
    """newton_schulz of a stack (b, m, n) shared by all ranks: rank r orthogonalises matrices [r * k, (r + 1) * k)
    of the stack zero-padded to k * world_size (zeros stay zeros), then one all-gather hands every rank all of them."""
    share = math.ceil(len(updates) / world_size)
    padded = torch.cat((updates, updates.new_zeros(share * world_size - len(updates), *updates.shape[1:])))
    mine = newton_schulz(padded[rank * share : (rank + 1) * share], steps, coefficients).bfloat16()  # (NS is bf16)
    gathered = mine.new_empty(padded.shape)
    dist.all_gather_into_tensor(gathered, mine)
    return gathered[: len(updates)].to(updates.dtype)


def momentum_updates(grads: list[torch.Tensor], buffers: list[torch.Tensor], momentum: float, nesterov: bool):
    """Advance the momentum buffers in place; the (Nesterov) updates of a same-shape group, stacked (b, m, n)."""
    torch._foreach_lerp_(buffers, grads, 1 - momentum)  # buf = m * buf + (1 - m) * g
    return torch.stack(torch._foreach_lerp(grads, buffers, momentum) if nesterov else buffers)  # g + m * (buf - g)


def orthogonal_updates(grads, buffers, momentum: float, nesterov: bool, steps: int, coefficients: str) -> torch.Tensor:
    """momentum_updates then newton_schulz: one function, so torch.compile fuses the casts and elementwise work."""
    return newton_schulz(momentum_updates(grads, buffers, momentum, nesterov), steps, coefficients)


def by_shape(params: list[nn.Parameter]) -> dict[torch.Size, list[nn.Parameter]]:
    """Parameters grouped by shape, in order: each group is orthogonalised as one stack."""
    groups: dict[torch.Size, list[nn.Parameter]] = defaultdict(list)
    for p in params:
        groups[p.shape].append(p)
    return groups


class Muon(torch.optim.Optimizer):
    """Momentum-orthogonalised SGD for 2-D weight matrices (see the module docstring)."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: str = "quintic",
        weight_decay: float = 0.0,
        compile: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        hyper = dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients)
        super().__init__(params, dict(lr=lr, **hyper, weight_decay=weight_decay))
        # compiled: ~1.3 of ~14 ms saved per step at --preset nanogpt-cpu (fewer passes over the stacked updates)
        self.compiled_updates = torch.compile(orthogonal_updates, dynamic=False) if compile else None
        self.rank, self.world_size = rank, world_size  # this process's place in a torchrun job (0 of 1 without)
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon only takes 2-D matrices; give everything else to AdamW")

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for shape, params in by_shape([p for p in group["params"] if p.grad is not None]).items():
                grads = [p.grad for p in params]
                buffers = [self._momentum_buffer(p) for p in params]
                momentum, nesterov, steps = group["momentum"], group["nesterov"], group["ns_steps"]
                coefficients = group["ns_coefficients"]
                if (
                    self.world_size > 1
                ):  # every rank holds the same updates (DDP averaged the gradients): share the work
                    stack = momentum_updates(grads, buffers, momentum, nesterov)
                    orthogonal = sharded_newton_schulz(stack, steps, coefficients, self.rank, self.world_size)
                else:
                    orthogonal = self._orthogonal_updates(grads, buffers, momentum, nesterov, steps, coefficients)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                scale = math.sqrt(max(1.0, shape[0] / shape[1]))
                torch._foreach_add_(params, list(orthogonal.unbind(0)), alpha=-group["lr"] * scale)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the update for every matrix shape now, on zeros (the state is untouched), not in a timed step."""
        if self.compiled_updates is None or self.world_size > 1:
            return  # (under torchrun the update runs eagerly, sharded over ranks)
        for group in self.param_groups:
            for same in by_shape(group["params"]).values():
                zeros = [torch.zeros_like(p) for p in same]
                buffers = [torch.zeros_like(p) for p in same]
                hyper = group["momentum"], group["nesterov"], group["ns_steps"], group["ns_coefficients"]
                self._orthogonal_updates(zeros, buffers, *hyper)

    def _orthogonal_updates(self, grads, buffers, momentum: float, nesterov: bool, steps: int, coefficients: str):
        if self.compiled_updates is not None:
            try:
                return self.compiled_updates(grads, buffers, momentum, nesterov, steps, coefficients)
            except Exception as error:  # a compiler failure (raised before any buffer changed) must not stop training
                print(f"warning: torch.compile of Muon's update failed ({type(error).__name__}); running it eagerly")
                self.compiled_updates = None
        return orthogonal_updates(grads, buffers, momentum, nesterov, steps, coefficients)

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The matrices inside the blocks (attention and MLP) go to Muon; embeddings and the head stay on AdamW."""
    return p.dim() == 2 and name.startswith("blocks.")


def is_input_table(name: str, cfg: Config) -> bool:
    """The embedding tables that only feed the model (--embedding_lr); a tied token table is the head too, so not it.
    Adam moves every entry by about lr per step whatever its scale, and these tables start at std 1 where the
    matrices start near embedding_dim ** -0.5: at --lr they learn ~10x slower (modded-nanogpt gives them ~100x)."""
    return name.startswith(("pos_emb.", "bigram_emb.", "value_embs.")) or (
        name == "token_emb.weight" and not cfg.tie_embeddings
    )


def build_optimizers(
    model: nn.Module, cfg: Config, compile: bool = False, rank: int = 0, world_size: int = 1
) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] with --use_muon, else [AdamW]. Weight decay applies to matrices only, never norms or sinks;
    with --embedding_lr the input tables are a third AdamW group at that learning rate.
    compile: torch.compile Muon's update (train.py passes --torch_compile); rank, world_size: under torchrun, Muon
    shares its Newton-Schulz work between the ranks."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if cfg.use_muon and is_hidden_matrix(n, p)]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    tables = [p for n, p in rest if cfg.embedding_lr and is_input_table(n, cfg)]
    table_ids = {id(p) for p in tables}
    decay = [p for n, p in rest if p.dim() == 2 and id(p) not in table_ids]
    no_decay = [p for n, p in rest if p.dim() != 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if tables:  # at ~100x --lr, AdamW's decoupled decay (lr * weight_decay per step) would erase the tables
        groups.append(dict(params=tables, weight_decay=0.0, lr=cfg.embedding_lr))
    device_type = next(model.parameters()).device.type
    adamw = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-10,
        fused=device_type in ("cuda", "cpu"),
    )
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if hidden:
        optimizers.insert(
            0,
            Muon(
                hidden,
                lr=cfg.muon_lr,
                momentum=cfg.muon_momentum,
                ns_steps=cfg.muon_ns_steps,
                ns_coefficients=cfg.muon_ns_coeffs,
                weight_decay=cfg.weight_decay,
                compile=compile,
                rank=rank,
                world_size=world_size,
            ),
        )
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, total_steps: int, cfg: Config, time_frac: float = 0.0) -> float:
    """Linear warmup over warmup_steps, then the chosen decay down to min_lr_frac at the end of the run.

    The run's progress is the larger of its step fraction and, with --time_budget_s, its time fraction, so a
    time-limited run still finishes its decay.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps)  # the last step sits at the floor
    progress = min(1.0, max(progress, time_frac))
    floor = cfg.min_lr_frac
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.lr_schedule == "wsd":
        cooldown_progress = max(0.0, (progress - (1.0 - cfg.cooldown_frac)) / max(cfg.cooldown_frac, 1e-9))
        return 1.0 - (1.0 - floor) * min(1.0, cooldown_progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


class EMA:
    """An exponential moving average of a model's weights: `model`, a shadow copy of the model given (fp32, on its
    device, no gradients) whose parameters follow the trained ones after every optimizer step (update()). It is a
    whole model, so evaluation, sampling and the inference cases use it as they use the trained one, and the raw
    weights never move for it (no swapping in and out).

    Warm-up: update k (k = 0, 1, ..., counted in `updates`) uses the decay min(decay, (1 + k) / (10 + k)), as
    tf.train.ExponentialMovingAverage does with num_updates. Without it the random init would keep decay ** k of the
    average (0.999 ** 1000 = 37%); with it the init's share is 9! k! / (k + 9)! (1e-5 after 10 updates), and the
    average spans about the last ninth of the steps so far until `decay` takes over after ~9 / (1 - decay) updates
    (9,000 for 0.999). So the average is usable at every evaluation and in short runs. Under torchrun every rank
    holds the same weights, hence the same average, with no communication.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).float().requires_grad_(False)
        self.averaged = list(self.model.parameters())
        self.sources = list(model.parameters())  # (the same order: the copy has the same modules)

    def current_decay(self) -> float:
        """The decay of the next update (the warm-up above)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """average = decay * average + (1 - decay) * weights, for every parameter at once."""
        torch._foreach_lerp_(self.averaged, [p.detach().float() for p in self.sources], 1 - self.current_decay())
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """{"weights": the average as a model state dict, "updates": how many updates made it}."""
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = state["updates"]
