"""`sp2dpo pipeline` and `sp2dpo demo` (registered by sp2dpo.cli)."""

from __future__ import annotations

from typing import Any

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, fail, run_and_report

VerboseOpt = typer.Option(False, "--verbose", "-v", help="Stream Ray, vLLM, Serve and worker output to the terminal "
                          "instead of run_dir/logs/<stage>.log.")


def run(config: Any, until: str | None = None, force: list[str] | None = None, dry_run: bool = False,
        stages: list | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run (or with dry_run, plan) the pipeline; return the summary the CLI prints. Library output
    goes to `run_dir/logs/<stage>.log` unless `verbose`."""
    from sp2dpo.pipeline.runner import MANIFEST, run_pipeline
    from sp2dpo.pipeline.stages import default_stages
    from sp2dpo.storage import join_uri

    results = run_pipeline(config, stages if stages is not None else default_stages(config), config.run_dir,
                           until=until or config.until, force=list(force or config.force), dry_run=dry_run,
                           verbose=verbose)
    summary: dict[str, Any] = {
        "run_dir": config.run_dir,
        "stages": {r.name: {"status": r.status, "path": r.path, "seconds": r.seconds} for r in results},
        "ran": [r.name for r in results if r.status == "ran"],
        "complete": [r.name for r in results if r.status == "complete"],
    }
    if dry_run:
        summary["pending"] = [r.name for r in results if r.status == "pending"]
    else:
        summary["manifest"] = join_uri(config.run_dir, MANIFEST)
    return summary


def _run_cli(cfg: Any, until: str | None, force: list[str] | None, dry_run: bool, as_json: bool, title: str,
             verbose: bool) -> None:
    from sp2dpo.pipeline.runner import ERROR_FILE, StageFailed

    def go() -> dict[str, Any]:
        try:
            summary = run(cfg, until, force, dry_run, verbose=verbose)
        except StageFailed as exc:
            fail(f"{exc}\n  traceback: {exc.path}/{ERROR_FILE}\n"
                 "  finished stages are kept: rerun the same command to resume after them.", code=1)
        if as_json:
            return summary
        if title == "demo":  # its stage lines said it all; the comparison follows
            return {"run_dir": summary["run_dir"], "logs": f"{summary['run_dir']}/logs"}
        # One row per stage reads better than the nested dict.
        rows = {name: f"{s['status']} {s['seconds']:.1f} s  {s['path']}" for name, s in summary["stages"].items()}
        return {"run_dir": summary["run_dir"], **rows,
                **({"manifest": summary["manifest"]} if "manifest" in summary else {})}

    run_and_report(go, as_json, title)


def pipeline_cmd(
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    until: str = typer.Option(None, help="Stop after this stage (data, annotate, schedule, reference, train-<control>, "
                                         "...; with students: reference-<student>, train-<student>-<artifact>-s<seed>, "
                                         "evaluate-<student>)."),
    force: list[str] = typer.Option(None, help="Rerun this stage even if it is complete (repeatable)."),
    dry_run: bool = typer.Option(False, "--plan",
                                 help="Show each stage's output dir and whether it is complete; run nothing."),
    as_json: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run every stage whose outputs are not complete yet; a rerun resumes after the last finished stage."""
    from sp2dpo.pipeline.config import PipelineConfig

    if not config:
        fail("--config is required (a pipeline YAML, or a packaged name such as `demo`)")
    cfg = build_config(PipelineConfig, config, overrides, "pipeline")
    _run_cli(cfg, until, force, dry_run, as_json, "pipeline", verbose)


def demo_cmd(
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """The whole pipeline on the packaged CPU demo config (SmolLM2-135M, tens of pairs)."""
    from sp2dpo.pipeline.config import PipelineConfig

    cfg = build_config(PipelineConfig, "demo", overrides, "pipeline")
    _run_cli(cfg, None, None, False, as_json, "demo", verbose)
    if not as_json:
        _print_demo_report(cfg.run_dir)


def _print_demo_report(run_dir: str) -> None:
    """What a person wants at the end of the demo: the comparison and where the audit lives."""
    from sp2dpo import storage

    manifest = storage.read_json(storage.join_uri(storage.absolute(run_dir), "pipeline.json"))
    paths = {s["name"]: s["path"] for s in manifest["stages"]}
    typer.echo("")
    typer.echo(storage.read_text(storage.join_uri(paths["compare"], "comparison.md")))
    audit = storage.join_uri(paths["schedule"], "audit")
    typer.echo(f"audit report: {storage.join_uri(audit, 'report.md')}")
    for plot in storage.list_files(audit, suffix=".png"):
        typer.echo(f"audit plot:   {plot}")
    typer.echo(f"comparison:   {storage.join_uri(paths['compare'], 'comparison.png')}")


def register(root: typer.Typer) -> None:
    root.command("pipeline")(pipeline_cmd)
    root.command("demo")(demo_cmd)
