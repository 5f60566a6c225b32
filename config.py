"""Every flag of Pair Transformer: its default, its help line, its validation, its resume rule, and the CLI parser.

One `Config` dataclass is the single source of truth. `parse_args(argv)` turns a command line into a
validated `Config` or raises `UserError` with one line that says what to do (train.py prints it and
exits with status 2). This module imports nothing from the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, get_type_hints


class UserError(ValueError):
    """A user mistake on the command line or in a config: reported as one line, exit status 2."""


# What --resume does with a flag that differs from the checkpoint's config:
MATCH = "match"  # refuse: the weights' shape, the tokens, the optimizer layout or the data order depend on it
NOTICE = "notice"  # allow, with a notice that the run no longer equals an uninterrupted one (training dynamics)
FREE = "free"  # allow silently: run length, logging, evaluation, saving, device, dtype, compile


def _flag(default: Any, help: str, choices: tuple[str, ...] | None = None, on_resume: str = FREE) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "on_resume": on_resume})


@dataclass
class Config:
    # model
    num_blocks: int = _flag(6, "number of transformer blocks", on_resume=MATCH)
    num_heads: int = _flag(8, "attention heads per block (must divide embedding_dim)", on_resume=MATCH)
    embedding_dim: int = _flag(512, "width of the residual stream", on_resume=MATCH)
    context_len: int = _flag(1024, "tokens of context the model sees", on_resume=MATCH)
    pos_emb: str = _flag("rope", "position encoding: rotary or a learned table", ("rope", "learned"), on_resume=MATCH)
    activation: str = _flag("relu2", "MLP nonlinearity: squared ReLU or GELU", ("relu2", "gelu"), on_resume=MATCH)
    qk_norm: bool = _flag(True, "RMS-normalise queries and keys before attention", on_resume=MATCH)
    attn_sink: bool = _flag(True, "learned per-head attention-sink logit in every softmax denominator", on_resume=MATCH)
    logit_softcap: float = _flag(0.0, "cap logits smoothly at +-this value (0 = off)", on_resume=MATCH)
    dropout: float = _flag(0.0, "dropout on embeddings and residual branches", on_resume=NOTICE)
    # training
    lr: float = _flag(
        3e-4, "AdamW learning rate (embeddings, head, norms, sinks; everything with --use_muon False)", on_resume=NOTICE
    )
    muon_lr: float = _flag(0.02, "Muon learning rate for the hidden matrices", on_resume=NOTICE)
    muon_ns_steps: int = _flag(
        5, "Newton-Schulz iterations per Muon update (fewer are cheaper, rougher)", on_resume=NOTICE
    )
    use_muon: bool = _flag(
        True, "Muon for 2-D hidden matrices, AdamW for the rest; False = AdamW for all", on_resume=MATCH
    )
    weight_decay: float = _flag(0.0, "decoupled weight decay on the matrices (AdamW and Muon)", on_resume=NOTICE)
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0 = off)", on_resume=NOTICE)
    batch_size: int = _flag(8, "sequences per micro-batch", on_resume=NOTICE)
    accumulation_steps: int = _flag(4, "micro-batches accumulated into one optimizer step", on_resume=NOTICE)
    epochs: int = _flag(1, "passes over the training tokens (used when --max_steps is None)")
    max_steps: int | None = _flag(1000, "optimizer steps to run; overrides --epochs (None = use --epochs)")
    warmup_steps: int = _flag(100, "linear learning-rate warmup steps", on_resume=NOTICE)
    lr_schedule: str = _flag(
        "cosine",
        "decay after warmup: cosine, linear, wsd (flat then linear), constant",
        ("cosine", "linear", "wsd", "constant"),
        on_resume=NOTICE,
    )
    min_lr_frac: float = _flag(0.1, "the decay ends at this fraction of the peak learning rate", on_resume=NOTICE)
    cooldown_frac: float = _flag(0.4, "wsd only: fraction of the run spent decaying", on_resume=NOTICE)
    time_budget_s: float | None = _flag(None, "stop after this many seconds of training, then run the final evaluation")
    seed: int = _flag(1337, "random seed (python, numpy, torch)", on_resume=MATCH)
    # data
    data_path: str = _flag(
        "data/tiny_shakespeare.txt", "UTF-8 text to train on (Tiny Shakespeare is downloaded if missing)"
    )
    tokenizer: str = _flag(
        "gpt2",
        "gpt2, o200k_base (tiktoken) or char (characters of the text)",
        ("gpt2", "o200k_base", "char"),
        on_resume=MATCH,
    )
    val_frac: float = _flag(
        0.1, "fraction of the tokens held out for validation (the end of the text)", on_resume=MATCH
    )
    # evaluation and logging
    eval_every: int = _flag(100, "evaluate on the fixed validation batches every N steps (0 = only at the end)")
    eval_steps: int = _flag(20, "validation batches per periodic evaluation (the final one covers the whole split)")
    log_every: int = _flag(10, "print and record a line every N steps")
    run: str | None = _flag(None, "run name (default: a timestamp); names runs/<run>/ and the checkpoint folder")
    runs_dir: str = _flag("runs", "where runs/<run>/config.json and metrics.jsonl are written")
    wandb_enabled: bool = _flag(False, "log to Weights & Biases (WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY from .env)")
    num_samples: int = _flag(2, "samples generated at the end of training (0 = none)")
    sample_tokens: int = _flag(200, "tokens per end-of-training sample")
    run_cases: bool = _flag(False, "run the 20 inference cases (inference_cases.json) at the end of training")
    # checkpoints
    save_model: bool = _flag(False, "save checkpoints into <save_model_dir>/<run>/")
    save_model_dir: str = _flag("models", "folder for checkpoints")
    save_every: int | None = _flag(None, "also save every N steps (None = only at the end)")
    keep_checkpoints: int | None = _flag(3, "keep only the newest N step_* checkpoints of a run (None = keep all)")
    resume: str | None = _flag(
        None, "continue a run from a checkpoint: a step_* folder, or a run folder (takes its latest)"
    )
    skip_nonfinite: bool = _flag(False, "skip an optimizer step whose loss or gradient is NaN/inf instead of stopping")
    # system
    device: str = _flag("auto", "auto picks cuda, then mps, then cpu", ("auto", "cpu", "cuda", "mps"))
    dtype: str = _flag(
        "auto",
        "autocast dtype: auto = bfloat16 on CUDA and on compiled CPUs with native bf16, else float32",
        ("auto", "float32", "bfloat16", "float16"),
    )
    torch_compile: bool = _flag(True, "compile the model with torch.compile (falls back to eager if it fails)")
    peak_flops: float | None = _flag(None, "peak FLOP/s of one device for MFU (default: GPU table or a CPU probe)")
    preset: str | None = _flag(None, "a named set of defaults that explicit flags still override")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in (
            "num_blocks",
            "num_heads",
            "embedding_dim",
            "context_len",
            "batch_size",
            "accumulation_steps",
            "epochs",
            "muon_ns_steps",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "muon_lr"):
            value = getattr(self, name)
            if not 0 < value <= 1e30:  # (a larger one overflows the optimizers' float32 arithmetic)
                raise UserError(f"--{name} must be a positive number no larger than 1e30, got {value}")
        if self.embedding_dim % self.num_heads:
            raise UserError(
                f"--num_heads {self.num_heads} does not divide --embedding_dim {self.embedding_dim}; "
                f"pick a head count that divides it (e.g. {_divisor_near(self.embedding_dim, self.num_heads)})"
            )
        if self.pos_emb == "rope" and (self.embedding_dim // self.num_heads) % 2:
            raise UserError(
                "rotary positions need an even head size (embedding_dim / num_heads); use --pos_emb learned"
            )
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max_steps must be a positive integer or None, got {self.max_steps}")
        for name in ("warmup_steps", "eval_every", "num_samples", "sample_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be zero or more, got {getattr(self, name)}")
        for name in ("eval_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer or None, got {getattr(self, name)}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise UserError(f"--peak_flops must be a positive number of FLOP/s (e.g. 989e12), got {self.peak_flops}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UserError(f"--time_budget_s must be a positive number of seconds, got {self.time_budget_s}")
        for name, low, high in (
            ("val_frac", 0.0, 0.5),
            ("min_lr_frac", 0.0, 1.0),
            ("cooldown_frac", 0.0, 1.0),
            ("dropout", 0.0, 0.99),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise UserError(f"--{name} must be between {low} and {high}, got {value}")
        if self.val_frac == 0:
            raise UserError("--val_frac must be above 0: validation needs some held-out tokens")
        for name in ("weight_decay", "grad_clip", "logit_softcap"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be zero or more, got {getattr(self, name)}")
        for name, value in dataclasses.asdict(self).items():
            choices = FIELDS[name].metadata["choices"]
            if choices and value not in choices:
                raise UserError(f"--{name} {value!r} is not one of: {', '.join(choices)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"unknown --preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild from a saved config, ignoring keys this version no longer knows."""
        return cls(**{k: v for k, v in values.items() if k in FIELDS})


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# nanoGPT's Shakespeare-char CPU recipe shape (its README): 4x4x128, context 64, batch 12, 2000 steps, no dropout.
_NANOGPT_CPU: dict[str, Any] = dict(
    tokenizer="char",
    num_blocks=4,
    num_heads=4,
    embedding_dim=128,
    context_len=64,
    batch_size=12,
    accumulation_steps=1,
    max_steps=2000,
    warmup_steps=50,
    lr=2e-3,
    muon_lr=0.03,
    eval_every=250,
    eval_steps=20,
    log_every=50,
    dropout=0.0,
)

# Named sets of defaults. Explicit flags override them; the dataclass defaults above are the GPU defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The first run (README): the nanoGPT shape with twice the context, writing Shakespeare-like text in ~3 CPU minutes.
    "cpu": {**_NANOGPT_CPU, "context_len": 128, "max_steps": 1500, "log_every": 100, "sample_tokens": 300},
    "nanogpt-cpu": _NANOGPT_CPU,
    # nanoGPT's Tiny Shakespeare GPU shape (6 x 6 x 384, context 256, batch 64): val 1.468 in 600 steps on an H200.
    "shakespeare-char": {
        "tokenizer": "char",
        "num_blocks": 6,
        "num_heads": 6,
        "embedding_dim": 384,
        "context_len": 256,
        "batch_size": 64,
        "accumulation_steps": 1,
        "max_steps": 600,
        "warmup_steps": 100,
        "lr": 2e-3,
        "muon_lr": 0.03,
        "dropout": 0.2,
        "weight_decay": 0.1,
        "eval_every": 100,
        "eval_steps": 20,
        "log_every": 100,
    },
    # The CPU speedrun: best val loss in 90 s of training. The schedule runs on the clock (max_steps only caps it);
    # each choice measured against the nanogpt-cpu base in docs/results.md's speedrun table.
    "speedrun-cpu": {
        **_NANOGPT_CPU,
        "context_len": 128,
        "max_steps": 100_000,
        "time_budget_s": 90.0,
        "lr_schedule": "linear",
        "min_lr_frac": 0.0,
        "log_every": 100,
    },
}


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/true/false/1/0, got {text!r}")


def flag_type(kind: Any, optional: bool = False):
    """An argparse `type` for bool, int, float or str flags (True/False/1/0 for bools; "None" when optional) whose
    errors say what was expected."""
    base = {bool: parse_bool, int: int, float: float, str: str}[kind]

    def parse(text: str):
        if optional and text.strip().lower() == "none":
            return None
        try:
            return base(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from error

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit status 2) instead of printing its usage block."""

    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="train.py",
        description="Train a GPT on Tiny Shakespeare (or any text). Flags take --flag value or --flag=value.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line reach the namespace
    )
    hints = get_type_hints(Config)
    for name, f in FIELDS.items():
        hint = hints[name]
        optional = type(None) in getattr(hint, "__args__", ())
        kind = next(a for a in hint.__args__ if a is not type(None)) if optional else hint
        choices = f.metadata["choices"] or (tuple(PRESETS) if name == "preset" else None)
        default = "None" if f.default is None else f.default
        parser.add_argument(
            f"--{name}",
            type=flag_type(kind, optional),
            choices=choices,
            metavar=kind.__name__.upper() if choices is None else "{" + ",".join(choices) + "}",
            help=f"{f.metadata['help']} (default: {default})",
        )
    return parser


def parse_args(argv: list[str] | None = None, base: dict[str, Any] | None = None) -> Config:
    """Command line -> validated Config. Precedence: explicit flags > --preset > base > dataclass defaults.

    `base` is a saved config (a checkpoint's, when resuming), so flags left out keep the checkpoint's values.
    """
    parser = build_parser()
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except UserError as error:
        raise UserError(_friendlier(str(error))) from None
    if unknown:
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag.lstrip("-"), list(FIELDS), n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the list"
        raise UserError(f"unknown flag {flag!r}{hint}")
    explicit = vars(namespace)
    values = {k: v for k, v in (base or {}).items() if k in FIELDS}
    values.update(PRESETS.get(explicit.get("preset"), {}))
    values.update(explicit)
    return Config(**values)


def _friendlier(message: str) -> str:
    # argparse says "argument --save_model: invalid bool value: 'yes'"; our type functions already explain themselves
    return message.replace("argument ", "", 1)
