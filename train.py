"""Train a GPT: `uv run train.py --preset cpu` (see README for every flag).

The loop wires the modules together: config -> data -> model -> optimizers -> steps, with evaluation, logs
(console, runs/<run>/metrics.jsonl, optional wandb), checkpoints and a few samples at the end.
Under `torchrun --nproc_per_node=N -- train.py ...` it trains data-parallel with DDP (README: multiple GPUs and nodes).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (
    check_loop_state,
    compare_configs,
    compare_data,
    load_optimizer_state,
    load_rng_state,
    load_weights,
    rank_rng_state,
    read_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from config import Config, UserError, parse_args
from data import (
    TrainBatches,
    fixed_val_batches,
    full_val_batches,
    load_dataset,
    to_device,
    token_fingerprint,
)
from distributed import Distributed, init_distributed
from inference import format_table, run_cases
from model import GPT, generate
from optimizer import Muon, build_optimizers, lr_multiplier, set_lr
from records import RunRecorder, default_run_name
from utils import (
    StopSignals,
    banner,
    check_writable,
    flops_per_token,
    format_duration,
    format_line,
    human,
    peak_flops,
    resolve_device,
    resolve_dtype,
    seed_everything,
)

MAX_SKIPS_IN_A_ROW = 10  # with --skip_nonfinite: this many bad steps in a row means the run diverged


class LossFunction:
    """The model's training loss, compiled when asked; if compilation fails on first use, one warning and eager from
    then on."""

    def __init__(self, model: torch.nn.Module, compile_it: bool):
        self.model = model
        self.fn = torch.compile(model) if compile_it else model
        self.compiled = compile_it

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(x, y)

    def warm_up(self, x: torch.Tensor, y: torch.Tensor, autocast) -> None:
        """Compile forward and backward now (outside the timed loop), falling back to eager on any failure.
        Under the loop's autocast: a change of autocast state would recompile at the first step."""
        if not self.compiled:
            return
        print("compiling the model (the first step takes a while) ...", flush=True)
        started = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                with autocast():
                    loss = self(x, y)
                loss.backward()
        except Exception as error:  # any compiler failure: training must go on
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            print(
                f"warning: torch.compile failed ({type(error).__name__}: {message[:160]}); training in eager mode",
                flush=True,
            )
            self.fn, self.compiled = self.model, False
        finally:
            self.model.zero_grad(set_to_none=True)
        if self.compiled:
            print(f"compiled in {time.perf_counter() - started:.1f}s", flush=True)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    autocast,
    device: torch.device,
    ctx: Distributed | None = None,
) -> float:
    """Mean loss per target token over the given batches; under torchrun each rank takes every world_size-th batch
    and the sums are added up. Eager on purpose: eval mode and the final partial batch would each cost a
    recompilation, and evaluation is a small share of the time. `model` is the plain one, never DDP's wrapper."""
    ctx = ctx or Distributed()
    model.eval()
    total, count = 0.0, 0
    for x, y in batches[ctx.rank :: ctx.world_size]:
        x, y = to_device(x, device), to_device(y, device)
        with autocast():
            total += model(x, y, reduction="sum").item()
        count += int((y != -1).sum())
    model.train()
    total, count = ctx.all_reduce(total, count)
    return total / count


def train(cfg: Config) -> dict[str, Any]:
    """Run one training job end to end, or continue one with --resume; returns a summary (losses, timings, where
    things went). Stops early on SIGINT/SIGTERM (summary["stopped_by"]) after saving when saving is on. Under
    torchrun this process is one rank of a DDP job; rank 0 alone prints, records and saves."""
    ctx, device = init_distributed(resolve_device(cfg.device))
    with contextlib.ExitStack() as stack:
        stack.callback(ctx.close)
        if not ctx.is_main:  # one console for the job (errors still reach stderr)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        summary = run(cfg, ctx, device)
        ctx.barrier()  # leave together: no rank tears down its connections while rank 0 still saves
        return summary


def run(cfg: Config, ctx: Distributed, device: torch.device) -> dict[str, Any]:
    """train() for this process, given its place in the job."""
    resume = resolve_checkpoint(cfg.resume) if cfg.resume else None
    check_writable(cfg.runs_dir, "--runs_dir")
    if cfg.save_model:
        check_writable(resume.parent if resume else cfg.save_model_dir, "--save_model_dir")
    if resume:
        saved_config, saved_tokenizer, saved = read_checkpoint(resume)
        check_loop_state(resume, saved)
        changed = compare_configs(resume, saved_config, cfg)
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")
    compile_it = cfg.torch_compile
    if compile_it and device.type == "mps":
        print("notice: torch.compile is off on MPS (not yet reliable there)")
        compile_it = False
    dtype = resolve_dtype(cfg.dtype, device, compile_it)

    if device.type == "cpu" and cfg.preset is None and cfg.embedding_dim * cfg.context_len >= 512 * 1024:
        print("notice: these are the GPU-sized defaults and will be slow on a CPU; try --preset cpu", flush=True)
    tokenizer, train_ids, val_ids = load_dataset(cfg)
    data_id = token_fingerprint(train_ids, val_ids)
    model = GPT(cfg, tokenizer.vocab_size).to(device)
    optimizers = build_optimizers(model, cfg, compile_it, ctx.rank, ctx.world_size)
    batches = TrainBatches(train_ids, cfg.batch_size, cfg.context_len, cfg.seed, device, ctx.rank, ctx.world_size)
    if ctx.rank:  # its own dropout masks; rank 0 keeps the single-process stream (resume restores each rank's own)
        torch.manual_seed(cfg.seed + ctx.rank)
    start_step, train_seconds, eval_seconds, best_val, loss_total, loss_count = 0, 0.0, 0.0, math.inf, 0.0, 0
    if resume:  # everything but the RNGs, which are set last, after start-up has drawn from them
        compare_data(resume, saved_tokenizer, saved, tokenizer.to_dict(), data_id)
        load_weights(resume, model)
        load_optimizer_state(resume, optimizers)
        rng = load_rng_state(resume)
        batches.load_state_dict(saved["batches"])
        start_step, train_seconds, eval_seconds = saved["step"], saved["train_seconds"], saved["eval_seconds"]
        best_val = math.inf if saved["best_val_loss"] is None else saved["best_val_loss"]
        loss_total, loss_count = saved["loss_sum"], saved["loss_count"]  # the log interval in progress
        if saved.get("world_size", 1) != ctx.world_size:
            changed.append(f"{ctx.world_size} ranks (was {saved.get('world_size', 1)})")
    steps_per_epoch = max(1, batches.batches_per_epoch // cfg.accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    tokens_per_step = cfg.batch_size * cfg.context_len * cfg.accumulation_steps * ctx.world_size  # all ranks
    val_fixed = fixed_val_batches(val_ids, cfg.batch_size, cfg.context_len, cfg.eval_steps)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    ddp = None
    if ctx.active:  # DDP averages the gradients over ranks
        ddp = DistributedDataParallel(model, [device] if device.type == "cuda" else None)
        ddp.broadcast_buffers = False  # the buffers (rotary tables, vocab mask) are constants: no sync per forward
    loss_fn = LossFunction(ddp or model, compile_it)

    params = model.num_params()
    step_flops = tokens_per_step * flops_per_token(
        params["non_embedding"], cfg.num_blocks, cfg.num_heads, cfg.head_dim, cfg.context_len
    )
    peak, peak_source = peak_flops(device, dtype, cfg.peak_flops) if ctx.is_main else (None, "")
    if peak and ctx.active:  # MFU counts every rank's work, so it is against the peak of every device in use
        peak, peak_source = peak * ctx.world_size, f"{ctx.world_size} x {peak_source}"
    info = {"vocab_size": tokenizer.vocab_size, "params": params, "device": str(device), "world_size": ctx.world_size}
    recorder = RunRecorder(
        cfg,
        saved["run"] if resume else re.sub(r"[^\w.-]+", "-", cfg.run or "").strip("-") or default_run_name(),
        {**info, "train_tokens": len(train_ids)},
        resume_step=start_step if resume else None,
        wandb_id=saved.get("wandb_id") if resume else None,
        enabled=ctx.is_main,
    )
    # a resumed run saves beside its checkpoint; a new one under the name rank 0 picked
    save_dir = resume.parent if resume else Path(cfg.save_model_dir) / ctx.broadcast(recorder.name)
    banner(
        {
            "run": f"{recorder.name}  (records in {recorder.dir})",
            **({"resume": f"{resume} at step {start_step}"} if resume else {}),
            "device": f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device),
            "ranks": f"{ctx.world_size} processes ({ctx.backend}), batch {cfg.batch_size} each" if ctx.active else None,
            "dtype": f"{str(dtype).removeprefix('torch.')}, compile {'on' if compile_it else 'off'}",
            "model": f"{cfg.num_blocks} blocks x {cfg.num_heads} heads x {cfg.embedding_dim} dim, context {cfg.context_len}, "
            f"{cfg.pos_emb}, {cfg.activation}{', qk-norm' if cfg.qk_norm else ''}{', sink' if cfg.attn_sink else ''}",
            "params": f"{human(params['total'])} total = {human(params['embedding'])} embedding + "
            f"{human(params['non_embedding'])} other (head included)",
            "data": f"{cfg.data_path}: {human(len(train_ids))} train / {human(len(val_ids))} val tokens, "
            f"tokenizer {cfg.tokenizer} ({tokenizer.vocab_size} ids)",
            "steps": f"{total_steps} x {tokens_per_step} tokens ({cfg.batch_size} x {cfg.context_len} x "
            f"{cfg.accumulation_steps} accumulation{f' x {ctx.world_size} ranks' if ctx.active else ''}) = "
            f"{total_steps * tokens_per_step / len(train_ids):.2f} epochs",
            "optimizer": (
                f"Muon lr {cfg.muon_lr} (hidden matrices) + AdamW lr {cfg.lr}" if cfg.use_muon else f"AdamW lr {cfg.lr}"
            )
            + f", {cfg.lr_schedule} schedule, warmup {cfg.warmup_steps}",
            "MFU peak": f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else f"n/a ({peak_source})",
            "saving": f"{save_dir} (--keep_checkpoints {cfg.keep_checkpoints})"
            if cfg.save_model
            else "off (--save_model True to keep the weights)",
        },
    )
    if resume and changed:
        print(f"notice: resuming with {', '.join(changed)}; the run will differ from an uninterrupted one", flush=True)
    if start_step >= total_steps:
        print(f"notice: the checkpoint is at step {start_step} of {total_steps}; raise --max_steps to train on")

    loss_fn.warm_up(*(to_device(t, device) for t in val_fixed[0]), autocast)
    for optimizer in optimizers:  # like the loss: compile now what the first step would compile, not in the loop
        if isinstance(optimizer, Muon):
            optimizer.warm_up()
    if resume and (mine := rank_rng_state(rng, ctx.rank)):  # (a rank the saving job lacked keeps its fresh seed)
        set_rng_state(mine)
    parameters = [p for p in model.parameters() if p.requires_grad]
    last_ckpt, step, stopped_early, skipped_in_a_row, stop_signum = None, start_step, False, 0, 0
    interval_start, interval_steps = time.perf_counter(), 0
    loss_sum = torch.tensor(loss_total, device=device)  # summed step losses of the log interval, on the device
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # first non-finite step; on the device: no sync

    def diverged(what: str) -> UserError:
        good = last_ckpt or resume
        advice = "lower --lr / --muon_lr, raise --warmup_steps, or pass --skip_nonfinite True"
        if good:
            return UserError(f"{what}; the last good checkpoint is {good}: resume from it and {advice}")
        return UserError(f"{what}; no checkpoint was written: {advice}")

    def check_finite() -> None:
        if bad := int(first_bad):
            raise diverged(f"the loss or gradient became non-finite at step {bad}")

    def save(step: int) -> Path:
        """A checkpoint of everything needed to continue after `step`; never one of non-finite weights. Every rank
        calls it (the ranks' random generators are gathered); rank 0 alone writes."""
        check_finite()
        if not torch.stack([torch.isfinite(p).all() for p in parameters]).all():
            raise diverged(f"the weights became non-finite by step {step} (an update too large); not saving them")
        rngs = ctx.gather(rng_state(device))
        if not ctx.is_main:
            return save_dir / f"step_{step:06d}"
        state = {
            "run": recorder.name,
            "data": data_id,
            "batches": batches.state_dict(),
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "best_val_loss": best_val if math.isfinite(best_val) else None,
            "loss_sum": loss_sum.item(),
            "loss_count": loss_count,
            "wandb_id": recorder.wandb_id,
            "world_size": ctx.world_size,
        }
        rng = {**rngs[0], "ranks": rngs[1:]} if ctx.active else rngs[0]
        return save_checkpoint(save_dir, step, model, tokenizer.to_dict(), optimizers, state, rng, cfg.keep_checkpoints)

    with recorder, StopSignals() as signals:
        for step in range(start_step + 1, total_steps + 1):
            step_start = time.perf_counter()
            time_frac = train_seconds / cfg.time_budget_s if cfg.time_budget_s else 0.0
            lr_mult = lr_multiplier(step - 1, total_steps, cfg, time_frac)
            set_lr(optimizers, lr_mult)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.accumulation_steps):
                x, y = batches.next_batch()
                # DDP averages the gradients over ranks in the last micro-step's backward only
                last = micro == cfg.accumulation_steps - 1
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    with autocast():
                        loss = loss_fn(x, y) / cfg.accumulation_steps  # the mean over micro-batches, like one big batch
                    loss.backward()
                step_loss += loss.detach()
            ctx.average_(step_loss)  # the loss of the whole step on every rank, so all ranks decide alike
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
            if cfg.skip_nonfinite and not finite.item():  # the flag costs one device sync per step
                skipped_in_a_row += 1
                print(f"warning: step {step}: non-finite loss or gradient; skipped (--skip_nonfinite)", flush=True)
                if skipped_in_a_row == MAX_SKIPS_IN_A_ROW:
                    raise diverged(f"{MAX_SKIPS_IN_A_ROW} steps in a row were non-finite (the last: step {step})")
            else:
                first_bad = torch.where(finite | (first_bad > 0), first_bad, step)
                for optimizer in optimizers:
                    optimizer.step()
                loss_sum += step_loss
                loss_count, skipped_in_a_row = loss_count + 1, 0
            model.zero_grad(set_to_none=True)
            interval_steps += 1

            is_log = step % cfg.log_every == 0 or step == total_steps
            is_eval = cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps
            if is_log or is_eval:
                check_finite()
                loss_value = loss_sum.item() / loss_count if loss_count else math.nan  # .item(): time only after it
                now = time.perf_counter()
                train_seconds += now - step_start
                step_ms = (now - interval_start) / interval_steps * 1000
                record = {
                    "step": step,
                    "loss": round(loss_value, 5),
                    "lr": cfg.lr * lr_mult,
                    "muon_lr": cfg.muon_lr * lr_mult if cfg.use_muon else None,
                    "grad_norm": round(float(grad_norm), 5),
                    "step_ms": round(step_ms, 2),
                    "tok_per_s": round(tokens_per_step / step_ms * 1000, 1),
                    "mfu": round(step_flops / (step_ms / 1000) / peak, 4) if peak else None,
                    "epoch": round(step * tokens_per_step / len(train_ids), 4),
                    "elapsed_s": round(train_seconds, 3),
                }
                if is_eval:
                    eval_start = time.perf_counter()
                    record["val_loss"] = round(evaluate(model, val_fixed, autocast, device, ctx), 5)
                    best_val = min(best_val, record["val_loss"])
                    eval_seconds += time.perf_counter() - eval_start
                recorder.log(record)
                print(format_line(record, total_steps), flush=True)
                loss_sum.zero_()
                loss_count, interval_start, interval_steps = 0, time.perf_counter(), 0
            else:
                train_seconds += time.perf_counter() - step_start
            if cfg.save_model and cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                last_ckpt = save(step)
                print(f"saved {last_ckpt}", flush=True)
            # all ranks stop at the same step: on the first signal any of them got, by the slowest clock
            stop_signum, train_seconds = ctx.all_reduce(signals.signum or 0, train_seconds, op="max")
            if cfg.time_budget_s and train_seconds >= cfg.time_budget_s:
                stopped_early = step < total_steps
                print(f"time budget of {cfg.time_budget_s:g}s reached at step {step}", flush=True)
                break
            if stop_signum:
                break

        final_val = None
        if not stop_signum:  # a signal skips the final evaluation: the user asked to stop
            check_finite()
            print(f"final evaluation on the whole validation split ({len(val_ids)} tokens) ...", flush=True)
            eval_start = time.perf_counter()
            final_batches = full_val_batches(val_ids, cfg.batch_size, cfg.context_len)
            final_val = evaluate(model, final_batches, autocast, device, ctx)
            eval_seconds += time.perf_counter() - eval_start
            best_val = min(best_val, final_val)
            record = {
                "step": step,
                "val_loss": round(final_val, 5),
                "final": True,
                "elapsed_s": round(train_seconds, 3),
            }
            recorder.log(record)
        if cfg.save_model and not (stop_signum and last_ckpt and last_ckpt.name == f"step_{step:06d}"):
            last_ckpt = save(step)  # (unless a signal came during a step that --save_every has just saved)

    signum = int(stop_signum) or signals.signum  # (one that came after the last step counts for the exit status)
    stopped_by = signal.Signals(signum).name if signum else None
    samples = []
    if stopped_by:
        print(
            f"stopped by {stopped_by} after step {step}: "
            + (
                f"saved {last_ckpt}; continue with --resume {save_dir}" if last_ckpt else "saving is off, nothing saved"
            ),
            flush=True,
        )
    elif cfg.num_samples and ctx.is_main:
        print(f"--- {cfg.num_samples} samples ---")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        for i in range(cfg.num_samples):
            ids = list(
                generate(unwrap(model), [tokenizer.start_id], cfg.sample_tokens, 0.8, 200, None, True, generator)
            )
            samples.append(tokenizer.decode(ids))
            print(f"[sample {i + 1}]\n{samples[-1].strip()}\n", flush=True)
    run_them = cfg.run_cases and not stopped_by and ctx.is_main
    case_results = run_cases(unwrap(model), tokenizer, progress=True) if run_them else []
    if case_results:
        print(format_table(case_results), flush=True)

    summary = {
        "run": recorder.name,
        "steps": step,
        "final_val_loss": final_val,
        "best_val_loss": best_val,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "tok_per_s": step * tokens_per_step / max(train_seconds, 1e-9),
        "stopped_early": stopped_early,
        "stopped_by": stopped_by,
        "run_dir": str(recorder.dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "samples": samples,
        "cases": [r.to_dict() for r in case_results],
    }
    if stopped_by:
        return summary
    print("=" * 78)
    print(
        f"done: {step} steps in {format_duration(train_seconds)} of training (+{eval_seconds:.1f}s eval), "
        f"{human(summary['tok_per_s'])} tok/s"
    )
    print(f"final val loss {final_val:.4f} (whole split), best {best_val:.4f}")
    print(f"records: {recorder.dir}" + (f" | checkpoint: {last_ckpt}" if last_ckpt else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when done, 2 with one `error:` line for a user mistake, 128 + signal when stopped."""
    try:
        cfg = parse_args(argv)
        if cfg.resume:  # flags left out take the checkpoint's values rather than the defaults
            cfg = parse_args(argv, base=read_checkpoint(resolve_checkpoint(cfg.resume))[0])
        summary = train(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C
        print("error: interrupted", file=sys.stderr)
        return 130
    return 128 + signal.Signals[summary["stopped_by"]] if summary["stopped_by"] else 0


if __name__ == "__main__":
    sys.exit(main())
