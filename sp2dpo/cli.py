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

# The config class behind each command: its `--help` ends with the class's settings, rendered from
# their Field descriptions (sp2dpo.config_docs), the same text as the option tables in docs/.
CONFIG_OF_COMMAND = {
    "data prepare": "sp2dpo.data.config:DataConfig",
    "annotate": "sp2dpo.annotate.config:AnnotateConfig",
    "schedule": "sp2dpo.schedule.config:ScheduleConfig",
    "train": "sp2dpo.train.config:TrainConfig",
    "train reference": "sp2dpo.train.reference:ReferenceConfig",
    "serve": "sp2dpo.serve.config:ServeConfig",
    **{f"evaluate {sub}": "sp2dpo.evaluate.config:EvaluateConfig" for sub in ("generate", "judge", "score", "compare")},
    "pipeline": "sp2dpo.pipeline.config:PipelineConfig",
    "demo": "sp2dpo.pipeline.config:PipelineConfig",
}


def _with_config_help(config_path: str, base: type) -> type:
    """A typer command (or group) class whose help ends with the settings of `config_path`,
    imported only when the help is shown (so `sp2dpo <cmd>` itself stays fast)."""

    class ConfiguredCommand(base):
        @property
        def epilog(self) -> str:
            from sp2dpo.config_docs import options_help
            from sp2dpo.pipeline.runner import load_object

            return options_help(load_object(config_path))

        @epilog.setter
        def epilog(self, value: str | None) -> None:  # click's __init__ assigns it; ours wins
            pass

    return ConfiguredCommand


def _attach_config_help(typer_app: typer.Typer, prefix: str = "") -> None:
    from typer.core import TyperCommand, TyperGroup

    for info in typer_app.registered_commands:
        name = f"{prefix}{info.name or info.callback.__name__}"
        if name in CONFIG_OF_COMMAND:
            info.cls = _with_config_help(CONFIG_OF_COMMAND[name], TyperCommand)
    for group in typer_app.registered_groups:
        name = f"{prefix}{group.name}"
        if name in CONFIG_OF_COMMAND:  # a group that is a command too (`sp2dpo train`)
            group.cls = _with_config_help(CONFIG_OF_COMMAND[name], TyperGroup)
        _attach_config_help(group.typer_instance, f"{name} ")


_attach_config_help(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version.")) -> None:
    """Semantic Per-Pair DPO on Ray."""


if __name__ == "__main__":
    app()
