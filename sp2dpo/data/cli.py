"""`sp2dpo data ...` commands."""

from __future__ import annotations

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, field_option, run_and_report
from sp2dpo.data.config import DataConfig

app = typer.Typer(help="Prepare the canonical pairs table (validation and quarantine).", no_args_is_help=True)


@app.command("prepare")
def prepare_cmd(
    inputs: list[str] = typer.Argument(None, help="JSONL/JSON/Parquet files, saved HF dataset dirs, or bundled names "
                                                  "(ultrafeedback-sample)."),
    out: str = field_option(DataConfig, "out", "--out", "-o"),
    engine: str = field_option(DataConfig, "engine"),
    limit: int = field_option(DataConfig, "limit"),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write OUT/pairs.parquet and OUT/quarantine.parquet: every input row lands in exactly one."""
    from sp2dpo.data.prepare import prepare

    cfg = build_config(DataConfig, config, overrides, "data", inputs=inputs or None, out=out, engine=engine,
                       limit=limit)
    run_and_report(lambda: prepare(cfg, show_progress=not as_json), as_json, "data prepare")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")
