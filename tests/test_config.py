"""config.py: defaults, the CLI grammar, presets, and one-line errors."""

from __future__ import annotations

import dataclasses

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
