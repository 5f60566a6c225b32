"""Train a GPT: `uv run train.py --preset cpu` (see README for every flag).

setup() wires config -> data -> model -> optimizers into a Trainer (trainer.py); the loop in run() takes optimizer
steps (Trainer.step), logs and evaluates, saves, and stops at the last step, on the clock or on a signal.
Under `torchrun --nproc_per_node=N -- train.py ...` it trains data-parallel with DDP (docs/multi-gpu.md).
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): leave quietly with 130, as at any other moment
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from checkpoint import Resume, read_resume, saved_config
from config import Config, UserError, parse_args
from data import TrainBatches, load_dataset, to_device
from distributed import Distributed, init_distributed
from export import load_pretrained
from model import GPT
from optimizer import Muon, build_optimizers
from records import RunRecorder, claim_run, lock_run, run_name
from trainer import LoopState, Trainer, check_loop_state, compile_loss
from utils import (
    StopSignals,
    autocast_for,
    banner,
    check_writable,
    human,
    peak_flops,
    resolve_device,
    resolve_dtype,
    seed_everything,
)


def train(cfg: Config) -> dict[str, Any]:
    """Run one training job end to end, or continue one with --resume; returns a summary (losses, timings, where
    things went). Stops early on SIGINT/SIGTERM (summary["stopped_by"]) after saving when saving is on. Under
    torchrun this process is one rank of a DDP job; rank 0 alone prints, records and saves."""
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(StopSignals())  # from the start: a stop signal is honoured in every phase
        ctx, device = init_distributed(resolve_device(cfg.device))
        stack.callback(ctx.close)
        if not ctx.is_main:  # one console for the job (errors still reach stderr)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        summary = run(cfg, ctx, device, stack, signals)
        ctx.barrier()  # leave together: no rank tears down its connections while rank 0 still saves
        return summary


def run(cfg: Config, ctx: Distributed, device: torch.device, stack: contextlib.ExitStack, signals) -> dict[str, Any]:
    """train() for this process, given its place in the job: the loop."""
    trainer, state = setup(cfg, ctx, device, stack)
    first_step, (stop_signum,) = state.step, ctx.all_reduce(signals.signum or 0, op="max")  # (one during start-up)
    with trainer.recorder:
        for _ in range(state.step, trainer.total_steps if not stop_signum else state.step):
            # --- one optimizer step ---
            step_start = time.perf_counter()
            lr_mult, grad_norm = trainer.step(state)
            step = state.step

            # --- log and evaluate ---
            evaluate_now = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != trainer.total_steps
            if step % cfg.log_every == 0 or step == trainer.total_steps or evaluate_now:
                trainer.log(state, lr_mult, grad_norm, step_start, evaluate_now)
            else:
                state.train_seconds += time.perf_counter() - step_start

            # --- save ---
            if cfg.save_model and cfg.save_every and step % cfg.save_every == 0 and step != trainer.total_steps:
                state.last_checkpoint = trainer.save(state)
                print(f"saved {state.last_checkpoint}", flush=True)

            # --- stop? All ranks stop at the same step: on the first signal any got, by the slowest clock ---
            stop_signum, state.train_seconds = ctx.all_reduce(signals.signum or 0, state.train_seconds, op="max")
            if cfg.time_budget_s and state.train_seconds >= cfg.time_budget_s:
                print(f"time budget of {cfg.time_budget_s:g}s reached at step {step}", flush=True)
                break
            if stop_signum:
                break

        # --- the end: a signal skips (or cuts short) the final evaluation, never the save of a new step ---
        final_val = None if stop_signum else trainer.final_evaluation(state, signals)
        (stop_signum,) = ctx.all_reduce(signals.signum or 0, op="max")  # every rank decides the save alike
        signals.signum = signals.signum or int(stop_signum) or None  # (another rank's signal stops this one too)
        just_saved = state.last_checkpoint and state.last_checkpoint.name == f"step_{state.step:06d}"
        if cfg.save_model and not (signals.signum and (just_saved or state.step == first_step)):
            state.last_checkpoint = trainer.save(state)
    return trainer.finish(state, signals, final_val)


def setup(
    cfg: Config, ctx: Distributed, device: torch.device, stack: contextlib.ExitStack
) -> tuple[Trainer, LoopState]:
    """Check the checkpoint to resume and the outputs, take the run's folders (one writer each), then build data,
    model, optimizers and records; compile."""
    resume = read_resume(cfg.resume, cfg, ctx.world_size) if cfg.resume else None
    if resume:
        check_loop_state(resume.state, resume.folder)
    check_writable(cfg.runs_dir, "--runs_dir")
    if cfg.save_model:
        check_writable(resume.folder.parent if resume else cfg.save_model_dir, "--save_model_dir")
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")
    compile_it = cfg.torch_compile and device.type != "mps"
    if cfg.torch_compile and not compile_it:
        print("notice: torch.compile is off on MPS (not yet reliable there)")
    dtype = resolve_dtype(cfg.dtype, device, compile_it)
    if device.type == "cpu" and cfg.preset is None and cfg.embedding_dim * cfg.context_len >= 512 * 1024:
        print("notice: these are the GPU-sized defaults and will be slow on a CPU; try --preset cpu", flush=True)

    dataset = load_dataset(cfg)
    tokenizer, train_ids, val_ids = dataset.tokenizer, dataset.train, dataset.val
    model = GPT(cfg, tokenizer.vocab_size).to(device)
    if cfg.init_from and not resume:  # GPT-2's weights (a resumed run has its own)
        load_pretrained(model, cfg.init_from)
    optimizers = build_optimizers(model, cfg, compile_it, ctx.rank, ctx.world_size)
    batches = TrainBatches(train_ids, cfg.batch_size, cfg.context_len, cfg.seed, device, ctx.rank, ctx.world_size)
    if ctx.rank:  # its own dropout masks; rank 0 keeps the single-process stream (resume restores each rank's own)
        torch.manual_seed(cfg.seed + ctx.rank)
    state = LoopState(data=dataset.fingerprint, world_size=ctx.world_size, batches=batches).to(device)
    if resume:  # everything but the RNGs, which are set last, after start-up has drawn from them
        resume.restore(model, optimizers, tokenizer.to_dict(), state.data)
        state.load_state_dict(resume.state, resume.folder)
    ddp = None
    if ctx.active:  # DDP averages the gradients over ranks
        ddp = DistributedDataParallel(model, [device] if device.type == "cuda" else None)
        ddp.broadcast_buffers = False  # the buffers (rotary tables, vocab mask) are constants: no sync per forward
    info = {
        "vocab_size": tokenizer.vocab_size,
        "params": model.num_params(),
        "device": str(device),
        "world_size": ctx.world_size,
        "train_tokens": len(train_ids),
    }
    name = take_run_folders(cfg, ctx, resume, stack)
    recorder = RunRecorder(cfg, name, info, state.step if resume else None, state.wandb_id, enabled=ctx.is_main)
    state.run, state.wandb_id = recorder.name, recorder.wandb_id
    save_dir = resume.folder.parent if resume else Path(cfg.save_model_dir) / name  # (a resumed run: beside it)
    steps_per_epoch = max(1, batches.batches_per_epoch // cfg.accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    peak, peak_source = peak_flops(device, dtype, cfg.peak_flops, ctx.world_size) if ctx.is_main else (None, "")
    trainer = Trainer(
        cfg,
        model,
        model,
        optimizers,
        batches,
        total_steps,
        autocast_for(dtype, device),
        ctx,
        ddp,
        tokenizer,
        val_ids,
        recorder,
        save_dir,
        peak,
        dataset.val_bytes,
    )
    precision = f"{str(dtype).removeprefix('torch.')}, compile {'on' if compile_it else 'off'}"
    print_banner(trainer, state, resume, precision, peak_source)

    x, y = (to_device(t, device) for t in trainer.val_fixed[0])
    trainer.loss = compile_loss(ddp or model, compile_it, x, y, trainer.autocast)
    for optimizer in optimizers:  # like the loss: compile now what the first step would compile, not in the loop
        if isinstance(optimizer, Muon):
            optimizer.warm_up()
    if resume:
        resume.restore_ema(trainer.ema)
        resume.restore_rng(ctx.rank)
    state.interval_start = time.perf_counter()
    return trainer, state


def take_run_folders(cfg: Config, ctx: Distributed, resume: Resume | None, stack: contextlib.ExitStack) -> str:
    """The run's name, with its folders (records, checkpoints) locked for this job until it ends: a resumed run keeps
    its own (and may not go back past newer checkpoints); a new one takes a name free in both."""
    name = None
    if ctx.is_main:  # rank 0 alone writes
        if resume:
            name = resume.state["run"]
            locks = lock_run([Path(cfg.runs_dir) / name, resume.folder.parent])
        else:
            parents = [Path(cfg.runs_dir), *([Path(cfg.save_model_dir)] if cfg.save_model else [])]
            name, locks = claim_run(run_name(cfg.run), parents)
        for lock in locks:
            stack.callback(lock.release)
        if resume:
            resume.drop_newer(cfg.overwrite_newer)
    return ctx.broadcast(name)


def print_banner(trainer: Trainer, state: LoopState, resume: Resume | None, dtype: str, peak_source: str) -> None:
    """The start-of-run summary, and the notices of a resumed run."""
    cfg, ctx, device, params = trainer.cfg, trainer.ctx, trainer.device, trainer.model.num_params()
    train_tokens, total, per_step = len(trainer.batches.tokens), trainer.total_steps, trainer.tokens_per_step
    optimizer = f"Muon lr {cfg.muon_lr} (hidden matrices) + AdamW lr {cfg.lr}" if cfg.use_muon else f"AdamW lr {cfg.lr}"
    parts = f"{cfg.num_blocks} blocks x {cfg.num_heads} heads x {cfg.embedding_dim} dim, context {cfg.context_len}"
    features = f"{cfg.pos_emb}, {cfg.activation}{', qk-norm' if cfg.qk_norm else ''}{', sink' if cfg.attn_sink else ''}"
    shape = f"{cfg.batch_size} x {cfg.context_len} x {cfg.accumulation_steps} accumulation"
    lines = {
        "run": f"{trainer.recorder.name}  (records in {trainer.recorder.dir})",
        "resume": f"{resume.folder} at step {state.step}" if resume else None,
        "device": f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device),
        "ranks": f"{ctx.world_size} processes ({ctx.backend}), batch {cfg.batch_size} each" if ctx.active else None,
        "dtype": dtype,
        "model": f"{parts}, {features}",
        "params": f"{human(params['total'])} total = {human(params['embedding'])} embedding + "
        f"{human(params['non_embedding'])} other (head included)",
        "data": f"{cfg.data_path}: {human(train_tokens)} train / {human(len(trainer.val_ids))} val tokens, "
        f"tokenizer {cfg.tokenizer} ({trainer.tokenizer.vocab_size} ids)",
        "steps": f"{total} x {per_step} tokens ({shape}{f' x {ctx.world_size} ranks' if ctx.active else ''}) = "
        f"{total * per_step / train_tokens:.2f} epochs",
        "optimizer": f"{optimizer}, {cfg.lr_schedule} schedule, warmup {cfg.warmup_steps}",
        "MFU peak": f"{trainer.peak / 1e12:.3g} TFLOP/s ({peak_source})" if trainer.peak else f"n/a ({peak_source})",
        "saving": f"{trainer.save_dir} (--keep_checkpoints {cfg.keep_checkpoints})" if cfg.save_model else "off",
    }
    banner(lines)
    if resume and resume.changes:
        changes = ", ".join(resume.changes)
        print(f"notice: resuming with {changes}; the run will differ from an uninterrupted one", flush=True)
    if state.step >= total:
        print(f"notice: the checkpoint is at step {state.step} of {total}; raise --max_steps to train on")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when done, 2 with one `error:` line for a user mistake, 128 + signal when stopped."""
    try:
        cfg = parse_args(argv)
        if cfg.resume:  # flags left out take the checkpoint's values rather than the defaults
            cfg = parse_args(argv, base=saved_config(cfg.resume))
        summary = train(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # a second stop signal (StopNow), or Ctrl-C before training started
        print("error: interrupted", file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)
    return 128 + signal.Signals[summary["stopped_by"]] if summary["stopped_by"] else 0


if __name__ == "__main__":
    sys.exit(main())
