"""`sp2dpo annotate` (registered by sp2dpo.cli)."""

from __future__ import annotations

import typer

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, field_option, run_and_report


def annotate_cmd(
    pairs: str = field_option(AnnotateConfig, "pairs", "--pairs", "-p"),
    teacher: str = field_option(AnnotateConfig, "teacher", "--teacher", "-t"),
    model: str = field_option(AnnotateConfig, "model", "--model", "-m"),
    prompt_version: str = field_option(AnnotateConfig, "prompt_version", "--prompt-version"),
    out: str = field_option(AnnotateConfig, "out", "--out", "-o"),
    limit: int = field_option(AnnotateConfig, "limit", "--limit"),
    retry_failed: bool = field_option(AnnotateConfig, "retry_failed", "--retry-failed/--no-retry-failed"),
    base_url: str = typer.Option(None, "--base-url", help="openai teacher: the server's /v1 URL."),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Annotate pairs with a teacher; resumable: a rerun skips what is done and finishes the rest."""
    extra = list(overrides or [])
    if base_url is not None:
        extra.append(f"openai.base_url={base_url}")
    cfg = build_config(AnnotateConfig, config, extra, "annotate", pairs=pairs, teacher=teacher, model=model,
                       prompt_version=prompt_version, out=out, limit=limit, retry_failed=retry_failed)

    def run() -> dict:
        from sp2dpo.annotate.run import annotate

        return annotate(cfg, show_progress=not as_json)

    run_and_report(run, as_json, "annotate")


def register(root: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    root.command("annotate")(annotate_cmd)
