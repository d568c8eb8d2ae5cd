"""`sp2dpo train` commands (registered by sp2dpo.cli).

    sp2dpo train --config train.yaml [--set key=value ...] [--json]      train (Ray Train)
    sp2dpo train reference --artifact A --pairs P --model M [--out O]    offline reference log-probs
"""

from __future__ import annotations

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, field_option, run_and_report
from sp2dpo.train.config import TrainConfig

app = typer.Typer(help="Per-pair DPO training (Ray Train + DeepSpeed) and offline reference log-probs.",
                  invoke_without_command=True)


@app.callback()
def train_cmd(
    ctx: typer.Context,
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    artifact: str = field_option(TrainConfig, "artifact"),
    pairs: str = field_option(TrainConfig, "pairs"),
    model: str = field_option(TrainConfig, "model"),
    out: str = field_option(TrainConfig, "out", "--out", "-o"),
    output_dir: str = typer.Option(None, "--output-dir", hidden=True, help="Deprecated name of --out."),
    num_workers: int = field_option(TrainConfig, "num_workers"),
    as_json: bool = JsonOpt,
) -> None:
    """Train with β_i read per pair: `sp2dpo train --config train.yaml`."""
    if ctx.invoked_subcommand is not None:
        return
    from sp2dpo.train.trainer import train

    cfg = build_config(TrainConfig, config, overrides, "train", artifact=artifact, pairs=pairs, model=model,
                       out=out or output_dir, num_workers=num_workers)
    run_and_report(lambda: train(cfg, show_progress=not as_json), as_json, "train")


@app.command("reference")
def reference_cmd(
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    artifact: str = typer.Option(None, help="β artifact to add reference log-probs to."),
    pairs: str = typer.Option(None, help="Pairs table the artifact was built for."),
    model: str = typer.Option(None, help="Reference model: a local HF dir or `smollm2`."),
    out: str = typer.Option(None, "--out", "-o", help="Output artifact (default: ARTIFACT with a .ref suffix)."),
    engine: str = typer.Option(None, help="local | ray (Ray Data map_batches over scorer actors)."),
    num_workers: int = typer.Option(None, help="Ray Data scorer actors."),
    max_length: int = typer.Option(None, help="Token limit; must equal training's max_length."),
    as_json: bool = JsonOpt,
) -> None:
    """Score every trained pair with the reference model; write the artifact with ref_*_logps."""
    from sp2dpo.train.reference import ReferenceConfig, compute_reference

    cfg = build_config(ReferenceConfig, config, overrides, "reference", artifact=artifact, pairs=pairs, model=model,
                       out=out, engine=engine, num_workers=num_workers, max_length=max_length)
    run_and_report(lambda: compute_reference(cfg, show_progress=not as_json), as_json, "train reference")


def register(root: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    root.add_typer(app, name="train")
