"""Each setting documented once: Field descriptions on the config classes, rendered into the docs'
option tables and the commands' --help; the docs and the schema cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sp2dpo.cli import CONFIG_OF_COMMAND, app
from sp2dpo.config_docs import main as config_docs_main
from sp2dpo.config_docs import missing_descriptions, options_table, pages, render
from sp2dpo.pipeline.config import PipelineConfig
from sp2dpo.pipeline.runner import load_object
from sp2dpo.pipeline.stages import default_stages

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCUMENTED = ["sp2dpo.pipeline.config:PipelineConfig", "sp2dpo.pipeline.config:Student"]


@pytest.mark.parametrize("path", DOCUMENTED)
def test_every_setting_has_a_description(path):
    assert missing_descriptions(load_object(path)) == []


@pytest.mark.parametrize("path", DOCUMENTED)
def test_every_config_has_an_option_table_in_the_docs(path):
    assert any(f"<!-- options: {path} -->" in page.read_text() for page in DOCS.glob("*.md")), path


def test_the_option_tables_match_the_schema():
    assert pages(DOCS), "no page has an option table"
    assert config_docs_main(["--check"]) == 0


def test_a_table_that_drifted_from_its_schema_is_found():
    page = DOCS / "pipeline.md"
    text = page.read_text()
    drifted = text.replace("| `run_dir` | str |", "| `run_dir` | int |", 1)
    assert drifted != text and render(drifted) == text


def test_the_table_renders_types_defaults_and_descriptions():
    table = options_table(PipelineConfig)
    assert "| `global_betas` | list[float] | `[0.01, 0.05, 0.1]` | The grid's global-β sweep" in table
    assert "| `controls` | list[semantic \\| global \\| shuffled] |" in table
    assert "| `until` | str \\| None | `null` |" in table


def test_help_lists_the_config_keys_from_the_schema():
    result = CliRunner().invoke(app, ["pipeline", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Config keys" in result.output
    for name, field in PipelineConfig.model_fields.items():
        assert f"{name} = " in result.output
        assert field.description.split()[0] in result.output


@pytest.mark.parametrize("command", sorted(CONFIG_OF_COMMAND))
def test_every_configured_command_names_a_config_class(command):
    assert issubclass(load_object(CONFIG_OF_COMMAND[command]), PipelineConfig.__mro__[1])  # a StageConfig


def test_the_stage_table_of_docs_pipeline_names_the_pipelines_stages():
    """docs/pipeline.md's stage table lists exactly the stages the default pipeline runs."""
    text = (DOCS / "pipeline.md").read_text()
    table = text[text.index("| stage | does | writes |"):].split("\n\n")[0]
    documented = [re.match(r"\| `([^`]+)`", row).group(1) for row in table.splitlines()[2:]]
    config = PipelineConfig()
    actual = [s.name for s in default_stages(config)]
    patterns = [re.compile("^" + re.escape(d).replace(re.escape("<control>"), "(" + "|".join(config.controls) + ")")
                           + "$") for d in documented]
    assert all(any(p.match(name) for name in actual) for p in patterns), (documented, actual)
    assert all(any(p.match(name) for p in patterns) for name in actual), (documented, actual)
