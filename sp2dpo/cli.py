"""The `sp2dpo` command line: one subcommand per stage.

    sp2dpo data prepare ultrafeedback-sample --out runs/data
    sp2dpo annotate --pairs runs/data/pairs.parquet --teacher ratings --out runs/ann
    sp2dpo schedule --pairs ... --annotations ... --out runs/beta.parquet
    sp2dpo audit runs/beta.parquet --out runs/audit
    sp2dpo train --config cfg.yaml
    sp2dpo serve --config cfg.yaml
    sp2dpo evaluate generate|judge|score|compare ...
    sp2dpo pipeline --config demo
    sp2dpo demo

Each stage module registers its own commands and imports its heavy dependencies (torch, Ray,
vLLM) inside them, so `sp2dpo --help` stays fast.
"""

import typer

from sp2dpo import __version__
from sp2dpo.annotate import cli as annotate_cli
from sp2dpo.data import cli as data_cli
from sp2dpo.evaluate import cli as evaluate_cli
from sp2dpo.pipeline import cli as pipeline_cli
from sp2dpo.schedule import cli as schedule_cli
from sp2dpo.serve import cli as serve_cli
from sp2dpo.train import cli as train_cli

app = typer.Typer(
    name="sp2dpo",
    help="Semantic Per-Pair DPO: annotate pairs, schedule beta_i, train, serve and evaluate on Ray.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

for stage in (data_cli, annotate_cli, schedule_cli, train_cli, serve_cli, evaluate_cli, pipeline_cli):
    stage.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """Semantic Per-Pair DPO on Ray."""


if __name__ == "__main__":
    app()
