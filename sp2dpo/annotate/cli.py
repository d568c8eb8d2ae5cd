"""`sp2dpo annotate` (registered by sp2dpo.cli)."""

from __future__ import annotations

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, run_and_report


def annotate_cmd(
    pairs: str = typer.Option(None, "--pairs", "-p", help="pairs.parquet, or the directory `sp2dpo data prepare` "
                                                          "wrote."),
    teacher: str = typer.Option(None, "--teacher", "-t", help="ratings (default, no LLM) | vllm | openai | "
                                                              "transformers."),
    model: str = typer.Option(None, "--model", "-m", help="Model path or id (LLM teachers; default: bundled "
                                                          "SmolLM2-135M-Instruct). For openai: the served model name."),
    prompt_version: str = typer.Option(None, "--prompt-version", help="Teacher prompt: v2 (default) or v2-swapped "
                                                                      "(fenced); v1, v1-swapped (unfenced, earlier "
                                                                      "runs)."),
    out: str = typer.Option(None, "--out", "-o", help="Annotations directory (local path or s3://, gs://); shards go "
                                                      "to OUT/<teacher>/<prompt_version>/."),
    limit: int = typer.Option(None, "--limit", help="Only the first N pairs of the input."),
    retry_failed: bool = typer.Option(None, "--retry-failed/--no-retry-failed",
                                      help="Re-ask the pairs whose annotation failed."),
    base_url: str = typer.Option(None, "--base-url", help="openai teacher: the server's /v1 URL."),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Annotate pairs with a teacher; resumable: a rerun skips what is done and finishes the rest."""
    from sp2dpo.annotate.config import AnnotateConfig

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
