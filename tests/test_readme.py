"""The README stays true: every flag is in its table, and the test command it gives is the one CI runs."""

from config import FIELDS, PRESETS
from tests.conftest import REPO


def test_every_flag_and_preset_is_documented():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in FIELDS if f"`--{name}`" not in readme]
    assert not missing, f"README's flags table lacks {missing}"
    assert all(f"`{name}`" in readme for name in PRESETS)


def test_ci_runs_the_readme_test_command():
    assert "uv run pytest" in (REPO / "README.md").read_text()
    assert "uv run pytest" in (REPO / ".ci" / "run").read_text()
