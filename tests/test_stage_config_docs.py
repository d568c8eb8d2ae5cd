"""The data, annotate, schedule, evaluate and serve settings are documented once: every field has
a description, and each config class has its option table in the stage's docs page (the tables'
agreement with the schema is checked for every page by tests/test_config_docs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sp2dpo.config_docs import missing_descriptions
from sp2dpo.pipeline.runner import load_object

DOCS = Path(__file__).resolve().parents[1] / "docs"
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
    "sp2dpo.evaluate.config:EvaluateConfig": "evaluate.md",
    "sp2dpo.serve.config:ServeConfig": "serve.md",
    "sp2dpo.serve.config:ModelConfig": "serve.md",
    "sp2dpo.serve.config:AutoscalingConfig": "serve.md",
}


@pytest.mark.parametrize("path", sorted(PAGES))
def test_every_stage_setting_is_described_and_tabled(path):
    assert missing_descriptions(load_object(path)) == []
    assert f"<!-- options: {path} -->" in (DOCS / PAGES[path]).read_text()
