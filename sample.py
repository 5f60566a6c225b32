"""Talk to a trained model: `uv run sample.py --checkpoint models/<run> --prompt "ROMEO:"`.

Loads a checkpoint (a step_* folder, or a run folder's latest), then streams each sample to the terminal as the
tokens come. With the KV cache (unless --kv_cache False) each new token costs one position. When the text outgrows
the model's context_len, generation goes on by re-encoding: the window restarts from the last context_len // 2
tokens, which are encoded afresh into a new cache (model.generate). A checkpoint trained with --ema_decay holds the
average of its weights too (ema.safetensors): that is the model sampled unless --weights raw asks for the trained
weights themselves. With --cases it runs the inference cases of
inference_cases.json instead and prints a table: checks passed, held-out loss, copied share, the sample.
The memorization check (memorization.py) gives each sample's copied share: the share of its characters inside spans
of at least --copy_check_chars characters (default 32; 0 = off) found verbatim in the checkpoint's training split,
which is read again from its config's data_path; when that data is gone, changed or too large, a one-line note says
so and sampling goes on.
Bad input is one `error: ...` line on stderr and exit status 2; --cases exits 1 when a check fails. The numeric
flags follow inference.Settings: --temperature finite, 0 to 1e30 (under 1e-6 it is greedy, its limit), --top_k a
positive integer, --top_p in (0, 1] (under 1e-6 greedy too), --max_new_tokens and --num_samples positive integers
(no upper limit: Ctrl-C stops), --seed 0 to 2**64 - 1. --prompt_file and --cases_file must be regular files: a
FIFO or a device (/dev/zero) is refused unopened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from checkpoint import EMA_FILE, read_checkpoint, resolve_checkpoint
from config import OneLineParser, UserError, flag_type
from inference import (
    CASES_PATH,
    Settings,
    StreamDecoder,
    encode_prompt,
    format_table,
    load_cases,
    load_model,
    run_cases,
)
from memorization import COPY_CHARS, CopyIndex, checkpoint_index, describe
from model import GPT
from utils import check_regular_file


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sample.py",
        description="Sample from a checkpoint, or run the inference cases. Flags take --flag value or --flag=value.",
        allow_abbrev=False,
    )
    integer, number, boolean = flag_type(int), flag_type(float), flag_type(bool)
    default = Settings()  # the sampling defaults live in one place
    add = parser.add_argument
    add("--checkpoint", required=True, help="a step_* checkpoint folder, or a run folder (uses its latest)")
    add(
        "--weights",
        choices=("ema", "raw"),
        help="the weight average (ema.safetensors, from --ema_decay) or the raw weights (default: ema when the "
        "checkpoint has it, else raw)",
    )
    add("--prompt", default="", help="text to continue (empty: start from the tokenizer's start token)")
    add("--prompt_file", help="read the prompt from this UTF-8 file instead")
    add(
        "--max_new_tokens",
        type=integer,
        default=default.max_new_tokens,
        help="tokens per sample, no upper limit: Ctrl-C stops (default: %(default)s)",
    )
    add(
        "--temperature",
        type=number,
        default=default.temperature,
        help="0 = greedy, as is anything under 1e-6; at most 1e30 (default: %(default)s)",
    )
    add(
        "--top_k",
        type=flag_type(int, True),
        default=default.top_k,
        help="the k likeliest ids; None = all (default: %(default)s)",
    )
    add(
        "--top_p",
        type=flag_type(float, True),
        default=default.top_p,
        help="the likeliest ids up to this mass, in (0, 1]; under 1e-6 it is greedy (default: %(default)s)",
    )
    add("--num_samples", type=integer, default=1, help="samples, one after another (default: %(default)s)")
    add(
        "--seed",
        type=integer,
        default=default.seed,
        help="0 to 2**64 - 1; same seed, same samples (default: %(default)s)",
    )
    add("--kv_cache", type=boolean, default=default.kv_cache, help="cache keys and values (default: %(default)s)")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, then mps, then cpu")
    add("--cases", type=boolean, nargs="?", const=True, default=False, help="run the inference cases instead")
    add("--cases_file", default=str(CASES_PATH), help="with --cases: the cases to run (default: inference_cases.json)")
    add("--out", help="with --cases: also write the results as JSON here")
    add(
        "--copy_check_chars",
        type=integer,
        default=COPY_CHARS,
        help="the memorization check: report the share of each sample inside spans of at least this many characters "
        "copied verbatim from the training split; 0 = off (default: %(default)s)",
    )
    return parser


@torch.no_grad()
def check_logits(model: GPT, prompt_ids: list[int], checkpoint: str) -> None:
    """Refuse a model whose logits for the prompt are NaN or infinite: finite weights can still overflow (a diverged
    run), and then greedy decoding picks garbage ids and sampling fails inside torch.multinomial."""
    window = torch.tensor([prompt_ids[-model.cfg.context_len :]], device=next(model.parameters()).device)
    if not torch.isfinite(model(window)[0, -1, : model.vocab_size]).all():
        raise UserError(
            f"checkpoint {checkpoint} gives NaN or infinite logits for this prompt (its weights overflow: a diverged "
            "run?); use an earlier step_* folder"
        )


def check_copy_chars(args: argparse.Namespace) -> None:
    if args.copy_check_chars < 0:
        raise UserError(f"--copy_check_chars must be 0 (off) or a positive integer, got {args.copy_check_chars}")


def copy_index(args: argparse.Namespace, model: GPT) -> CopyIndex | None:
    """The memorization check's index of the checkpoint's training split, or None: off, or skipped with a note."""
    if args.copy_check_chars == 0:
        return None
    state = read_checkpoint(resolve_checkpoint(args.checkpoint, usable_for="sample", notice=False))[2]
    with contextlib.redirect_stdout(sys.stderr):  # preparing a text's token cache again prints; stdout is the samples'
        return checkpoint_index(model.cfg, state.get("data"), args.copy_check_chars, file=sys.stderr)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        try:
            args.prompt.encode("utf-8")  # bytes that are not UTF-8 reach argv as lone surrogates, which print fails on
        except UnicodeEncodeError:
            raise UserError("--prompt holds bytes that are not UTF-8; pass UTF-8 text") from None
        return args.prompt
    if args.prompt:
        raise UserError("give --prompt or --prompt_file, not both")
    check_regular_file(args.prompt_file, "--prompt_file", "a UTF-8 text file")  # a FIFO or /dev/zero: never read
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read --prompt_file {args.prompt_file}: {error}") from None


def sample(args: argparse.Namespace) -> int:
    settings = Settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.kv_cache)
    if args.num_samples <= 0:
        raise UserError(f"--num_samples must be a positive integer, got {args.num_samples}")
    check_copy_chars(args)
    prompt = read_prompt(args)  # before the model loads, so a bad flag fails fast
    model, tokenizer, weights = load_model(args.checkpoint, args.device, args.weights)
    prompt_ids = encode_prompt(tokenizer, prompt)
    check_logits(model, prompt_ids, args.checkpoint)
    index = copy_index(args, model)  # once, before the samples (a fraction of a second for Tiny Shakespeare)
    if len(prompt_ids) > model.cfg.context_len:
        print(
            f"note: the prompt is {len(prompt_ids)} tokens, more than context_len {model.cfg.context_len}; "
            "the model sees its end",
            file=sys.stderr,
        )
    # one generator for all samples: they differ from each other, and the same seed repeats the whole run
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(settings.seed)
    for i in range(args.num_samples):
        stream = StreamDecoder(tokenizer)
        sys.stdout.write(prompt)
        started, count, pieces = time.perf_counter(), 0, []
        for token_id in settings.sample(model, prompt_ids, generator):
            pieces.append(stream.feed(token_id))
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
            count += 1
        pieces.append(stream.flush())
        sys.stdout.write(pieces[-1] + "\n" + "-" * 40 + "\n")
        sys.stdout.flush()
        seconds = time.perf_counter() - started
        share = index.copied_share("".join(pieces), prompt) if index is not None else None
        copied = f"{describe(share, index.chars)}, " if share is not None else ""
        print(
            f"[sample {i + 1}/{args.num_samples}: {count} tokens in {seconds:.1f}s, {count / seconds:.1f} tok/s, "
            f"kv cache {'on' if settings.kv_cache else 'off'}, {copied}{weights} weights]",
            file=sys.stderr,
            flush=True,
        )
    return 0


def cases(args: argparse.Namespace) -> int:
    check_copy_chars(args)
    case_list = load_cases(args.cases_file)
    model, tokenizer, weights = load_model(args.checkpoint, args.device, args.weights)
    index = copy_index(args, model)
    copied = index.copied_share if index is not None else None
    results = run_cases(model, tokenizer, case_list, progress=True, copied=copied)
    print(format_table(results))
    if index is not None:
        print(f"copied: the share of each sample inside spans of {index.chars}+ characters of the training split")
    print(f"weights: {weights}{f' ({EMA_FILE})' if weights == 'ema' else ''}")
    if args.out:
        payload = {
            "checkpoint": args.checkpoint,
            "weights": weights,
            "cases_file": args.cases_file,
            "copy_check_chars": index.chars if index is not None else None,  # what each result's "copied" counts
            "results": [r.to_dict() for r in results],
        }
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot write --out {args.out}: {error}") from None
        print(f"results written to {args.out}")
    return 1 if any(r.failed for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return cases(args) if args.cases else sample(args)
    except UserError as error:
        print(f"error: {str(error).removeprefix('argument ')}", file=sys.stderr)  # argparse's prefix says nothing
        return 2
    except KeyboardInterrupt:  # Ctrl-C while streaming: stop quietly
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
