"""One optimizer step and what the training loop does around it: LoopState, what the loop carries from step to
step (and the one definition of a checkpoint's state.json), and Trainer, the wired parts of a training job with
its step, log, evaluation, save and finish. train.py builds a Trainer and runs the loop; bench/bench_train.py times
the same step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch._inductor.config
from torch.nn.parallel import DistributedDataParallel

from checkpoint import rng_state, save_checkpoint
from config import Config, UserError, is_kind
from data import TrainBatches, bits_per_byte, fixed_val_batches, full_val_batches, to_device
from distributed import Distributed
from inference import format_table, run_cases
from memorization import describe, training_index
from model import GPT, generate
from optimizer import EMA, lr_multiplier, set_lr
from records import RunRecorder
from tokenizer import Tokenizer
from utils import StopSignals, flops_per_token, format_duration, format_line, human

MAX_SKIPS_IN_A_ROW = 10  # with --skip_nonfinite: this many bad steps in a row means the run diverged
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopState:
    """What the loop carries from one step to the next. state_dict() is a checkpoint's state.json (checkpoint.py
    adds the model's vocab_size) and load_state_dict() its one reader."""

    run: str = ""  # the run's name: runs/<run>/ and <save_model_dir>/<run>/
    data: dict[str, Any] = field(default_factory=dict)  # the training tokens' fingerprint: a resume must match it
    world_size: int = 1
    wandb_id: str | None = None
    step: int = 0  # optimizer steps done
    train_seconds: float = 0.0  # time spent in steps (evaluation and saving excluded): --time_budget_s's clock
    eval_seconds: float = 0.0
    best_val_loss: float = math.inf
    batches: TrainBatches | None = None  # the data position is its state_dict()
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # the log interval in progress: its
    loss_count: int = 0  # summed step losses (on the device: no sync per step) and their count
    # not saved: this process's bookkeeping
    first_bad_step: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # 0 = none yet
    skipped_in_a_row: int = 0
    interval_start: float = field(default_factory=time.perf_counter)
    interval_steps: int = 0
    last_checkpoint: Path | None = None  # the newest checkpoint this run wrote
    resumed_from: Path | None = None
    SAVED: ClassVar = ("run", "data", "world_size", "wandb_id", "step", "train_seconds", "eval_seconds", "loss_count")

    def to(self, device: torch.device) -> LoopState:
        self.loss_sum, self.first_bad_step = self.loss_sum.to(device), self.first_bad_step.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        best, position = self.best_val_loss if math.isfinite(self.best_val_loss) else None, self.batches.state_dict()
        return {
            **{k: getattr(self, k) for k in self.SAVED},
            "best_val_loss": best,
            "batches": position,
            "loss_sum": self.loss_sum.item(),
        }

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> None:
        """Continue where a checkpoint left off (this run's data and world size are its own)."""
        check_loop_state(state, folder)
        for key in ("run", "step", "train_seconds", "eval_seconds", "loss_count"):
            setattr(self, key, state[key])
        self.wandb_id, self.resumed_from = state.get("wandb_id"), folder
        self.best_val_loss = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        self.batches.load_state_dict(state["batches"])
        self.loss_sum.fill_(state["loss_sum"])


def check_loop_state(state: dict[str, Any], folder: Path) -> None:
    """The loop's keys of a state.json are there and hold what LoopState writes: the right types, in range."""
    needed = ("run", "step", "train_seconds", "eval_seconds", "best_val_loss", "batches", "loss_sum", "loss_count")
    if missing := [key for key in needed if key not in state]:
        raise UserError(
            f"checkpoint {folder} lacks the training state to resume ({', '.join(missing)} in state.json); "
            "it can still be sampled from"
        )

    def number(value: Any, low: float = -math.inf) -> bool:
        return is_kind(value, float) and low <= value < math.inf

    def count(value: Any, low: int = 0) -> bool:
        return is_kind(value, int) and value >= low

    batches = state["batches"]
    checks = {
        "run": isinstance(state["run"], str) and state["run"].strip(".") != "" and not {"/", "\\"} & set(state["run"]),
        "step": count(state["step"]),
        "train_seconds": number(state["train_seconds"], 0.0),
        "eval_seconds": number(state["eval_seconds"], 0.0),
        "best_val_loss": state["best_val_loss"] is None or number(state["best_val_loss"]),
        "batches": isinstance(batches, dict) and count(batches.get("epoch")) and count(batches.get("position")),
        "loss_sum": number(state["loss_sum"]),
        "loss_count": count(state["loss_count"]),
        "world_size": count(state.get("world_size", 1), 1),
        "wandb_id": state.get("wandb_id") is None or isinstance(state["wandb_id"], str),
        "data": state.get("data") is None or isinstance(state["data"], dict),
    }
    if bad := [key for key, ok in checks.items() if not ok]:
        raise UserError(
            f"checkpoint {folder} is damaged or incomplete (state.json: bad {', '.join(bad)}); use an earlier step_* folder"
        )


def compile_loss(model: torch.nn.Module, compile_it: bool, x: torch.Tensor, y: torch.Tensor, autocast) -> Callable:
    """The training loss `loss(x, y)`: the model compiled now, forward and backward on one batch under the loop's
    autocast (another autocast state would recompile at step 1); on a compiler failure, a warning and eager."""
    if not compile_it:
        return model
    print("compiling the model (the first step takes a while) ...", flush=True)
    if x.device.type == "cpu":
        torch._inductor.config.fallback_random = True  # dropout's masks from eager's generator: 18% faster steps
        # a seed repeats bit for bit: otherwise inductor's C++ embedding backward adds rows with atomics across threads
        torch.use_deterministic_algorithms(True, warn_only=True)
    started, compiled = time.perf_counter(), torch.compile(model)
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            with autocast():
                loss = compiled(x, y)
            loss.backward()
    except Exception as error:  # any compiler failure: training must go on
        message = (str(error).strip().splitlines() or [""])[0][:160]
        print(f"warning: torch.compile failed ({type(error).__name__}: {message}); training in eager mode", flush=True)
        return model
    finally:
        model.zero_grad(set_to_none=True)
    print(f"compiled in {time.perf_counter() - started:.1f}s", flush=True)
    return compiled


@torch.no_grad()
def evaluate(
    model: GPT, batches: Batches, autocast, device: torch.device, ctx: Distributed | None = None, stop=None
) -> float:
    """Mean loss per target token over the given batches; under torchrun each rank takes every world_size-th batch
    and the sums are added up. Eager on purpose: eval mode and the final partial batch would each cost a
    recompilation, and evaluation is a small share of the time. `model` is the plain one, never DDP's wrapper.
    NaN when `stop()` turned true on any rank between two batches (a stop signal)."""
    ctx = ctx or Distributed()
    model.eval()
    total, count, stopped = 0.0, 0, 0
    for x, y in batches[ctx.rank :: ctx.world_size]:
        if stop is not None and stop():
            stopped = 1
            break
        x, y = to_device(x, device), to_device(y, device)
        with autocast():
            total += model(x, y, reduction="sum").item()
        count += int((y != -1).sum())
    model.train()
    total, count, stopped = ctx.all_reduce(total, count, stopped)
    return math.nan if stopped else total / count


@dataclass
class Trainer:
    """One training job's parts, wired by setup(). step() is one optimizer step (bench/bench_train.py times it with
    the first group of fields alone); log(), final_evaluation(), save() and finish() serve the loop in run().
    With --ema_decay, `ema` (optimizer.EMA) averages the model's weights after every step; every evaluation reports
    the average's loss beside the raw weights' (val_loss_ema), the checkpoints hold it (ema.safetensors) and the
    end-of-run samples and inference cases come from it. Without, `ema` is None and nothing of it runs."""

    cfg: Config
    model: GPT  # the plain model: evaluation, saving, sampling
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # its training loss: compiled, DDP-wrapped
    optimizers: list[torch.optim.Optimizer]
    batches: TrainBatches
    total_steps: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    ctx: Distributed = field(default_factory=Distributed)
    ddp: DistributedDataParallel | None = None
    # the rest of the job
    tokenizer: Tokenizer | None = None
    val_ids: torch.Tensor | None = None
    recorder: RunRecorder | None = None
    save_dir: Path | None = None
    peak: float | None = None  # FLOP/s of all the devices in use, for MFU
    val_bytes: int | None = None  # UTF-8 bytes of the validation split (data.val_bytes), for bits per byte
    final_bpb: float | None = None  # the final evaluation's bits per byte, for finish(); None when unknown
    final_ema: tuple[float, float | None] | None = None  # the final evaluation of the average: loss, bits per byte

    def __post_init__(self) -> None:
        cfg, self.device = self.cfg, next(self.model.parameters()).device
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None  # (a resume loads the saved one into it)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # what the gradient clipping sees
        self.tokens_per_step = cfg.batch_size * cfg.context_len * cfg.accumulation_steps * self.ctx.world_size
        matrices = self.model.num_params()["non_embedding"]
        self.step_flops = self.tokens_per_step * flops_per_token(
            matrices, cfg.num_blocks, cfg.num_heads, cfg.head_dim, cfg.context_len
        )
        no_val = self.val_ids is None  # (the fixed batches of the periodic evaluations)
        self.val_fixed = (
            [] if no_val else fixed_val_batches(self.val_ids, cfg.batch_size, cfg.context_len, cfg.eval_steps)
        )

    def step(self, state: LoopState) -> tuple[float, torch.Tensor]:
        """Optimizer step state.step + 1: accumulated micro-batches, clipping, the update; (lr multiplier, grad
        norm). A non-finite loss or gradient is noted on the device (no sync) or, with --skip_nonfinite, skipped."""
        cfg, step = self.cfg, state.step + 1
        lr_mult = lr_multiplier(step - 1, self.total_steps, cfg, state.train_seconds / (cfg.time_budget_s or math.inf))
        set_lr(self.optimizers, lr_mult)
        step_loss = torch.zeros((), device=self.device)
        for micro in range(cfg.accumulation_steps):
            x, y = self.batches.next_batch()
            last = micro == cfg.accumulation_steps - 1  # DDP averages the gradients in the last backward only
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with self.autocast():
                    loss = self.loss(x, y) / cfg.accumulation_steps  # the mean over micro-batches, like one big batch
                loss.backward()
            step_loss += loss.detach()
        self.ctx.average_(step_loss)  # the loss of the whole step on every rank, so all ranks decide alike
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
        if cfg.skip_nonfinite and not finite.item():  # the flag costs one device sync per step
            state.skipped_in_a_row += 1
            print(f"warning: step {step}: non-finite loss or gradient; skipped (--skip_nonfinite)", flush=True)
            if state.skipped_in_a_row == MAX_SKIPS_IN_A_ROW:
                raise diverged(state, f"{MAX_SKIPS_IN_A_ROW} steps in a row were non-finite (the last: step {step})")
        else:
            state.first_bad_step = torch.where(finite | (state.first_bad_step > 0), state.first_bad_step, step)
            for optimizer in self.optimizers:
                optimizer.step()
            if self.ema is not None:
                self.ema.update()
            state.loss_sum += step_loss
            state.loss_count, state.skipped_in_a_row = state.loss_count + 1, 0
        self.model.zero_grad(set_to_none=True)
        state.step, state.interval_steps = step, state.interval_steps + 1
        return lr_mult, grad_norm

    def log(self, state: LoopState, lr_mult: float, grad_norm: torch.Tensor, step_start: float, evaluate_now: bool):
        """The record of the log interval ending at this step (console, metrics.jsonl, wandb), with the periodic
        evaluation when it is due. The loss's .item() is the step's only sync: the step is timed after it."""
        cfg, step = self.cfg, state.step
        check_finite(state)
        loss = state.loss_sum.item() / state.loss_count if state.loss_count else math.nan
        now = time.perf_counter()
        state.train_seconds += now - step_start
        step_ms = (now - state.interval_start) / state.interval_steps * 1000
        record = {
            "step": step,
            "loss": round(loss, 5),
            "lr": cfg.lr * lr_mult,
            "muon_lr": cfg.muon_lr * lr_mult if cfg.use_muon else None,
            "grad_norm": round(float(grad_norm), 5),
            "step_ms": round(step_ms, 2),
            "tok_per_s": round(self.tokens_per_step / step_ms * 1000, 1),
            "mfu": round(self.step_flops / (step_ms / 1000) / self.peak, 4) if self.peak else None,
            "epoch": round(step * self.tokens_per_step / len(self.batches.tokens), 4),
            "elapsed_s": round(state.train_seconds, 3),
        }
        if evaluate_now:
            eval_start = time.perf_counter()
            record["val_loss"] = round(evaluate(self.model, self.val_fixed, self.autocast, self.device, self.ctx), 5)
            state.best_val_loss = min(state.best_val_loss, record["val_loss"])  # (of the raw weights)
            if self.ema is not None:
                ema_loss = evaluate(self.ema.model, self.val_fixed, self.autocast, self.device, self.ctx)
                record["val_loss_ema"] = round(ema_loss, 5)
            state.eval_seconds += time.perf_counter() - eval_start
        self.recorder.log(record)
        ema_part = f" | ema {record['val_loss_ema']:.4f}" if "val_loss_ema" in record else ""
        print(format_line(record, self.total_steps) + ema_part, flush=True)
        state.loss_sum.zero_()
        state.loss_count, state.interval_start, state.interval_steps = 0, time.perf_counter(), 0

    def final_evaluation(self, state: LoopState, signals: StopSignals) -> float | None:
        """The loss over the whole validation split, or its first --val_tokens targets, recorded with its bits per
        byte as the run's final record (with --ema_decay, the average's too: val_loss_ema, val_bpb_ema); None if a
        stop signal came during it."""
        check_finite(state)
        cfg, split_tokens = self.cfg, len(self.val_ids)
        scope = self.final_scope()
        scope = "whole validation split" if scope == "whole split" else scope
        print(f"final evaluation on the {scope} ({split_tokens} tokens) ...", flush=True)
        eval_start = time.perf_counter()
        batches = full_val_batches(self.val_ids, cfg.batch_size, cfg.context_len, cfg.val_tokens)

        def loss_of(model: GPT) -> float:  # NaN when a stop signal came during it
            return evaluate(model, batches, self.autocast, self.device, self.ctx, lambda: bool(signals.signum))

        val = loss_of(self.model)
        ema_val = loss_of(self.ema.model) if self.ema is not None and not math.isnan(val) else None
        state.eval_seconds += time.perf_counter() - eval_start
        if math.isnan(val) or (ema_val is not None and math.isnan(ema_val)):
            return None
        state.best_val_loss = min(state.best_val_loss, val)
        self.final_bpb = bits_per_byte(val, split_tokens, self.val_bytes)
        targets = sum(int((y != -1).sum()) for _, y in batches)
        record = {
            "step": state.step,
            "val_loss": round(val, 5),
            "val_bpb": None if self.final_bpb is None else round(self.final_bpb, 5),
            "val_targets": targets,  # the targets the loss is the mean over
            "final": True,
            "elapsed_s": round(state.train_seconds, 3),
        }
        if ema_val is not None:
            self.final_ema = (ema_val, bits_per_byte(ema_val, split_tokens, self.val_bytes))
            ema_bpb = self.final_ema[1]
            record |= {"val_loss_ema": round(ema_val, 5), "val_bpb_ema": None if ema_bpb is None else round(ema_bpb, 5)}
        self.recorder.log(record)
        return val

    def final_scope(self) -> str:
        """What the final evaluation covers, in words: "whole split", or "first N val targets" under --val_tokens."""
        budget = self.cfg.val_tokens
        whole = budget is None or budget >= len(self.val_ids) - 1
        return "whole split" if whole else f"first {budget} val targets"

    def save(self, state: LoopState) -> Path:
        """A checkpoint of everything needed to continue after this step; never one of non-finite weights. Every
        rank calls it (the ranks' random generators are gathered); rank 0 alone writes."""
        check_finite(state)
        if not torch.stack([torch.isfinite(p).all() for p in self.params]).all():
            raise diverged(
                state, f"the weights became non-finite by step {state.step} (an update too large); not saving them"
            )
        rngs = self.ctx.gather(rng_state(self.device))
        if not self.ctx.is_main:
            return self.save_dir / f"step_{state.step:06d}"
        rng = {**rngs[0], "ranks": rngs[1:]} if self.ctx.active else rngs[0]
        tokenizer, keep = self.tokenizer.to_dict(), self.cfg.keep_checkpoints
        written = (self.save_dir, state.step, self.model, tokenizer, self.optimizers, state.state_dict(), rng)
        ema = self.ema.state_dict() if self.ema is not None else None
        return save_checkpoint(*written, keep, protect=state.resumed_from, ema=ema)  # (protect: the resumed one)

    def finish(self, state: LoopState, signals: StopSignals, final_val: float | None) -> dict[str, Any]:
        """Samples and inference cases (unless stopped by a signal; from the weight average with --ema_decay), the
        closing lines, and the run's summary."""
        cfg, step, checkpoint, samples = self.cfg, state.step, state.last_checkpoint, []
        model = self.ema.model if self.ema is not None else self.model  # (the weights sample.py takes by default)
        stopped_by = signal.Signals(signals.signum).name if signals.signum else None
        checked = not stopped_by and self.ctx.is_main and (cfg.num_samples or cfg.run_cases)  # the memorization check
        index = training_index(self.tokenizer, self.batches.tokens) if checked else None  # (None: skipped, noted)
        if stopped_by:
            saved = f"saved {checkpoint}; continue with --resume {self.save_dir}" if checkpoint else "nothing saved"
            print(f"stopped by {stopped_by} after step {step}: {saved}", flush=True)
        elif cfg.num_samples and self.ctx.is_main:
            print(f"--- {cfg.num_samples} samples{' (EMA weights)' if self.ema is not None else ''} ---")
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
            for i in range(cfg.num_samples):
                if signals.signum:  # a stop signal between two samples: the rest are skipped
                    break
                ids = generate(model, [self.tokenizer.start_id], cfg.sample_tokens, 0.8, 200, None, True, generator)
                samples.append(self.tokenizer.decode(list(ids)))
                copied = f": {describe(index.copied_share(samples[-1]), index.chars)}" if index is not None else ""
                print(f"[sample {i + 1}{copied}]\n{samples[-1].strip()}\n", flush=True)
        run_them = cfg.run_cases and not signals.signum and self.ctx.is_main
        copied = index.copied_share if index is not None else None
        cases = run_cases(model, self.tokenizer, progress=True, copied=copied) if run_them else []
        if cases:
            print(format_table(cases), flush=True)
        tok_per_s = step * self.tokens_per_step / max(state.train_seconds, 1e-9)
        if not stopped_by:
            print("=" * 78)
            print(
                f"done: {step} steps in {format_duration(state.train_seconds)} of training "
                f"(+{state.eval_seconds:.1f}s eval), {human(tok_per_s)} tok/s"
            )
            bpb = f", {self.final_bpb:.3f} bits/byte" if self.final_bpb is not None else ""
            print(f"final val loss {final_val:.4f} ({self.final_scope()}){bpb}, best {state.best_val_loss:.4f}")
            if self.final_ema is not None:
                ema_val, ema_bpb = self.final_ema
                ema_bits = f", {ema_bpb:.3f} bits/byte" if ema_bpb is not None else ""
                print(f"final EMA val loss {ema_val:.4f} (decay {cfg.ema_decay}){ema_bits}")
            print(f"records: {self.recorder.dir}" + (f" | checkpoint: {checkpoint}" if checkpoint else ""), flush=True)
        return {
            "run": self.recorder.name,
            "steps": step,
            "final_val_loss": final_val,
            "final_val_bpb": self.final_bpb,
            "final_val_loss_ema": self.final_ema[0] if self.final_ema is not None else None,
            "final_val_bpb_ema": self.final_ema[1] if self.final_ema is not None else None,
            "best_val_loss": state.best_val_loss,
            "train_seconds": state.train_seconds,
            "eval_seconds": state.eval_seconds,
            "tok_per_s": tok_per_s,
            "stopped_early": step < self.total_steps and not stopped_by,
            "stopped_by": signal.Signals(signals.signum).name if signals.signum else None,
            "run_dir": str(self.recorder.dir),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "samples": samples,
            "cases": [r.to_dict() for r in cases],
        }


def diverged(state: LoopState, what: str) -> UserError:
    """The one-line error of a run whose loss, gradients or weights became non-finite, naming the last good save."""
    good = state.last_checkpoint or state.resumed_from
    advice = "lower --lr / --muon_lr, raise --warmup_steps, or pass --skip_nonfinite True"
    if good:
        return UserError(f"{what}; the last good checkpoint is {good}: resume from it and {advice}")
    return UserError(f"{what}; no checkpoint was written: {advice}")


def check_finite(state: LoopState) -> None:
    if bad := int(state.first_bad_step):
        raise diverged(state, f"the loss or gradient became non-finite at step {bad}")
