"""`sp2dpo schedule` and `sp2dpo audit` (registered by sp2dpo.cli)."""

from __future__ import annotations

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, fail, run_and_report


def schedule_cmd(
    pairs: str = typer.Option(..., "--pairs", help="Pairs table (pairs.parquet from `sp2dpo data prepare`)."),
    annotations: str = typer.Option(..., "--annotations", help="Annotations: a directory of Parquet shards or one "
                                                               "file."),
    out: str = typer.Option(..., "--out", "-o", help="Artifact file to write (local path or s3://, gs://)."),
    control: str = typer.Option("semantic", "--control", help="semantic (SP2DPO) | global (every trained beta = beta0, "
                                                              "the same pairs as semantic) | shuffled."),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write the beta artifact: one beta_i per pair from the consensus of its annotations."""
    from sp2dpo.schedule.artifact import CONTROLS, build_artifact
    from sp2dpo.schedule.beta import ScheduleConfig

    if control not in CONTROLS:
        fail(f"--control must be one of {', '.join(CONTROLS)}, got {control!r}")
    cfg = build_config(ScheduleConfig, config, overrides, "schedule")
    run_and_report(lambda: build_artifact(pairs, annotations, out, cfg, control=control, show_progress=not as_json),
                   as_json, "schedule")


def audit_cmd(
    artifact: str = typer.Argument(..., help="A beta artifact written by `sp2dpo schedule`."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for report.md and the PNG plots."),
    as_json: bool = JsonOpt,
) -> None:
    """Write the audit report of a beta artifact: Markdown with statistics per category, and plots."""
    from sp2dpo.schedule.audit import write_audit

    run_and_report(lambda: write_audit(artifact, out, show_progress=not as_json), as_json, "audit")


def register(root: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    root.command("schedule")(schedule_cmd)
    root.command("audit")(audit_cmd)
