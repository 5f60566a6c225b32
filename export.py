"""Hugging Face in and out: GPT-2 weights into a run (--init_from), and any checkpoint out to a transformers folder.

    uv run export.py --checkpoint models/<run> --out <folder>

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)   # (plain GPT-2: no custom code)
    tokenizer = AutoTokenizer.from_pretrained(folder)

In: train.py calls load_pretrained(model, init_from) on a fresh GPT whose flags parse_args set from the GPT-2's
config.json (config.pretrained_flags). The weights come from a local folder, or from the Hugging Face Hub through
its cache with huggingface_hub (`uv sync --extra hf`). GPT-2's Conv1D weights are nn.Linear's transposed.
Out: a checkpoint in the GPT-2 configuration (config.GPT2_ARCHITECTURE) becomes a plain GPT2LMHeadModel; any other
becomes a PairForCausalLM, whose code (hf/modeling_pair.py, hf/configuration_pair.py) travels in the folder and is
loaded with trust_remote_code=True. Tokenizer files: gpt2 as vocab.json + merges.txt (tiktoken's own files),
o200k_base and char as a tokenizer.json; plus generation_config.json with sample.py's defaults. Nothing here needs
transformers: the folder is plain JSON, safetensors and the two Python files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from checkpoint import load_checkpoint
from config import (
    GPT2_ARCHITECTURE,
    GPT2_MODELS,
    GPT2_VOCAB,
    HF_ACTIVATIONS,
    Config,
    OneLineParser,
    UserError,
    pretrained_flags,
)
from model import GPT

HF_CODE = Path(__file__).resolve().parent / "hf"  # modeling_pair.py and configuration_pair.py
# where tiktoken gets (and caches) GPT-2's own encoder.json and vocab.bpe
GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
ENDOFTEXT = "<|endoftext|>"
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 200}  # sample.py's defaults (inference.Settings)

# ----------------------------------------------------------------------------------------------------------------
# Names: model.py's parameter <-> GPT-2's (as in its model.safetensors, without GPT2LMHeadModel's "transformer.")

GPT2_BLOCK_NAMES = {
    "attn_norm": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}


def gpt2_names(cfg: Config) -> dict[str, str]:
    """Our parameter name -> GPT-2's, for a model in the GPT-2 configuration."""
    names = {"token_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight"}
    names |= {"final_norm.weight": "ln_f.weight", "final_norm.bias": "ln_f.bias"}
    for i in range(cfg.num_blocks):
        for ours, theirs in GPT2_BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"h.{i}.{theirs}.{kind}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def is_conv1d(name: str, tensor: torch.Tensor) -> bool:
    """GPT-2 keeps its block matrices as Conv1D (in, out): nn.Linear's (out, in) transposed."""
    return tensor.dim() == 2 and name.startswith("blocks.")


def is_gpt2(cfg: Config) -> bool:
    """Whether transformers' GPT2LMHeadModel computes this model (any tokenizer, tied head or not, either GELU)."""
    free = ("tokenizer", "tie_embeddings", "activation")
    fixed = all(getattr(cfg, name) == value for name, value in GPT2_ARCHITECTURE.items() if name not in free)
    return fixed and cfg.activation in HF_ACTIVATIONS.values()


# ----------------------------------------------------------------------------------------------------------------
# In: GPT-2 weights


def load_pretrained(model: GPT, init_from: str) -> None:
    """Copy the GPT-2 weights `init_from` names (gpt2..gpt2-xl, or a local folder) into `model`, whose flags must be
    that GPT-2's (parse_args sets them; context_len may be shorter). One UserError line for anything that does not
    fit: another architecture, a folder without weights, a tensor of another shape."""
    cfg, where = model.cfg, f"--init_from {init_from}"
    expected = pretrained_flags(init_from)
    if cfg.context_len > expected["context_len"]:
        raise UserError(f"{where} has {expected['context_len']} positions, fewer than --context_len {cfg.context_len}")
    differ = [
        f"--{n} {v} (this run: {getattr(cfg, n)})"
        for n, v in expected.items()
        if n != "context_len" and getattr(cfg, n) != v
    ]
    if differ:
        raise UserError(f"{where} is a GPT-2 with {', '.join(differ)}; leave those flags out (--init_from sets them)")
    if model.vocab_size != GPT2_VOCAB:
        raise UserError(f"{where} has {GPT2_VOCAB} token ids; this run's tokenizer has {model.vocab_size}")
    theirs = read_hf_weights(pretrained_folder(init_from), where)
    ours = model.state_dict()
    names = gpt2_names(cfg)
    if missing := [name for name in names.values() if name not in theirs]:
        raise UserError(f"{where} is not a GPT-2 checkpoint this run can start from: it lacks {missing[0]}")
    with torch.no_grad():
        for name, target in ours.items():
            source = theirs[names[name]]
            source = source.t() if is_conv1d(name, target) else source
            if name in ("token_emb.weight", "lm_head.weight") and len(source) < len(target):  # (ours are padded)
                source = torch.cat((source, source.new_zeros(target.size(0) - source.size(0), *source.shape[1:])))
            if name == "pos_emb.weight":  # a shorter context uses the first positions
                source = source[: target.size(0)]
            if source.shape != target.shape:
                raise UserError(
                    f"{where}: {names[name]} is {list(theirs[names[name]].shape)}, which does not fit this run's "
                    f"{name} {list(target.shape)}; its config.json and weights disagree"
                )
            target.copy_(source)


def pretrained_folder(init_from: str) -> Path:
    """A local folder as it is; a GPT-2 name from the Hugging Face cache, else downloaded into it."""
    if init_from not in GPT2_MODELS:
        return Path(init_from)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"--init_from {init_from} needs huggingface_hub to download the weights: uv sync --extra hf "
            "(or pass a local folder in Hugging Face format)"
        ) from None
    try:
        return Path(snapshot_download(init_from, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as error:  # offline with nothing cached, no such revision, a network error: all one line
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise UserError(
            f"could not get {init_from} from the Hugging Face Hub or its cache ({type(error).__name__}: {reason}); "
            "offline? download it once online, or pass a local folder with config.json and model.safetensors"
        ) from None


def read_hf_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face GPT-2 folder (model.safetensors, its shards, or pytorch_model.bin), named as in
    GPT2Model ("transformer." dropped)."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {k: v for shard in shards for k, v in load_file(folder / shard).items()}
        elif (folder / "model.safetensors").is_file():
            tensors = load_file(folder / "model.safetensors")
        elif (folder / "pytorch_model.bin").is_file():
            tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{where} holds no weights (model.safetensors or pytorch_model.bin)")
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{where}: its weights are unreadable ({type(error).__name__}: {error})") from None
    return {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}


# ----------------------------------------------------------------------------------------------------------------
# Out: a transformers folder


def export(checkpoint: str | Path, out: str | Path, weights: str | None = None) -> Path:
    """Write the checkpoint (a step_* folder or a run folder: its latest) as a transformers folder `out`, which
    must not exist or be empty; written beside it and renamed into place, so it is whole or absent. weights: as
    sample.py's --weights ("ema", "raw", or None: the weight average when the checkpoint has one)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; pass a new folder")
    model, tokenizer_dict, _ = load_checkpoint(checkpoint, "cpu", weights)
    added = ("smear", "bigram_embedding", "value_embeddings")
    if unwritable := [f"--{name}" for name in added if getattr(model.cfg, name)]:
        # hf/modeling_pair.py does not have them yet: an export without them would be another model
        raise UserError(f"{checkpoint} was trained with {' and '.join(unwritable)}, which export.py cannot write yet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        special = write_tokenizer(tmp, tokenizer_dict, model.cfg.context_len)
        (write_gpt2 if is_gpt2(model.cfg) else write_pair)(tmp, model, special)
        write_generation_config(tmp, special)
        if out.exists():
            out.rmdir()  # (empty)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_gpt2(folder: Path, model: GPT, special: dict[str, int | None]) -> None:
    """config.json and model.safetensors of a plain GPT2LMHeadModel: our weights renamed, Conv1D-transposed, cut to
    the real vocabulary."""
    cfg, state = model.cfg, model.state_dict()
    weights = {}
    for ours, theirs in gpt2_names(cfg).items():
        tensor = state[ours]
        tensor = tensor.t() if is_conv1d(ours, tensor) else tensor
        tensor = tensor[: model.vocab_size] if ours in ("token_emb.weight", "lm_head.weight") else tensor
        weights[theirs if theirs == "lm_head.weight" else f"transformer.{theirs}"] = tensor
    _save_weights(folder / "model.safetensors", weights)
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    _write_json(
        folder / "config.json",
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": model.vocab_size,
            "n_positions": cfg.context_len,
            "n_embd": cfg.embedding_dim,
            "n_layer": cfg.num_blocks,
            "n_head": cfg.num_heads,
            "n_inner": None,
            "activation_function": activation,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,  # (ours has no dropout on attention weights)
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": special["bos"],
            "eos_token_id": special["eos"],
            "dtype": "float32",
        },
    )


PAIR_FLAGS = (  # the Config flags that define the network (configuration_pair.PairConfig's fields)
    "num_blocks",
    "num_heads",
    "embedding_dim",
    "context_len",
    "pos_emb",
    "activation",
    "norm",
    "bias",
    "tie_embeddings",
    "qk_norm",
    "attn_sink",
    "logit_softcap",
    "dropout",
)


def write_pair(folder: Path, model: GPT, special: dict[str, int | None]) -> None:
    """config.json, model.safetensors (model.py's names, padded rows kept) and the custom code of a PairForCausalLM."""
    for name in ("modeling_pair.py", "configuration_pair.py"):
        shutil.copyfile(HF_CODE / name, folder / name)
    # the --mtp_weight head serves training alone: the exported model is the next-token one
    next_token = {name: t for name, t in model.state_dict().items() if not name.startswith("mtp_head.")}
    _save_weights(folder / "model.safetensors", next_token)
    _write_json(
        folder / "config.json",
        {
            "architectures": ["PairForCausalLM"],
            "model_type": "pair",
            "auto_map": {
                "AutoConfig": "configuration_pair.PairConfig",
                "AutoModelForCausalLM": "modeling_pair.PairForCausalLM",
            },
            "vocab_size": model.vocab_size,
            "padded_vocab_size": model.padded_vocab,
            **{name: getattr(model.cfg, name) for name in PAIR_FLAGS},
            "tie_word_embeddings": False,  # (tie_embeddings is the model's own: there is no lm_head to tie)
            "bos_token_id": special["bos"],
            "eos_token_id": special["eos"],
            "dtype": "float32",
        },
    )


def write_generation_config(folder: Path, special: dict[str, int | None]) -> None:
    """sample.py's defaults (a prompt and its new tokens must fit in the context: the model has no positions past it)."""
    ids = {"bos_token_id": special["bos"], "eos_token_id": special["eos"]}
    _write_json(folder / "generation_config.json", {**SAMPLING, **ids})


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files


def write_tokenizer(folder: Path, tokenizer_dict: dict[str, Any], context_len: int) -> dict[str, int | None]:
    """The tokenizer files AutoTokenizer loads; returns the special ids (bos, eos: <|endoftext|>, or None for char)."""
    name = tokenizer_dict["name"]
    common = {"model_max_length": context_len, "clean_up_tokenization_spaces": False}
    if name == "char":
        _write_json(folder / "tokenizer.json", char_tokenizer_json(tokenizer_dict["chars"]))
        _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **common})
        return {"bos": None, "eos": None}
    encoding = tiktoken_encoding(name)
    eot = encoding["special_tokens"][ENDOFTEXT]
    specials = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    if name == "gpt2":  # GPT-2's own files, as tiktoken caches them: encoder.json is vocab.json, vocab.bpe merges.txt
        from tiktoken.load import read_file_cached

        (folder / "vocab.json").write_bytes(read_file_cached(GPT2_FILES + "encoder.json"))
        (folder / "merges.txt").write_bytes(read_file_cached(GPT2_FILES + "vocab.bpe"))
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **specials, **common}
    else:
        _write_json(folder / "tokenizer.json", bpe_tokenizer_json(encoding))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, **common}
    _write_json(folder / "tokenizer_config.json", config)
    return {"bos": eot, "eos": eot}


def tiktoken_encoding(name: str) -> dict[str, Any]:
    """tiktoken's definition of an encoding: pat_str, mergeable_ranks (bytes -> id), special_tokens."""
    from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS

    try:
        return ENCODING_CONSTRUCTORS[name]()
    except Exception as error:
        raise UserError(
            f"could not load the {name} tokenizer's files ({type(error).__name__}); offline? put them in a folder "
            "named as tiktoken caches them and set TIKTOKEN_CACHE_DIR to it (see docs/data.md)"
        ) from None


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte], extra = chr(256 + extra), extra + 1
    return [chars[byte] for byte in range(256)]


def tokenizer_json(vocab: dict[str, int], merges: list[str], **parts: Any) -> dict[str, Any]:
    """A tokenizers-library tokenizer.json around a BPE model (vocab, merges); parts: its pre_tokenizer, decoder,
    added_tokens, and the model's ignore_merges (take a piece that is a whole token as it is, as tiktoken does)."""
    bpe = dict(dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None, fuse_unk=False)
    bpe |= dict(byte_fallback=False, ignore_merges=parts.pop("ignore_merges", False), vocab=vocab, merges=merges)
    empty = dict(truncation=None, padding=None, added_tokens=[], normalizer=None, pre_tokenizer=None, decoder=None)
    return {"version": "1.0", **empty, "post_processor": None, **parts, "model": {"type": "BPE", **bpe}}


def bpe_tokenizer_json(encoding: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.json of a tiktoken encoding: its regex, then byte-level BPE whose merges are recovered from the
    ranks (each token of two or more bytes is a merge of two tokens; a merge ranks as the token it makes)."""
    ranks: dict[bytes, int] = encoding["mergeable_ranks"]
    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []
    for token in sorted(ranks, key=ranks.get):  # in rank order: a merge ranks as the token it makes
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [(a, b) for a, b in pairs if a in ranks and b in ranks]
        merges += [f"{text(a)} {text(b)}" for a, b in sorted(pairs, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))]
    special = encoding["special_tokens"]
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": encoding["pat_str"]}, "behavior": "Isolated", "invert": False}
    return tokenizer_json(
        {**{text(token): rank for token, rank in ranks.items()}, **special},  # (special ids keep theirs only here)
        merges,
        added_tokens=[{"id": i, "content": t, **flags} for t, i in sorted(special.items(), key=lambda item: item[1])],
        pre_tokenizer={"type": "Sequence", "pretokenizers": [split, byte_level]},
        decoder=byte_level,
        ignore_merges=True,
    )


def char_tokenizer_json(chars: str) -> dict[str, Any]:
    """One id per character: a BPE with the characters as its vocabulary and no merges splits any text into them
    (and drops a character it does not know); the decoder joins them back without spaces."""
    return tokenizer_json({c: i for i, c in enumerate(chars)}, [], decoder={"type": "Fuse"})


# ----------------------------------------------------------------------------------------------------------------
# The command line


def main(argv: list[str] | None = None) -> int:
    """0 when the folder is written; 2 with one `error:` line for a user mistake."""
    parser = OneLineParser(
        prog="export.py",
        description="Write a checkpoint as a Hugging Face transformers folder (model, tokenizer, generation config).",
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", required=True, help="a step_* folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="the folder to write: new, or empty")
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        help="the weight average (ema.safetensors, from --ema_decay) or the raw weights (default: ema when the "
        "checkpoint has it, else raw)",
    )
    try:
        args = parser.parse_args(argv)
        out = export(args.checkpoint, args.out, args.weights)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kind = "GPT2LMHeadModel" if json.loads((out / "config.json").read_text())["model_type"] == "gpt2" else "custom code"
    remote = "" if kind == "GPT2LMHeadModel" else ", trust_remote_code=True"
    print(f"wrote {out} ({kind}): AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
