"""config.py: defaults, the CLI grammar, presets, and one-line errors."""

from __future__ import annotations

import dataclasses
from typing import get_type_hints

import pytest

import config
from config import FIELDS, PRESETS, Config, UserError, build_parser, parse_args

SPEC_DEFAULTS = dict(
    num_blocks=6,
    num_heads=8,
    embedding_dim=512,
    context_len=1024,
    lr=3e-4,
    epochs=1,
    max_steps=1000,
    use_muon=True,
    accumulation_steps=4,
    tokenizer="gpt2",
    torch_compile=True,
    save_model=False,
    save_model_dir="models",
    save_every=None,
    wandb_enabled=False,
    run=None,
)


@pytest.mark.parametrize("source", ["dataclass", "empty command line"])
def test_defaults_match_the_spec(source):
    cfg = Config() if source == "dataclass" else parse_args([])
    for name, expected in SPEC_DEFAULTS.items():
        assert getattr(cfg, name) == expected, name
        assert type(getattr(cfg, name)) is type(expected), name


def test_space_and_equals_forms_agree():
    spaced = parse_args(["--num_blocks", "3", "--lr", "0.001", "--run", "x", "--pos_emb", "learned"])
    equals = parse_args(["--num_blocks=3", "--lr=0.001", "--run=x", "--pos_emb=learned"])
    assert spaced == equals
    assert (spaced.num_blocks, spaced.lr, spaced.run, spaced.pos_emb) == (3, 0.001, "x", "learned")


@pytest.mark.parametrize(
    "text, expected",
    [("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False)],
)
def test_boolean_spellings(text, expected):
    assert parse_args(["--save_model", text]).save_model is expected
    assert parse_args([f"--torch_compile={text}"]).torch_compile is expected


def test_max_steps_none_means_epochs():
    cfg = parse_args(["--max_steps", "None", "--epochs", "3"])
    assert cfg.max_steps is None and cfg.epochs == 3
    assert parse_args(["--max_steps=none"]).max_steps is None
    assert parse_args(["--save_every", "50"]).save_every == 50
    assert parse_args(["--save_every", "None"]).save_every is None


def test_preset_nanogpt_cpu():
    cfg = parse_args(["--preset", "nanogpt-cpu"])
    assert (cfg.num_blocks, cfg.num_heads, cfg.embedding_dim, cfg.context_len) == (4, 4, 128, 64)
    assert (cfg.batch_size, cfg.accumulation_steps, cfg.max_steps) == (12, 1, 2000)
    assert cfg.dropout == 0.0 and cfg.tokenizer == "char"
    assert cfg.preset == "nanogpt-cpu"


def test_explicit_flags_override_a_preset_wherever_they_appear():
    assert parse_args(["--preset", "cpu", "--num_blocks", "2"]).num_blocks == 2
    assert parse_args(["--num_blocks", "2", "--preset", "cpu"]).num_blocks == 2
    cfg = parse_args(["--preset", "cpu", "--tokenizer", "gpt2"])
    assert cfg.tokenizer == "gpt2"
    assert cfg.embedding_dim == PRESETS["cpu"]["embedding_dim"]  # the rest of the preset still applies
    assert parse_args(["--preset", "cpu"]).num_blocks == PRESETS["cpu"]["num_blocks"]


def test_every_preset_is_a_valid_config():
    for name, values in PRESETS.items():
        assert set(values) <= set(FIELDS), name
        cfg = parse_args(["--preset", name])
        for key, value in values.items():
            assert getattr(cfg, key) == value, (name, key)


def test_from_dict_round_trip_ignores_unknown_keys():
    cfg = parse_args(["--preset", "cpu", "--run", "r"])
    assert Config.from_dict({**cfg.to_dict(), "a_key_from_the_future": 1}) == cfg


def _one_line_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as info:
        parse_args(argv)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# Bad values not in test_errors.py's end-to-end matrix (which train.main runs through this same parser)
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--batch_size", "-1"], "--batch_size"),
        (["--lr", "-0.001"], "--lr"),
    ],
)
def test_bad_values_raise_one_line(argv, needle):
    assert needle in _one_line_error(argv)


def test_num_heads_error_suggests_a_divisor():
    message = _one_line_error(["--num_heads", "7"])
    suggestion = int(message.rsplit("e.g. ", 1)[1].rstrip(")"))
    assert 512 % suggestion == 0


def test_unknown_preset_lists_the_presets():
    message = _one_line_error(["--preset", "gpu-huge"])
    assert "preset" in message
    for name in PRESETS:
        assert name in message


def test_unknown_flag_suggests_the_closest():  # the --lrr=0.1 form: test_errors.py
    message = _one_line_error(["--lrr", "0.1"])
    assert "--lrr" in message and "did you mean --lr?" in message


def test_unknown_flag_without_a_close_match():
    assert "--help" in _one_line_error(["--zzzzzzzz", "1"])


def test_abbreviations_are_not_accepted():
    assert "did you mean" in _one_line_error(["--num_block", "2"])


def test_constructing_a_bad_config_directly_raises():
    with pytest.raises(UserError):
        Config(num_heads=7)
    with pytest.raises(UserError):
        Config(pos_emb="rope", embedding_dim=24, num_heads=8)  # odd head size cannot rotate
    Config(pos_emb="learned", embedding_dim=24, num_heads=8)


def test_help_lists_every_field():
    text = build_parser().format_help()
    for name in FIELDS:
        assert f"--{name}" in text, name
    assert "(default: 1000)" in text  # defaults are shown


def test_fields_table_matches_the_dataclass():
    assert list(FIELDS) == [f.name for f in dataclasses.fields(Config)]
    assert all(f.metadata.get("help") for f in dataclasses.fields(Config))
    assert config.Config is Config


def test_a_base_config_sits_under_presets_and_flags():
    """--resume passes the checkpoint's config as base: flags left out keep its values, not the defaults."""
    base = {**Config(embedding_dim=64, num_heads=4, lr=0.01).to_dict(), "a_key_from_the_past": 1}
    cfg = parse_args(["--lr", "0.002"], base=base)
    assert (cfg.embedding_dim, cfg.num_heads, cfg.lr) == (64, 4, 0.002)
    assert parse_args(["--preset", "cpu"], base=base).embedding_dim == PRESETS["cpu"]["embedding_dim"]
    assert parse_args([], base=None) == parse_args([])


def test_every_flag_has_a_resume_rule_and_shape_changing_flags_must_match():
    """A flag that changes the shape of any weight cannot change on --resume: its rule must be MATCH."""
    from model import GPT

    assert {f.metadata["on_resume"] for f in FIELDS.values()} <= {config.MATCH, config.NOTICE, config.FREE}
    base = dict(num_blocks=2, num_heads=2, embedding_dim=16, context_len=8, pos_emb="learned", attn_sink=True)
    shapes = {n: p.shape for n, p in GPT(Config(**base), 65).state_dict().items()}
    variants = {"num_blocks": 3, "num_heads": 4, "embedding_dim": 32, "context_len": 16, "pos_emb": "rope"}
    variants |= {"attn_sink": False, "qk_norm": False}
    for name, value in variants.items():
        other = {n: p.shape for n, p in GPT(Config(**{**base, name: value}), 65).state_dict().items()}
        assert other != shapes, name  # the variant really changes a shape
        assert FIELDS[name].metadata["on_resume"] == config.MATCH, name


# ----------------------------------------------------------------------------------------------------------------
# Every flag's range, by class (issue 12)


def _fields_of(kind) -> list[str]:
    """The fields whose type hint is `kind` or `kind | None`, read from the dataclass itself."""
    hints = get_type_hints(Config)
    return [
        f.name for f in dataclasses.fields(Config) if kind in (hints[f.name], *getattr(hints[f.name], "__args__", ()))
    ]


FLOAT_FIELDS = _fields_of(float)
INT_FIELDS = [name for name in _fields_of(int) if name not in _fields_of(bool)]


def test_the_field_walk_sees_the_number_flags():
    assert {"lr", "dropout", "time_budget_s", "peak_flops", "logit_softcap"} <= set(FLOAT_FIELDS)
    assert {"num_blocks", "max_steps", "seed", "save_every"} <= set(INT_FIELDS)
    assert not set(FLOAT_FIELDS) & set(INT_FIELDS) and "save_model" not in INT_FIELDS


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "Infinity"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_flag_refuses_nan_and_infinity(name, text):
    """Walks every float field, so a float flag added later is covered too: no flag takes NaN or infinity."""
    message = _one_line_error([f"--{name}={text}"])  # (the = form: argparse takes "-inf" alone for a flag)
    assert message.startswith(f"--{name} must be "), message
    assert message.endswith(f"got {float(text)}"), message
    with pytest.raises(UserError, match=f"^--{name} must be "):
        Config(**{name: float(text)})  # the same rule where a Config is built directly (a saved config, a test)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_flag_refuses_numbers_beyond_float32(name):
    assert _one_line_error([f"--{name}", "1e39"]).startswith(f"--{name} must be ")


@pytest.mark.parametrize("name", INT_FIELDS)
def test_every_int_flag_has_an_upper_bound(name):
    message = _one_line_error([f"--{name}", str(10**13)])
    assert message.startswith(f"--{name} must be at most "), message
    assert message.endswith(f"got {10**13}"), message


@pytest.mark.parametrize("name", INT_FIELDS)
def test_int_flags_hold_integers(name):
    with pytest.raises(UserError, match=f"^--{name} must be an integer"):
        Config(**{name: float("nan")})


def test_where_off_or_unlimited_exists_the_message_names_its_spelling():
    assert "(None = no time budget)" in _one_line_error(["--time_budget_s", "inf"])
    assert "0 (no clipping)" in _one_line_error(["--grad_clip", "inf"])
    assert "0 (no cap)" in _one_line_error(["--logit_softcap", "inf"])
    assert "None = the GPU table" in _one_line_error(["--peak_flops", "inf"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seed", "-1"], "--seed must be zero or more, got -1"),
        (["--seed", str(2**32)], "--seed must be at most 4294967295"),
        (["--muon_ns_steps", "101"], "--muon_ns_steps must be at most 100"),
        (["--num_samples", "1001"], "--num_samples must be at most 1000"),
        (["--sample_tokens", "1000001"], "--sample_tokens must be at most 1e6"),
        (["--max_steps", str(10**12 + 1)], "--max_steps must be at most 1e12 (a larger count is a typo)"),
        (["--data_path", "a\x00b"], "--data_path 'a\\x00b' holds a NUL character"),
    ],
)
def test_int_bounds_and_text(argv, needle):
    assert needle in _one_line_error(argv)


def test_the_bounds_themselves_are_accepted():
    cfg = parse_args(["--seed", "0", "--muon_ns_steps", "100", "--max_steps", str(10**12), "--lr", "1e30"])
    assert (cfg.seed, cfg.muon_ns_steps, cfg.max_steps, cfg.lr) == (0, 100, 10**12, 1e30)
    assert parse_args(["--seed", str(2**32 - 1), "--dropout", "0.99", "--time_budget_s", "1e9"]).seed == 2**32 - 1


# Sizes that fit no machine


@pytest.mark.parametrize(
    "flag, value",
    [("embedding_dim", 1_000_000), ("num_blocks", 100_000), ("context_len", 10_000_000), ("batch_size", 10_000_000)],
)
def test_sizes_that_fit_no_machine_are_refused_with_what_fits(flag, value):
    message = _one_line_error([f"--{flag}", str(value)])
    assert "over the 1 TB limit" in message and f"--{flag} {value}" in message
    fits = int(message.rsplit(f"--{flag} ", 1)[1].split()[0])  # "... with the rest as given, --flag N would fit"
    assert message.endswith(f"--{flag} {fits} would fit")
    assert 0 < fits < value
    assert getattr(parse_args([f"--{flag}", str(fits)]), flag) == fits  # what it suggests is accepted
    step = 16 if flag == "embedding_dim" else 1  # (8 heads, an even head size for rotary positions)
    assert "over the 1 TB limit" in _one_line_error([f"--{flag}", str(fits + step)])  # and is the largest


def test_the_memory_estimate_is_the_documented_one():
    d, blocks, t, b, v = 1600, 48, 1024, 16, config.VOCAB_ESTIMATE["gpt2"]
    params = 12 * blocks * d * d + 2 * v * d
    assert config.estimated_params(blocks, d, t) == params
    assert config.estimated_bytes(blocks, d, t, b) == 16 * params + 128 * b * t * d * blocks + 12 * b * t * v
    learned = config.estimated_params(blocks, d, t, pos_emb="learned")
    assert learned == params + t * d


@pytest.mark.parametrize("tokenizer", ["gpt2", "o200k_base", "char"])
def test_big_real_shapes_are_not_refused(tokenizer):
    gpt2_xl = ["--num_blocks", "48", "--num_heads", "25", "--embedding_dim", "1600", "--batch_size", "16"]
    cfg = parse_args([*gpt2_xl, "--context_len", "1024", "--tokenizer", tokenizer, "--eval_steps", "200"])
    assert (cfg.num_blocks, cfg.embedding_dim, cfg.batch_size) == (48, 1600, 16)
    assert parse_args([*gpt2_xl, "--pos_emb", "learned", "--tokenizer", tokenizer]).pos_emb == "learned"
    assert parse_args(["--tokenizer", tokenizer]) == Config(tokenizer=tokenizer)  # the GPU defaults
    for name in PRESETS:
        if "init_from" not in PRESETS[name]:  # (pretrained weights fix their tokenizer: test_bad_init_from_...)
            parse_args(["--preset", name, "--tokenizer", tokenizer])


def test_two_typos_at_once_name_the_size_flags():
    message = _one_line_error(["--num_blocks", "100000", "--embedding_dim", "100000", "--num_heads", "10"])
    assert "over the 1 TB limit" in message and "lower several of --num_blocks, --embedding_dim" in message


def test_a_huge_width_is_refused_before_looking_for_a_divisor():
    """_divisor_near loops up to the width: a typo'd width must be refused by its size first."""
    message = _one_line_error(["--embedding_dim", str(10**12 - 1), "--num_heads", "7"])
    assert "over the 1 TB limit" in message and "--embedding_dim" in message


def test_an_evaluation_budget_of_tens_of_gigabytes_is_refused():
    message = _one_line_error(["--eval_steps", "1000000"])  # x batch 8 x context 1024: 8.2e9 tokens, 131 GB
    assert message.startswith("--eval_steps 1000000 x --batch_size 8 x --context_len 1024 = 8.19e+09 validation")
    most = int(message.rsplit("use --eval_steps ", 1)[1].split()[0])
    assert most * 8 * 1024 <= config.EVAL_TOKENS_CEILING < (most + 1) * 8 * 1024
    assert parse_args(["--eval_steps", str(most)]).eval_steps == most
    assert "--eval_steps" in _one_line_error(["--eval_steps", str(most + 1)])


# Run names


@pytest.mark.parametrize(
    "name, suggestion",
    [
        (".", "my-run"),
        ("..", "my-run"),
        (" .. ", "my-run"),
        ("...", "my-run"),
        ("-..-", "my-run"),
        ("", "my-run"),
        ("   ", "my-run"),
        ("a/b", "a-b"),
        ("../escape", "escape"),
        ("a\\b", "a-b"),
        ("a\x00b", "a-b"),
        ("/abs/path", "abs-path"),
        ("x" * 101, "x" * 100),
    ],
)
def test_unusable_run_names_are_refused_with_a_fixed_name(name, suggestion):
    message = _one_line_error([f"--run={name}"])
    assert message.startswith(f"--run {name!r} is not a usable folder name ("), message
    assert message.endswith(f"; use e.g. --run {suggestion}"), message
    assert parse_args(["--run", suggestion]).run == suggestion  # the suggestion itself is usable


@pytest.mark.parametrize("name", ["r", "a cool ablation", "v1.0", "lr=3e-4 (muon)", "日本語", "x" * 100, ".hidden"])
def test_usable_run_names_are_accepted(name):
    assert parse_args(["--run", name]).run == name


def test_a_saved_config_from_before_run_names_were_checked_still_loads():
    """Checkpoints hold the --run they were asked with (records made 'exp/lr' safe as 'exp-lr')."""
    saved = {**Config(run="r").to_dict(), "run": "exp/lr"}
    assert Config.from_dict(saved).run == "exp-lr"
    assert parse_args([], base=saved).run == "exp-lr"
    assert parse_args(["--run", "other"], base=saved).run == "other"
    assert "--run 'exp/lr'" in _one_line_error(["--run", "exp/lr"])  # but not when asked for now


# The checkpoints section


def test_overwrite_newer_is_declared_after_resume():
    names = list(FIELDS)
    assert names[names.index("resume") + 1] == "overwrite_newer"
    assert FIELDS["overwrite_newer"].metadata["on_resume"] == config.FREE
    assert Config().overwrite_newer is False
    assert parse_args(["--overwrite_newer", "True"]).overwrite_newer is True
    assert "--overwrite_newer" in build_parser().format_help()


# ----------------------------------------------------------------------------------------------------------------
# GPT-2's flags and --init_from (issue 15; the folder and download cases: test_export.py)


def test_gpt2_flags_change_weight_shapes_so_they_must_match_on_resume():
    from model import GPT

    base = dict(num_blocks=2, num_heads=2, embedding_dim=16, context_len=8)
    shapes = {n: p.shape for n, p in GPT(Config(**base), 65).state_dict().items()}
    for name, value in {"norm": "layernorm", "bias": True, "tie_embeddings": True}.items():
        other = {n: p.shape for n, p in GPT(Config(**{**base, name: value}), 65).state_dict().items()}
        assert other != shapes, name
        assert FIELDS[name].metadata["on_resume"] == config.MATCH, name
    assert FIELDS["activation"].metadata["on_resume"] == config.MATCH  # gelu_tanh: same shapes, other function
    assert FIELDS["init_from"].metadata["on_resume"] == config.FREE  # a resumed run has its weights


def test_init_from_a_gpt2_name_sets_its_flags_without_a_download():
    cfg = parse_args(["--init_from", "gpt2-medium", "--context_len", "256"])
    assert (cfg.num_blocks, cfg.num_heads, cfg.embedding_dim, cfg.context_len) == (24, 16, 1024, 256)
    assert {name: getattr(cfg, name) for name in config.GPT2_ARCHITECTURE} == config.GPT2_ARCHITECTURE
    assert parse_args(["--init_from", "gpt2-xl"]).context_len == 1024  # GPT-2's positions unless given
    assert parse_args(["--preset", "cpu", "--init_from", "gpt2"]).embedding_dim == 768  # over a preset's shape
    shakespeare = parse_args(["--preset", "gpt2-shakespeare"])
    assert shakespeare.init_from == "gpt2" and shakespeare.embedding_dim == 768 and not shakespeare.use_muon


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--init_from", "gpt3"], "neither a GPT-2 name"),
        (["--init_from", "gpt2", "--tokenizer", "char"], "leave out --tokenizer char"),
        (["--init_from", "gpt2", "--pos_emb", "rope"], "leave out --pos_emb rope"),
        (["--init_from", "gpt2", "--context_len", "2048"], "--context_len 1024 or less"),
        (["--norm", "batchnorm"], "--norm"),
    ],
)
def test_bad_init_from_and_gpt2_flags_are_one_line(argv, needle):
    assert needle in _one_line_error(argv)


def test_a_resumed_run_does_not_look_for_its_init_from_again():
    saved = parse_args(["--init_from", "gpt2"]).to_dict() | {"init_from": "/a/folder/since/deleted"}
    cfg = parse_args(["--resume", "models/r"], base=saved)
    assert cfg.init_from == "/a/folder/since/deleted" and cfg.embedding_dim == 768


def test_a_checkpoint_from_before_the_gpt2_flags_still_loads(tmp_path):
    """Its config.json lacks norm, bias and tie_embeddings; their defaults are the model it was saved with."""
    import json

    import torch
    from conftest import randomize, tiny_config

    from checkpoint import load_checkpoint, save_checkpoint
    from model import GPT
    from tokenizer import CharTokenizer

    model = randomize(GPT(tiny_config(), 5))
    folder = save_checkpoint(tmp_path, 1, model, CharTokenizer("abcde").to_dict())
    saved = json.loads((folder / "config.json").read_text())
    old = {name: value for name, value in saved.items() if name not in (*config.MATCH_ADDED_LATER, "init_from")}
    (folder / "config.json").write_text(json.dumps(old))
    loaded, _, _ = load_checkpoint(folder)
    assert all(torch.equal(loaded.state_dict()[n], p) for n, p in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# The data-limited techniques (issue 14): --smear, --bigram_embedding, --value_embeddings, --muon_ns_coeffs; each off
# by default


def test_the_techniques_are_off_by_default_and_their_resume_rules():
    for cfg in (Config(), parse_args([]), *(parse_args(["--preset", name]) for name in PRESETS)):
        assert (cfg.smear, cfg.bigram_embedding, cfg.value_embeddings, cfg.mtp_weight) == (False, False, False, 0.0)
        assert cfg.muon_ns_coeffs == "quintic"
    added = {"smear", "bigram_embedding", "value_embeddings", "mtp_weight"}
    assert all(FIELDS[name].metadata["on_resume"] == config.MATCH for name in added)  # they add weights
    assert added <= set(config.MATCH_ADDED_LATER)  # absent from older checkpoints: off
    assert FIELDS["muon_ns_coeffs"].metadata["on_resume"] == config.NOTICE  # the same weights, other dynamics
    cfg = parse_args(
        ["--smear", "True", "--bigram_embedding=1", "--tokenizer", "char", "--muon_ns_coeffs", "polar_express"]
    )
    assert (cfg.smear, cfg.bigram_embedding, cfg.muon_ns_coeffs) == (True, True, "polar_express")


@pytest.mark.parametrize("tokenizer", ["gpt2", "o200k_base"])
def test_a_bigram_table_of_a_large_vocabulary_is_one_line(tokenizer):
    message = _one_line_error(["--bigram_embedding", "True", "--tokenizer", tokenizer])
    assert f"--bigram_embedding needs a small vocabulary: {tokenizer}'s" in message
    assert "use --tokenizer char or --bigram_embedding False" in message
    assert parse_args(["--bigram_embedding", "False", "--tokenizer", tokenizer]).bigram_embedding is False


def test_a_negative_mtp_weight_is_one_line():
    assert "--mtp_weight must be 0 (off) or a positive weight no larger than 100" in _one_line_error(
        ["--mtp_weight", "-0.5"]
    )
    assert parse_args(["--mtp_weight", "0.3"]).mtp_weight == 0.3


def test_the_added_weights_cannot_start_from_gpt2():
    assert "leave out --smear" in _one_line_error(["--init_from", "gpt2", "--smear", "True"])
    assert "leave out --value_embeddings" in _one_line_error(["--init_from", "gpt2", "--value_embeddings", "True"])
    message = _one_line_error(["--init_from", "gpt2", "--bigram_embedding=1"])
    assert "--bigram_embedding needs a small vocabulary" in message


def test_an_unknown_ns_coefficient_set_is_one_line():
    assert "--muon_ns_coeffs" in _one_line_error(["--muon_ns_coeffs", "cubic"])
