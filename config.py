"""Every flag of Pair Transformer: its default, its help line, its validation, its resume rule, and the CLI parser.

One `Config` dataclass is the single source of truth. `parse_args(argv)` turns a command line into a
validated `Config` or raises `UserError` with one line that says what to do (train.py prints it and
exits with status 2). This module imports nothing from the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
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
    activation: str = _flag(
        "relu2",
        "MLP nonlinearity: squared ReLU, GELU, or GELU's tanh approximation (GPT-2's)",
        ("relu2", "gelu", "gelu_tanh"),
        on_resume=MATCH,
    )
    qk_norm: bool = _flag(True, "RMS-normalise queries and keys before attention", on_resume=MATCH)
    attn_sink: bool = _flag(True, "learned per-head attention-sink logit in every softmax denominator", on_resume=MATCH)
    logit_softcap: float = _flag(0.0, "cap logits smoothly at +-this value (0 = off)", on_resume=MATCH)
    norm: str = _flag(
        "rmsnorm",
        "normalisation before each block and the head: RMSNorm, or LayerNorm with a bias (GPT-2's)",
        ("rmsnorm", "layernorm"),
        on_resume=MATCH,
    )
    bias: bool = _flag(False, "biases in the attention and MLP linear layers (GPT-2 has them)", on_resume=MATCH)
    tie_embeddings: bool = _flag(False, "the head reuses the token embedding table (GPT-2 ties them)", on_resume=MATCH)
    smear: bool = _flag(
        False,
        "mix a learned, gated share of the previous token's embedding into each token's (modded-nanogpt)",
        on_resume=MATCH,
    )
    bigram_embedding: bool = _flag(
        False,
        "add a learned embedding of each (previous token, token) pair; small vocabularies only (char)",
        on_resume=MATCH,
    )
    value_embeddings: bool = _flag(
        False,
        "add a learned per-layer embedding of each token to the attention values (modded-nanogpt's value embeddings)",
        on_resume=MATCH,
    )
    mtp_weight: float = _flag(
        0.0,
        "multi-token prediction: a second head learns the token after next, its loss added with this weight to the "
        "training loss (0 = off); evaluation, sampling and export use the next-token head alone",
        on_resume=MATCH,
    )
    init_from: str | None = _flag(
        None,
        "start from pretrained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hugging Face download or cache) or a "
        "local GPT-2 folder in Hugging Face format; sets the architecture flags to GPT-2's (ignored by --resume)",
    )
    dropout: float = _flag(0.0, "dropout on embeddings and residual branches", on_resume=NOTICE)
    # training
    lr: float = _flag(
        3e-4, "AdamW learning rate (embeddings, head, norms, sinks; everything with --use_muon False)", on_resume=NOTICE
    )
    muon_lr: float = _flag(0.02, "Muon learning rate for the hidden matrices", on_resume=NOTICE)
    embedding_lr: float = _flag(
        0.0,
        "AdamW learning rate of the input tables (token, position, bigram and value embeddings), without weight "
        "decay; 0 = they take --lr like the rest",
        on_resume=MATCH,
    )
    muon_momentum: float = _flag(0.95, "Muon's Nesterov momentum", on_resume=NOTICE)
    muon_ns_steps: int = _flag(
        5, "Newton-Schulz iterations per Muon update (fewer are cheaper, rougher)", on_resume=NOTICE
    )
    muon_ns_coeffs: str = _flag(
        "quintic",
        "Newton-Schulz polynomials: quintic (one for every step) or polar_express (one per step, Amsel et al. 2025)",
        ("quintic", "polar_express"),
        on_resume=NOTICE,
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
    ema_decay: float = _flag(
        0.0,
        "exponential moving average of the weights with this decay, e.g. 0.999 (0 = off): evaluated beside the "
        "raw weights, saved as ema.safetensors, sampled from",
        on_resume=NOTICE,  # the raw weights train alike, but another decay gives another average than the saved run's
    )
    time_budget_s: float | None = _flag(None, "stop after this many seconds of training, then run the final evaluation")
    seed: int = _flag(1337, "random seed (python, numpy, torch)", on_resume=MATCH)
    # data
    data_path: str = _flag(
        "data/tiny_shakespeare.txt",
        "UTF-8 text to train on (Tiny Shakespeare is downloaded if missing), a folder made by prepare.py, or llm.c "
        "`.bin` train shards (a glob)",
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
    val_tokens: int | None = _flag(
        None,
        "the final evaluation's budget: at most this many val targets, the first windows of the split "
        "(None = the whole split; modded-nanogpt uses 10485760)",
    )
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
    overwrite_newer: bool = _flag(
        False,
        "with --resume from an older step: delete that run's newer step_* checkpoints instead of refusing",
        on_resume=FREE,
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
        """Every flag's range, then the rules between flags; the first problem is one UserError line."""
        for name, (kind, optional) in KINDS.items():  # every flag by its type: numbers in range, text
            value = getattr(self, name)
            if value is None and optional:
                continue
            if kind is float:
                _check_float(name, value)
            elif kind is int:
                _check_int(name, value, optional)
            elif kind is str and name != "run" and isinstance(value, str) and "\x00" in value:  # (--run: below)
                raise UserError(f"--{name} {value!r} holds a NUL character, which no file name or text can hold")
        for name, value in dataclasses.asdict(self).items():
            choices = FIELDS[name].metadata["choices"]
            if choices and value not in choices:
                raise UserError(f"--{name} {value!r} is not one of: {', '.join(choices)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"unknown --preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.run is not None and (problem := run_name_problem(self.run)):
            raise UserError(
                f"--run {self.run!r} is not a usable folder name ({problem}); use e.g. --run {usable_run_name(self.run)}"
            )
        _check_sizes(self)  # before anything below loops over embedding_dim
        if self.embedding_dim % self.num_heads:
            raise UserError(
                f"--num_heads {self.num_heads} does not divide --embedding_dim {self.embedding_dim}; "
                f"pick a head count that divides it (e.g. {_divisor_near(self.embedding_dim, self.num_heads)})"
            )
        if self.pos_emb == "rope" and (self.embedding_dim // self.num_heads) % 2:
            raise UserError(
                "rotary positions need an even head size (embedding_dim / num_heads); use --pos_emb learned"
            )
        for name in ("smear", "value_embeddings"):  # (--bigram_embedding: refused below for GPT-2's vocabulary)
            if getattr(self, name) and self.init_from is not None:
                raise UserError(
                    f"--{name} adds weights GPT-2 has not got, and --init_from loads GPT-2's; leave out --{name}"
                )
        if self.bigram_embedding and self.tokenizer in VOCAB_ESTIMATE and self.tokenizer != "char":
            check_bigram_rows(VOCAB_ESTIMATE[self.tokenizer], self.tokenizer)  # (char's count: once the text is read)
        if self.val_frac == 0:
            raise UserError("--val_frac must be above 0: validation needs some held-out tokens")
        if self.val_tokens is not None and self.val_tokens < self.context_len:
            raise UserError(
                f"--val_tokens {self.val_tokens} is fewer than --context_len {self.context_len}: the final evaluation "
                f"needs one whole window; use --val_tokens {self.context_len} or more (None = the whole split)"
            )

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild from a saved config, ignoring keys this version no longer knows."""
        return cls(**_saved_values(values))


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _kind(hint: Any) -> tuple[Any, bool]:
    """(bool, int, float or str, whether None is allowed) of a field's type hint."""
    optional = type(None) in getattr(hint, "__args__", ())
    return (next(a for a in hint.__args__ if a is not type(None)) if optional else hint), optional


KINDS = {name: _kind(hint) for name, hint in get_type_hints(Config).items() if name in FIELDS}

# ----------------------------------------------------------------------------------------------------------------
# The range of every number flag, checked by class (Config.validate walks every float and every int field).
#
# Floats: every range has finite bounds and the test is `low <= value <= high`, so NaN (every comparison with NaN
# is False) and +-infinity are refused with the same line as any other value out of range. No float flag takes
# infinity: where "unlimited" or "off" makes sense it already has a spelling, and the message names it
# (--grad_clip 0, --logit_softcap 0, --time_budget_s None, --peak_flops None). Nothing is above 1e30: a larger
# number is infinite in the float32 arithmetic of the device (max ~3.4e38). A float flag missing from FLOAT_RANGES
# still gets FINITE.
#
# Ints: at least 1 ("a positive integer") or 0 ("zero or more"), and at most INT_CEILING unless a tighter bound
# with its reason is given: no count in any run comes near a trillion, so a larger one is a typo. The sizes
# (num_blocks, embedding_dim, context_len, batch_size, eval_steps) are bounded together by _check_sizes below.


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    must_be: str  # "--flag must be <must_be>, got <value>"
    above_low: bool = False  # low itself is refused too

    def holds(self, value: float) -> bool:
        return (value > self.low if self.above_low else value >= self.low) and value <= self.high


FINITE = FloatRange(-1e30, 1e30, "a finite number between -1e30 and 1e30")
_POSITIVE = "a positive number no larger than 1e30"  # (a larger lr overflows the optimizers' float32 arithmetic)
FLOAT_RANGES: dict[str, FloatRange] = {
    "logit_softcap": FloatRange(0.0, 1e30, "0 (no cap) or a positive number no larger than 1e30"),
    "dropout": FloatRange(0.0, 0.99, "between 0.0 and 0.99"),
    "mtp_weight": FloatRange(0.0, 100.0, "0 (off) or a positive weight no larger than 100"),
    "lr": FloatRange(0.0, 1e30, _POSITIVE, above_low=True),
    "muon_lr": FloatRange(0.0, 1e30, _POSITIVE, above_low=True),
    "muon_momentum": FloatRange(0.0, 0.999, "between 0.0 and 0.999"),
    "embedding_lr": FloatRange(0.0, 1e30, "0 (off) or a positive number no larger than 1e30"),
    "weight_decay": FloatRange(0.0, 1e30, "0 (none) or a positive number no larger than 1e30"),
    "grad_clip": FloatRange(0.0, 1e30, "0 (no clipping) or a positive number no larger than 1e30"),
    "min_lr_frac": FloatRange(0.0, 1.0, "between 0.0 and 1.0"),
    "cooldown_frac": FloatRange(0.0, 1.0, "between 0.0 and 1.0"),
    "ema_decay": FloatRange(0.0, 1 - 2**-53, "0 (off) or a decay below 1, e.g. 0.999"),  # (the largest float < 1)
    "time_budget_s": FloatRange(
        0.0, 1e9, "a positive number of seconds no larger than 1e9 (None = no time budget)", above_low=True
    ),
    "val_frac": FloatRange(0.0, 0.5, "between 0.0 and 0.5"),
    "peak_flops": FloatRange(
        0.0,
        1e30,
        "a positive number of FLOP/s (e.g. 989e12) no larger than 1e30 (None = the GPU table or a CPU probe)",
        above_low=True,
    ),
}

INT_CEILING = 10**12
# (lowest value, highest value, why the highest) where they differ from (0, INT_CEILING, "a larger count is a typo")
INT_RANGES: dict[str, tuple[int, int, str]] = {
    **{
        name: (1, INT_CEILING, "a larger count is a typo")
        for name in (
            "num_blocks",
            "num_heads",
            "embedding_dim",
            "context_len",
            "batch_size",
            "accumulation_steps",
            "epochs",
            "max_steps",
            "eval_steps",
            "val_tokens",
            "log_every",
            "save_every",
            "keep_checkpoints",
        )
    },
    "muon_ns_steps": (1, 100, "Newton-Schulz converges in about 5"),
    "seed": (0, 2**32 - 1, "numpy takes seeds below 2**32"),
    "num_samples": (0, 1000, "samples are printed at the end of training"),
    "sample_tokens": (0, 1_000_000, "samples are printed at the end of training"),
}


def is_kind(value: Any, kind: type) -> bool:
    """isinstance for values read from flags or JSON: a bool is not an int, and an int is a float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _check_float(name: str, value: Any) -> None:
    if not is_kind(value, float):
        raise UserError(f"--{name} must be a number, got {value!r}")
    allowed = FLOAT_RANGES.get(name, FINITE)
    if not allowed.holds(value):
        raise UserError(f"--{name} must be {allowed.must_be}, got {value}")


def _check_int(name: str, value: Any, optional: bool) -> None:
    if not is_kind(value, int):
        raise UserError(f"--{name} must be an integer{' or None' if optional else ''}, got {value!r}")
    low, high, why = INT_RANGES.get(name, (0, INT_CEILING, "a larger count is a typo"))
    if value < low:
        must_be = "a positive integer" if low == 1 else "zero or more" if low == 0 else f"at least {low}"
        raise UserError(f"--{name} must be {must_be}{' or None' if optional else ''}, got {value}")
    if value > high:
        raise UserError(f"--{name} must be at most {_count(high)} ({why}), got {value}")


def _count(n: int) -> str:
    """1000000000000 -> "1e12" (a power of ten that long is easier to read that way); else the digits."""
    return f"1e{len(str(n)) - 1}" if n >= 10**6 and str(n).rstrip("0") == "1" else str(n)


# ----------------------------------------------------------------------------------------------------------------
# Sizes that fit no machine ("clearly a typo") are refused before anything is allocated. The estimate, in bytes:
#   parameters P = 12·L·d² (attention 4·d², MLP 8·d² per block) + (2·V + T if learned positions)·d (embeddings, head)
#   16·P                  fp32 weights, gradients and two AdamW moments
#   + 128·B·T·d·L         activations of one micro-batch kept for backward (~32 fp32 values per token, width, block)
#   + 12·B·T·V            its logits in fp32: the logits, their softmax and their gradient
# with L blocks, width d, context T, micro-batch B and V the tokenizer's padded vocabulary (VOCAB_ESTIMATE; char
# is a typical alphabet, the real one is known only once the text is read). Fused attention keeps no T·T scores.
# Anything over MEMORY_CEILING is refused; GPT-2 XL (48 blocks, 1600 dim, context 1024, batch 16) needs ~0.2 TB.
# The fixed batches of the periodic evaluation (eval_steps·batch_size·context_len tokens, inputs and targets in
# int64: 16 bytes a token) are all kept in memory: more than EVAL_TOKENS_CEILING of them (16 GB) is refused too.
# Both ceilings are fixed numbers, not this machine's memory: a run may still not fit a smaller machine.
MEMORY_CEILING = 10**12  # 1 TB
EVAL_TOKENS_CEILING = 10**9
VOCAB_ESTIMATE = {"gpt2": 50_304, "o200k_base": 200_064, "char": 256}
SIZE_FLAGS = ("num_blocks", "embedding_dim", "context_len", "batch_size")

# --bigram_embedding: one row per (previous id, id), plus a row per id for "no previous id" (a sequence's first
# position): (vocab + 1) x vocab rows, cheap for characters (65 make 4,290) and absurd for gpt2 (2.5e9). Refused over
# BIGRAM_ROWS_MAX: by Config for the tiktoken vocabularies, by model.GPT for char (its size is known once read).
BIGRAM_ROWS_MAX = 2**20


def bigram_rows(vocab_size: int) -> int:
    return (vocab_size + 1) * vocab_size


def check_bigram_rows(vocab_size: int, tokenizer: str) -> None:
    if (rows := bigram_rows(vocab_size)) > BIGRAM_ROWS_MAX:
        raise UserError(
            f"--bigram_embedding needs a small vocabulary: {tokenizer}'s {vocab_size:,} ids make {rows:,} rows, over "
            f"the limit of {BIGRAM_ROWS_MAX:,}; use --tokenizer char or --bigram_embedding False"
        )


def estimated_bytes(
    num_blocks: int, embedding_dim: int, context_len: int, batch_size: int, tokenizer: str = "gpt2", pos_emb="rope"
) -> int:
    """The documented estimate above of the memory a training run needs, in bytes."""
    blocks, d, t, b, v = num_blocks, embedding_dim, context_len, batch_size, VOCAB_ESTIMATE.get(tokenizer, 0)
    return 16 * estimated_params(blocks, d, t, tokenizer, pos_emb) + 128 * b * t * d * blocks + 12 * b * t * v


def estimated_params(
    num_blocks: int, embedding_dim: int, context_len: int, tokenizer: str = "gpt2", pos_emb="rope"
) -> int:
    positions = context_len if pos_emb == "learned" else 0
    return 12 * num_blocks * embedding_dim**2 + (2 * VOCAB_ESTIMATE.get(tokenizer, 0) + positions) * embedding_dim


def _check_sizes(cfg: Config) -> None:
    sizes = {name: getattr(cfg, name) for name in SIZE_FLAGS}

    def fits(**change: int) -> bool:
        return estimated_bytes(**{**sizes, **change}, tokenizer=cfg.tokenizer, pos_emb=cfg.pos_emb) <= MEMORY_CEILING

    if not fits():
        need = estimated_bytes(**sizes, tokenizer=cfg.tokenizer, pos_emb=cfg.pos_emb)
        params = estimated_params(cfg.num_blocks, cfg.embedding_dim, cfg.context_len, cfg.tokenizer, cfg.pos_emb)
        asked = " ".join(f"--{name} {value}" for name, value in sizes.items())
        # the flag to lower: the one furthest above the largest value that fits with the others as given
        largest = {name: _largest(name, sizes[name], fits, cfg) for name in SIZE_FLAGS}
        candidates = [name for name in SIZE_FLAGS if largest[name]]
        if candidates:
            flag = max(candidates, key=lambda name: sizes[name] / largest[name])
            fix = f"with the rest as given, --{flag} {largest[flag]} would fit"
        else:
            fix = f"lower several of {', '.join(f'--{name}' for name in SIZE_FLAGS)}"
        raise UserError(
            f"{asked} need an estimated {_bytes(need)} ({params:.3g} parameters at 16 bytes, plus one "
            f"micro-batch's activations and logits), over the {_bytes(MEMORY_CEILING)} limit "
            f"(sizes that fit no machine are refused as typos; see --help); {fix}"
        )
    tokens = cfg.eval_steps * cfg.batch_size * cfg.context_len
    if tokens > EVAL_TOKENS_CEILING:
        most = EVAL_TOKENS_CEILING // (cfg.batch_size * cfg.context_len)
        fix = f"use --eval_steps {most} or fewer" if most else "use a smaller --batch_size or --context_len"
        raise UserError(
            f"--eval_steps {cfg.eval_steps} x --batch_size {cfg.batch_size} x --context_len {cfg.context_len} = "
            f"{tokens:.3g} validation tokens per periodic evaluation, all kept in memory ({_bytes(16 * tokens)}), "
            f"over the limit of {_count(EVAL_TOKENS_CEILING)} ({_bytes(16 * EVAL_TOKENS_CEILING)}); {fix}"
        )


def _largest(name: str, asked: int, fits: Any, cfg: Config) -> int:
    """The largest value of one size flag up to `asked` that fits with the others as given (0: none does); a width
    is rounded down to what the heads can split (an even head size for rotary positions)."""
    low, high = 0, asked
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(**{name: middle}) else (low, middle - 1)
    if name == "embedding_dim":
        step = cfg.num_heads * (2 if cfg.pos_emb == "rope" else 1)
        low -= low % step
    return low


def _bytes(n: float) -> str:
    unit = next((u for u, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)) if n >= size), None)
    return f"{n / dict(PB=1e15, TB=1e12, GB=1e9, MB=1e6)[unit]:.3g} {unit}" if unit else f"{n:.0f} bytes"


# ----------------------------------------------------------------------------------------------------------------
# Run names: --run names one folder under runs_dir and one under save_model_dir. records.run_name turns every run
# of characters other than letters, digits, "_", "." and "-" into "-" (spaces become "-"); what it cannot make
# safe is refused here.
RUN_NAME_MAX = 100


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run's folder name, or None when it can."""
    if "\x00" in name:
        return "it holds a NUL character"
    if "/" in name or "\\" in name:
        return "it holds a path separator; a run is one folder"
    if len(name) > RUN_NAME_MAX:
        return f"it is {len(name)} characters long, more than {RUN_NAME_MAX}"
    if not name.strip():
        return "it is empty"
    if name.strip() in (".", ".."):
        return "it names the folder itself or its parent"
    if not re.search(r"\w", name):  # e.g. "...", "-..-": nothing would be left once made safe
        return "it has no letter, digit or underscore"
    return None


def folder_name(name: str) -> str:
    """`name` with every run of characters other than letters, digits, _, . and - made one -, trimmed of -."""
    return re.sub(r"[^\w.-]+", "-", name).strip("-")


def usable_run_name(name: str) -> str:
    """A name close to `name` that run_name_problem accepts (and records.run_name leaves as it is)."""
    return folder_name(name).strip("-.")[:RUN_NAME_MAX].strip("-.") or "my-run"


def _saved_values(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config's known keys; a run name from before names were checked is made usable (the run's folder
    name is in its state.json, not this)."""
    known = {k: v for k, v in values.items() if k in FIELDS}
    if isinstance(known.get("run"), str) and run_name_problem(known["run"]):
        known["run"] = usable_run_name(known["run"])
    return known


# MATCH flags newer than the first checkpoints: a config.json without one was written before the flag existed, by the
# model its default makes (the default is today's model), so a reader may take the default (checkpoint.check_config).
MATCH_ADDED_LATER = (
    "norm",
    "bias",
    "tie_embeddings",
    "smear",
    "bigram_embedding",
    "value_embeddings",
    "mtp_weight",
    "embedding_lr",
)


# ----------------------------------------------------------------------------------------------------------------
# --init_from: GPT-2 is one setting of the architecture flags, and each GPT-2 checkpoint adds its shape. The four
# published checkpoints' shapes are known without a download (their Hugging Face config.json); a local folder's are
# read from its config.json. parse_args sets these flags (an explicit flag that says otherwise is refused) and
# export.py loads the weights.
GPT2_ARCHITECTURE: dict[str, Any] = dict(
    pos_emb="learned",
    norm="layernorm",
    bias=True,
    activation="gelu_tanh",
    qk_norm=False,
    attn_sink=False,
    logit_softcap=0.0,
    tie_embeddings=True,
    tokenizer="gpt2",
)
GPT2_MODELS = {  # name: (num_blocks, num_heads, embedding_dim); each has 1024 positions
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
GPT2_VOCAB = 50257  # the gpt2 tokenizer's ids
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # -> --activation


def pretrained_flags(init_from: str) -> dict[str, Any]:
    """The flags a --init_from checkpoint fixes: GPT-2's architecture, its shape, and context_len = its positions (a
    run may use fewer). UserError (one line) for a name that is neither a GPT-2 nor a folder, or a folder whose
    config.json is not a GPT-2 this model can express."""
    if init_from in GPT2_MODELS:
        blocks, heads, dim = GPT2_MODELS[init_from]
        shape = dict(num_blocks=blocks, num_heads=heads, embedding_dim=dim, context_len=1024)
        return {**GPT2_ARCHITECTURE, **shape}
    if not Path(init_from).is_dir():
        raise UserError(
            f"--init_from {init_from!r} is neither a GPT-2 name ({', '.join(GPT2_MODELS)}) nor a folder; for a "
            "model of the Hugging Face Hub, download it (hf download NAME --local-dir DIR) and pass DIR"
        )
    where = f"--init_from {init_from}"
    try:
        hf = json.loads((Path(init_from) / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{where} is not a Hugging Face model folder (it has no config.json)") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{where}: its config.json is unreadable ({type(error).__name__}: {error})") from None
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    if model_type != "gpt2":
        raise UserError(f"{where} is not a GPT-2 folder (its config.json has model_type {model_type!r}, not 'gpt2')")
    sizes = {key: hf.get(key) for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    if bad := [key for key, value in sizes.items() if not is_kind(value, int) or value < 1]:
        raise UserError(f"{where}: its config.json lacks a positive integer {bad[0]} (got {sizes[bad[0]]!r})")
    needs = {  # GPT-2 options this model has one setting of: (config.json's value, the one it needs)
        "vocab_size": (sizes["vocab_size"], GPT2_VOCAB),
        "n_inner": (hf.get("n_inner") or 4 * sizes["n_embd"], 4 * sizes["n_embd"]),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), 1e-5),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
    }
    for key, (value, needed) in needs.items():
        if value != needed:
            raise UserError(f"{where}: its config.json has {key} {value!r}; this model can only load {needed!r}")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise UserError(f"{where}: its activation_function {activation!r} is none of {', '.join(HF_ACTIVATIONS)}")
    return {
        **GPT2_ARCHITECTURE,
        "activation": HF_ACTIVATIONS[activation],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "num_blocks": sizes["n_layer"],
        "num_heads": sizes["n_head"],
        "embedding_dim": sizes["n_embd"],
        "context_len": sizes["n_positions"],
    }


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

# The 10-minute CPU recipe (PRESETS["quality-cpu"]), also the step-bound "shakespeare-record".
_QUALITY_CPU: dict[str, Any] = {
    **_NANOGPT_CPU,
    "num_blocks": 6,
    "num_heads": 6,
    "embedding_dim": 192,
    "context_len": 128,
    "batch_size": 16,
    "dropout": 0.05,
    "weight_decay": 0.1,
    "max_steps": 100_000,
    "time_budget_s": 600.0,
    "lr_schedule": "linear",
    "min_lr_frac": 0.0,
    "eval_every": 500,
    "log_every": 100,
}

# Named sets of defaults. Explicit flags override them; the dataclass defaults above are the GPU defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The first run (README): the nanoGPT shape with twice the context, writing Shakespeare-like text in ~3 CPU minutes.
    "cpu": {**_NANOGPT_CPU, "context_len": 128, "max_steps": 1500, "log_every": 100, "sample_tokens": 300},
    # nanoGPT's CPU recipe shape and steps; the input tables at their own learning rate and a linear decay to zero
    # (6 seeds each, docs/results.md: 1.5576 against 1.5764 without them, p = 0.0002).
    "nanogpt-cpu": {**_NANOGPT_CPU, "embedding_lr": 0.3, "lr_schedule": "linear", "min_lr_frac": 0.0},
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
    # The 10-minute CPU preset: a 6 x 6 x 192 model (2.7M parameters) for 600 s, dropout 0.05 and weight decay 0.1
    # (3 seeds each, docs/results.md: -0.038 against dropout 0.1 alone, p = 0.001), decay to zero on the clock;
    # ~2500-3800 steps (~5-7 epochs of Tiny Shakespeare) on 2 cores: val 1.418 over 3 seeds (docs/results.md).
    "quality-cpu": _QUALITY_CPU,
    # The same recipe on steps instead of the clock, so every machine trains the same run (bit for bit on one CPU):
    # the lowest Tiny Shakespeare val loss measured here, ~10 minutes on 2 CPU cores (docs/results.md).
    "shakespeare-record": {**_QUALITY_CPU, "time_budget_s": None, "max_steps": 3_700},
    # GPT-2 small (124M) on a prepared corpus (--data_path DIR from prepare.py): 16 x 1024 x 32 = 524,288 tokens per
    # step on one GPU (with N GPUs under torchrun pass --accumulation_steps 32/N for the same step), 10,000 steps =
    # 5.2B tokens, warmup then a linear cooldown over the last 40%. A starting point, not yet tuned on a GPU.
    "gpt2-124m": {
        "tokenizer": "gpt2",
        "num_blocks": 12,
        "num_heads": 12,
        "embedding_dim": 768,
        "context_len": 1024,
        "batch_size": 16,
        "accumulation_steps": 32,
        "max_steps": 10_000,
        "warmup_steps": 250,
        "lr": 6e-4,
        "muon_lr": 0.02,
        "lr_schedule": "wsd",
        "cooldown_frac": 0.4,
        "min_lr_frac": 0.0,
        "weight_decay": 0.0,
        "dropout": 0.0,
        "eval_every": 250,
        "eval_steps": 20,
        "log_every": 10,
        "save_every": 1000,
    },
    # nanoGPT's finetune_shakespeare recipe with the smallest GPT-2: its weights, GPT-2 tokens, 20 steps of
    # 32 x 1024 tokens at a small constant AdamW learning rate (Muon's would wreck pretrained matrices).
    "gpt2-shakespeare": {
        **pretrained_flags("gpt2"),
        "init_from": "gpt2",
        "batch_size": 8,
        "accumulation_steps": 4,
        "max_steps": 20,
        "warmup_steps": 0,
        "use_muon": False,
        "lr": 3e-5,
        "lr_schedule": "constant",
        "weight_decay": 0.1,
        "dropout": 0.0,
        "eval_every": 5,
        "eval_steps": 40,
        "log_every": 1,
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
        epilog=(
            "Limits: every number must be finite (none takes inf or nan; 0 or None spells 'off' where there is one). "
            "Sizes that fit no machine are refused as typos: an estimated memory of 16 bytes per parameter "
            "(12 x num_blocks x embedding_dim^2 + (2 x vocab + learned positions) x embedding_dim), plus "
            "128 x batch_size x context_len x embedding_dim x num_blocks bytes of activations and "
            "12 x batch_size x context_len x vocab bytes of logits, over 1 TB; and a periodic evaluation of more "
            "than 1e9 tokens (eval_steps x batch_size x context_len, kept in memory at 16 bytes each). --run is one "
            "folder name: no / or \\, not . or .., at most 100 characters."
        ),
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line reach the namespace
    )
    for name, f in FIELDS.items():
        kind, optional = KINDS[name]
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
    values = _saved_values(base or {})
    values.update(PRESETS.get(explicit.get("preset"), {}))
    values.update(explicit)
    if values.get("init_from") and not values.get("resume"):  # (a resumed run's saved flags already hold them)
        values.update(_init_from_values(values, explicit))
    return Config(**values)


def _init_from_values(values: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The flags --init_from fixes, over the preset's and saved ones; an explicit flag that says otherwise is one
    line. context_len is the checkpoint's positions unless given (fewer are fine: the table is cut)."""
    init_from = values["init_from"]
    fixed = pretrained_flags(init_from)
    positions = fixed.pop("context_len")
    for name, value in fixed.items():
        if name in explicit and explicit[name] != value:
            raise UserError(
                f"--init_from {init_from} is a GPT-2 with --{name} {value}; leave out --{name} {explicit[name]}"
            )
    context_len = values.get("context_len", positions)
    if is_kind(context_len, int) and context_len > positions:
        raise UserError(
            f"--context_len {context_len} is longer than the {positions} positions of --init_from {init_from}; "
            f"use --context_len {positions} or less"
        )
    return {**fixed, "context_len": context_len}


def _friendlier(message: str) -> str:
    # argparse says "argument --save_model: invalid bool value: 'yes'"; our type functions already explain themselves
    return message.replace("argument ", "", 1)
