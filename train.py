"""Train a GPT: `uv run train.py --preset cpu` (see README for every flag).

The loop wires the modules together: config -> data -> model -> optimizers -> steps, with evaluation, logs
(console, runs/<run>/metrics.jsonl, optional wandb), checkpoints and a few samples at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from checkpoint import save_checkpoint, unwrap
from config import Config, UserError, parse_args
from data import CACHE_DIR, TrainBatches, fixed_val_batches, full_val_batches, load_dataset, to_device
from model import GPT, generate
from optimizer import build_optimizers, lr_multiplier, set_lr
from utils import flops_per_token, format_duration, human, peak_flops, resolve_device, resolve_dtype, seed_everything


def cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss in fp32; targets of -1 are ignored (the final evaluation masks overlap with them)."""
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction=reduction)


class LossFunction:
    """cross_entropy, compiled when asked; if compilation fails on first use, one warning and eager from then on."""

    def __init__(self, model: torch.nn.Module, compile_it: bool):
        self.model = model
        self.fn = torch.compile(cross_entropy) if compile_it else cross_entropy
        self.compiled = compile_it

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, x, y)

    def warm_up(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Compile forward and backward now (outside the timed loop), falling back to eager on any failure."""
        if not self.compiled:
            return
        print("compiling the model (the first step takes a while) ...", flush=True)
        started = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                self(x, y).backward()
        except Exception as error:  # any compiler failure: training must go on
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            print(
                f"warning: torch.compile failed ({type(error).__name__}: {message[:160]}); training in eager mode",
                flush=True,
            )
            self.fn, self.compiled = cross_entropy, False
        finally:
            self.model.zero_grad(set_to_none=True)
        if self.compiled:
            print(f"compiled in {time.perf_counter() - started:.1f}s", flush=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast, device) -> float:
    """Mean loss per target token over the given batches. Eager on purpose: eval mode and the final partial
    batch would each cost a recompilation, and evaluation is a small share of the time."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = to_device(x, device), to_device(y, device)
        with autocast():
            total += cross_entropy(model, x, y, reduction="sum").item()
        count += int((y != -1).sum())
    model.train()
    return total / count


class RunRecorder:
    """runs/<run>/config.json and metrics.jsonl (one JSON object per logged step), plus wandb when enabled."""

    def __init__(self, cfg: Config, run_name: str, info: dict[str, Any]):
        self.dir = unique_dir(Path(cfg.runs_dir), run_name)
        self.name = self.dir.name
        self.dir.mkdir(parents=True)
        (self.dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "run": self.name, **info}, indent=2) + "\n")
        self.metrics = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the whole run)
        self.wandb = start_wandb(cfg, run_name, info) if cfg.wandb_enabled else None

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record["step"])
            except Exception as error:
                print(f"warning: wandb.log failed ({error}); continuing with the local record", flush=True)
                self.wandb = None

    def close(self) -> None:
        self.metrics.close()
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish()


def unique_dir(parent: Path, name: str) -> Path:
    path, n = parent / name, 2
    while path.exists():
        path, n = parent / f"{name}-{n}", n + 1
    return path


def start_wandb(cfg: Config, run_name: str, info: dict[str, Any]):
    """A wandb run, or None with one warning line: wandb trouble never stops training."""
    try:
        from dotenv import load_dotenv

        load_dotenv()
        if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            print(
                "warning: --wandb_enabled True but no WANDB_API_KEY (in .env or the environment); logging locally only",
                flush=True,
            )
            return None
        import wandb

        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "pair-transformer"),
            entity=os.environ.get("WANDB_ENTITY") or None,
            name=run_name,
            config={**cfg.to_dict(), **info},
        )
    except Exception as error:
        print(f"warning: wandb failed to start ({type(error).__name__}: {error}); logging locally only", flush=True)
        return None


def default_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def banner(cfg: Config, lines: dict[str, str]) -> None:
    width = max(len(k) for k in lines)
    print("=" * 78)
    for key, value in lines.items():
        print(f"{key:>{width}} : {value}")
    print("=" * 78, flush=True)


def train(cfg: Config) -> dict[str, Any]:
    """Run one training job end to end; returns a summary (losses, timings, where things went)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")
    compile_it = cfg.torch_compile
    if compile_it and device.type == "mps":
        print("notice: torch.compile is off on MPS (not yet reliable there)")
        compile_it = False

    if device.type == "cpu" and cfg.preset is None and cfg.embedding_dim * cfg.context_len >= 512 * 1024:
        print("notice: these are the GPU-sized defaults and will be slow on a CPU; try --preset cpu", flush=True)
    tokenizer, train_ids, val_ids = load_dataset(cfg)
    model = GPT(cfg, tokenizer.vocab_size).to(device)
    optimizers = build_optimizers(model, cfg)
    batches = TrainBatches(train_ids, cfg.batch_size, cfg.context_len, cfg.seed, device)
    steps_per_epoch = max(1, batches.batches_per_epoch // cfg.accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    tokens_per_step = cfg.batch_size * cfg.context_len * cfg.accumulation_steps
    val_fixed = fixed_val_batches(val_ids, cfg.batch_size, cfg.context_len, cfg.eval_steps)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    loss_fn = LossFunction(model, compile_it)

    params = model.num_params()
    step_flops = tokens_per_step * flops_per_token(
        params["non_embedding"], cfg.num_blocks, cfg.num_heads, cfg.head_dim, cfg.context_len
    )
    peak, peak_source = peak_flops(device, dtype, cfg.peak_flops, CACHE_DIR)
    run_name = cfg.run or default_run_name()
    recorder = RunRecorder(
        cfg,
        re.sub(r"[^\w.-]+", "-", run_name).strip("-") or default_run_name(),
        {"vocab_size": tokenizer.vocab_size, "params": params, "device": str(device), "train_tokens": len(train_ids)},
    )
    save_dir = Path(cfg.save_model_dir) / recorder.name
    banner(
        cfg,
        {
            "run": f"{recorder.name}  (records in {recorder.dir})",
            "device": f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device),
            "dtype": f"{str(dtype).removeprefix('torch.')}, compile {'on' if compile_it else 'off'}",
            "model": f"{cfg.num_blocks} blocks x {cfg.num_heads} heads x {cfg.embedding_dim} dim, context {cfg.context_len}, "
            f"{cfg.pos_emb}, {cfg.activation}{', qk-norm' if cfg.qk_norm else ''}{', sink' if cfg.attn_sink else ''}",
            "params": f"{human(params['total'])} total = {human(params['embedding'])} embedding + "
            f"{human(params['non_embedding'])} other (head included)",
            "data": f"{cfg.data_path}: {human(len(train_ids))} train / {human(len(val_ids))} val tokens, "
            f"tokenizer {cfg.tokenizer} ({tokenizer.vocab_size} ids)",
            "steps": f"{total_steps} x {tokens_per_step} tokens ({cfg.batch_size} x {cfg.context_len} x "
            f"{cfg.accumulation_steps} accumulation) = {total_steps * tokens_per_step / len(train_ids):.2f} epochs",
            "optimizer": (
                f"Muon lr {cfg.muon_lr} (hidden matrices) + AdamW lr {cfg.lr}" if cfg.use_muon else f"AdamW lr {cfg.lr}"
            )
            + f", {cfg.lr_schedule} schedule, warmup {cfg.warmup_steps}",
            "MFU peak": f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else f"n/a ({peak_source})",
            "saving": str(save_dir) if cfg.save_model else "off (--save_model True to keep the weights)",
        },
    )

    loss_fn.warm_up(*(to_device(t, device) for t in val_fixed[0]))
    parameters = [p for p in model.parameters() if p.requires_grad]
    train_seconds, eval_seconds, best_val, last_ckpt = 0.0, 0.0, math.inf, None
    interval_start, interval_steps = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    step = 0
    stopped_early = False
    for step in range(1, total_steps + 1):
        step_start = time.perf_counter()
        time_frac = train_seconds / cfg.time_budget_s if cfg.time_budget_s else 0.0
        lr_mult = lr_multiplier(step - 1, total_steps, cfg, time_frac)
        set_lr(optimizers, lr_mult)
        for _ in range(cfg.accumulation_steps):
            x, y = batches.next_batch()
            with autocast():
                loss = loss_fn(x, y) / cfg.accumulation_steps  # the mean over all micro-batches, like one big batch
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        interval_steps += 1

        is_log = step % cfg.log_every == 0 or step == total_steps
        is_eval = cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps
        if is_log or is_eval:
            loss_value = loss_sum.item() / interval_steps  # .item() waits for the device: time only after it
            if not math.isfinite(loss_value):
                raise UserError(
                    f"the loss became non-finite by step {step}; lower --lr / --muon_lr or raise --warmup_steps"
                )
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
                record["val_loss"] = round(evaluate(model, val_fixed, autocast, device), 5)
                best_val = min(best_val, record["val_loss"])
                eval_seconds += time.perf_counter() - eval_start
            recorder.log(record)
            print(format_line(record, total_steps), flush=True)
            loss_sum.zero_()
            interval_start, interval_steps = time.perf_counter(), 0
        else:
            train_seconds += time.perf_counter() - step_start
        if cfg.save_model and cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
            last_ckpt = save_checkpoint(save_dir, step, model, tokenizer.to_dict(), optimizers, {"run": recorder.name})
            print(f"saved {last_ckpt}", flush=True)
        if cfg.time_budget_s and train_seconds >= cfg.time_budget_s:
            stopped_early = step < total_steps
            print(f"time budget of {cfg.time_budget_s:g}s reached at step {step}", flush=True)
            break

    print(f"final evaluation on the whole validation split ({len(val_ids)} tokens) ...", flush=True)
    eval_start = time.perf_counter()
    final_val = evaluate(model, full_val_batches(val_ids, cfg.batch_size, cfg.context_len), autocast, device)
    eval_seconds += time.perf_counter() - eval_start
    best_val = min(best_val, final_val)
    recorder.log({"step": step, "val_loss": round(final_val, 5), "final": True, "elapsed_s": round(train_seconds, 3)})
    if cfg.save_model:
        last_ckpt = save_checkpoint(save_dir, step, model, tokenizer.to_dict(), optimizers, {"run": recorder.name})

    samples = []
    if cfg.num_samples:
        print(f"--- {cfg.num_samples} samples ---")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        for i in range(cfg.num_samples):
            ids = list(
                generate(unwrap(model), [tokenizer.start_id], cfg.sample_tokens, 0.8, 200, None, True, generator)
            )
            samples.append(tokenizer.decode(ids))
            print(f"[sample {i + 1}]\n{samples[-1].strip()}\n", flush=True)
    recorder.close()

    summary = {
        "run": recorder.name,
        "steps": step,
        "final_val_loss": final_val,
        "best_val_loss": best_val,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "tok_per_s": step * tokens_per_step / max(train_seconds, 1e-9),
        "stopped_early": stopped_early,
        "run_dir": str(recorder.dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "samples": samples,
    }
    print("=" * 78)
    print(
        f"done: {step} steps in {format_duration(train_seconds)} of training (+{eval_seconds:.1f}s eval), "
        f"{human(summary['tok_per_s'])} tok/s"
    )
    print(f"final val loss {final_val:.4f} (whole split), best {best_val:.4f}")
    print(f"records: {recorder.dir}" + (f" | checkpoint: {last_ckpt}" if last_ckpt else ""))
    return summary


def format_line(record: dict[str, Any], total_steps: int) -> str:
    width = len(str(total_steps))
    line = (
        f"step {record['step']:>{width}}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad {record['grad_norm']:6.3f} | {record['step_ms']:7.1f} ms/step | {human(record['tok_per_s']):>6} tok/s | "
        + (f"MFU {100 * record['mfu']:4.1f}%" if record["mfu"] is not None else "MFU  n/a")
    )
    if "val_loss" in record:
        line += f" | val {record['val_loss']:.4f}"
    return line


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
