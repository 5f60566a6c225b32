"""Talk to a trained model: `uv run sample.py --checkpoint models/<run> --prompt "ROMEO:"`.

Loads a checkpoint (a step_* folder, or a run folder's latest), then streams each sample to the terminal as the
tokens come. With the KV cache (unless --kv_cache False) each new token costs one position. When the text outgrows
the model's context_len, generation goes on by re-encoding: the window restarts from the last context_len // 2
tokens, which are encoded afresh into a new cache (model.generate). With --cases it runs the inference cases of
inference_cases.json instead and prints a table: checks passed, held-out loss, the sample.
Bad input is one `error: ...` line on stderr and exit status 2; --cases exits 1 when a check fails. The numeric
flags follow inference.Settings: --temperature finite, 0 to 1e30 (under 1e-6 it is greedy, its limit), --top_k a
positive integer, --top_p in (0, 1] (under 1e-6 greedy too), --max_new_tokens and --num_samples positive integers
(no upper limit: Ctrl-C stops), --seed 0 to 2**64 - 1. --prompt_file and --cases_file must be regular files: a
FIFO or a device (/dev/zero) is refused unopened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from config import OneLineParser, UserError, flag_type
from inference import CASES_PATH, Settings, StreamDecoder, encode_prompt, format_table, load_cases, run_cases
from model import GPT
from tokenizer import Tokenizer, tokenizer_from_dict
from utils import check_regular_file, resolve_device


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
    return parser


def load_model(checkpoint: str, device_name: str) -> tuple[GPT, Tokenizer]:
    device = resolve_device(device_name)
    if not Path(checkpoint).exists():
        raise UserError(
            f"--checkpoint {checkpoint} does not exist; pass a step_* folder or a run folder (models/<run>)"
        )
    model, tokenizer_dict, _ = load_checkpoint(checkpoint, device)
    try:
        tokenizer = tokenizer_from_dict(tokenizer_dict)
    except (KeyError, TypeError):
        raise UserError(f"checkpoint {checkpoint} has a damaged tokenizer.json; use an earlier step_* folder") from None
    return model.eval(), tokenizer


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
    prompt = read_prompt(args)  # before the model loads, so a bad flag fails fast
    model, tokenizer = load_model(args.checkpoint, args.device)
    prompt_ids = encode_prompt(tokenizer, prompt)
    check_logits(model, prompt_ids, args.checkpoint)
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
        started, count = time.perf_counter(), 0
        for token_id in settings.sample(model, prompt_ids, generator):
            sys.stdout.write(stream.feed(token_id))
            sys.stdout.flush()
            count += 1
        sys.stdout.write(stream.flush() + "\n" + "-" * 40 + "\n")
        sys.stdout.flush()
        seconds = time.perf_counter() - started
        print(
            f"[sample {i + 1}/{args.num_samples}: {count} tokens in {seconds:.1f}s, {count / seconds:.1f} tok/s, "
            f"kv cache {'on' if settings.kv_cache else 'off'}]",
            file=sys.stderr,
            flush=True,
        )
    return 0


def cases(args: argparse.Namespace) -> int:
    case_list = load_cases(args.cases_file)
    model, tokenizer = load_model(args.checkpoint, args.device)
    results = run_cases(model, tokenizer, case_list, progress=True)
    print(format_table(results))
    if args.out:
        payload = {
            "checkpoint": args.checkpoint,
            "cases_file": args.cases_file,
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
