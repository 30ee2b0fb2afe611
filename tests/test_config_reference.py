"""README's configuration reference is generated from the schema and kept current."""

import pytest

from forge.docs import END, README, START, reference, render


def test_readme_configuration_reference_is_up_to_date():
    current = README.read_text()
    assert render(current) == current, "README.md config reference is stale: run python -m forge.docs"


def test_every_config_key_is_in_the_reference():
    from forge.config import Config

    text = reference()
    for section in ("model", "env", "rollout", "train", "trainer", "reward", "async", "sandbox", "logging"):
        assert f"#### `{section}`" in text
    for key in Config.model_fields["train"].annotation.model_fields:
        assert f"`train.{key}`" in text


def test_render_replaces_only_the_marked_section():
    text = f"intro\n{START}\nold table\n{END}\noutro\n"
    rendered = render(text)
    assert rendered.startswith("intro\n") and rendered.endswith(f"{END}\noutro\n")
    assert "old table" not in rendered


def test_a_readme_without_markers_says_what_to_add():
    with pytest.raises(ValueError, match="config-reference:start"):
        render("no markers here")
