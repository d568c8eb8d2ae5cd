"""Each setting documented once: Field descriptions on every config class, rendered into the docs'
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
# Every config class a user writes, and the page holding its option table.
PAGES = {
    "sp2dpo.data.config:DataConfig": "data.md",
    "sp2dpo.annotate.config:AnnotateConfig": "annotate.md",
    "sp2dpo.annotate.config:GenerationOptions": "annotate.md",
    "sp2dpo.annotate.config:RatingsOptions": "annotate.md",
    "sp2dpo.annotate.config:VLLMOptions": "annotate.md",
    "sp2dpo.annotate.config:OpenAIOptions": "annotate.md",
    "sp2dpo.annotate.config:TransformersOptions": "annotate.md",
    "sp2dpo.annotate.config:PoolOptions": "annotate.md",
    "sp2dpo.schedule.config:ScheduleConfig": "schedule.md",
    "sp2dpo.train.config:TrainConfig": "train.md",
    "sp2dpo.train.reference:ReferenceConfig": "train.md",
    "sp2dpo.serve.config:ServeConfig": "serve.md",
    "sp2dpo.serve.config:ModelConfig": "serve.md",
    "sp2dpo.serve.config:AutoscalingConfig": "serve.md",
    "sp2dpo.evaluate.config:EvaluateConfig": "evaluate.md",
    "sp2dpo.pipeline.config:PipelineConfig": "pipeline.md",
    "sp2dpo.pipeline.config:Student": "pipeline.md",
}


@pytest.mark.parametrize("path", sorted(PAGES))
def test_every_setting_is_described_and_has_its_option_table(path):
    assert missing_descriptions(load_object(path)) == []
    assert f"<!-- options: {path} -->" in (DOCS / PAGES[path]).read_text()


def test_every_command_s_config_is_documented():
    assert set(CONFIG_OF_COMMAND.values()) <= set(PAGES)


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


@pytest.mark.parametrize(("command", "flag", "path", "field"), [
    (["train"], "--num-workers", "sp2dpo.train.config:TrainConfig", "num_workers"),
    (["annotate"], "--teacher", "sp2dpo.annotate.config:AnnotateConfig", "teacher"),
    (["data", "prepare"], "--engine", "sp2dpo.data.config:DataConfig", "engine"),
    (["serve"], "--port", "sp2dpo.serve.config:ServeConfig", "port"),
    (["evaluate", "score"], "--glm", "sp2dpo.evaluate.config:EvaluateConfig", "glm"),
])
def test_a_flag_that_sets_a_config_field_has_the_field_s_description_as_help(command, flag, path, field):
    # rich sizes the help panel from COLUMNS (terminal_width is click's): wide enough that no help text wraps.
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # The options panel only: the config-keys list below it repeats every description anyway.
    options = " ".join(result.output.split("Config keys")[0].split())
    description = " ".join(load_object(path).model_fields[field].description.split())
    assert f"{flag} " in options and description in options, options
