"""`sp2dpo data ...` commands."""

from __future__ import annotations

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, run_and_report

app = typer.Typer(help="Prepare the canonical pairs table (validation and quarantine).", no_args_is_help=True)


@app.command("prepare")
def prepare_cmd(
    inputs: list[str] = typer.Argument(None, help="JSONL/JSON/Parquet files, saved HF dataset dirs, or bundled names "
                                                  "(ultrafeedback-sample)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory (local path or s3://, gs://)."),
    engine: str = typer.Option(None, help="local | ray | auto (Ray Data above ray_min_bytes of input)."),
    limit: int = typer.Option(None, help="Keep at most N valid pairs."),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write OUT/pairs.parquet and OUT/quarantine.parquet: every input row lands in exactly one."""
    from sp2dpo.data.prepare import DataConfig, prepare

    cfg = build_config(DataConfig, config, overrides, "data", inputs=inputs or None, out=out, engine=engine,
                       limit=limit)
    run_and_report(lambda: prepare(cfg, show_progress=not as_json), as_json, "data prepare")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")
