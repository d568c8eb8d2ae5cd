"""`sp2dpo evaluate generate|judge|score|compare` (registered by sp2dpo.cli)."""

from __future__ import annotations

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, field_option, run_and_report
from sp2dpo.evaluate.config import EvaluateConfig

app = typer.Typer(help="AlpacaEval 2.0: generate, judge, score (win rate and LC win rate), compare runs.",
                  no_args_is_help=True)

OutOpt = field_option(EvaluateConfig, "out", "--out", "-o")
LimitOpt = field_option(EvaluateConfig, "limit")
ConcurrencyOpt = field_option(EvaluateConfig, "concurrency")
GlmOpt = field_option(EvaluateConfig, "glm")
DifficultyOpt = field_option(EvaluateConfig, "instruction_difficulty", "--instruction-difficulty")
GamedOpt = field_option(EvaluateConfig, "df_gamed", "--df-gamed")
MissingOpt = field_option(EvaluateConfig, "allow_missing", "--allow-missing")


def _cfg(**values):
    config, overrides = values.pop("config"), values.pop("overrides")
    return build_config(EvaluateConfig, config, overrides, "evaluate", **values)


@app.command("generate")
def generate_cmd(
    endpoint: str = field_option(EvaluateConfig, "endpoint"),
    model: str = field_option(EvaluateConfig, "model"),
    name: str = field_option(EvaluateConfig, "name"),
    out: str = OutOpt,
    limit: int = LimitOpt,
    max_tokens: int = field_option(EvaluateConfig, "max_tokens"),
    concurrency: int = ConcurrencyOpt,
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Answer the AlpacaEval 2.0 instructions with a served model: OUT/model_outputs.json (resumable)."""
    from sp2dpo.evaluate.run import generate

    cfg = _cfg(config=config, overrides=overrides, endpoint=endpoint, model=model, name=name, out=out, limit=limit,
               max_tokens=max_tokens, concurrency=concurrency)
    run_and_report(lambda: generate(cfg, show_progress=not as_json), as_json, "evaluate generate")


@app.command("judge")
def judge_cmd(
    model_outputs: str = typer.Argument(..., help="model_outputs.json (AlpacaEval format)."),
    endpoint: str = typer.Option(None, help="Judge's OpenAI-compatible base URL."),
    model: str = typer.Option(None, help="Judge model id (gpt-4-1106-preview = the leaderboard's judge)."),
    out: str = OutOpt,
    limit: int = LimitOpt,
    seed: int = field_option(EvaluateConfig, "seed"),
    concurrency: int = ConcurrencyOpt,
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Judge each output against the gpt4_1106_preview reference: OUT/annotations.json (resumable)."""
    from sp2dpo.evaluate.run import judge

    cfg = _cfg(config=config, overrides=overrides, judge_endpoint=endpoint, judge_model=model, out=out, limit=limit,
               seed=seed, concurrency=concurrency)
    run_and_report(lambda: judge(cfg, model_outputs, show_progress=not as_json), as_json, "evaluate judge")


@app.command("score")
def score_cmd(
    annotations: str = typer.Argument(..., help="annotations.json (AlpacaEval format)."),
    glm: str = GlmOpt,
    instruction_difficulty: str = DifficultyOpt,
    df_gamed: str = GamedOpt,
    allow_missing: bool = MissingOpt,
    out: str = typer.Option(None, "--out", "-o", help="Also write the summary to this JSON file."),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Win rate, its standard error, discrete win rate, average length and LC win rate."""
    from sp2dpo.evaluate.score import score_annotations

    cfg = _cfg(config=config, overrides=overrides, glm=glm, instruction_difficulty=instruction_difficulty,
               df_gamed=df_gamed, allow_missing=allow_missing or None)

    def run() -> dict:
        summary = score_annotations(annotations, glm=cfg.glm, instruction_difficulty=cfg.instruction_difficulty,
                                    df_gamed=cfg.df_gamed, allow_missing=cfg.allow_missing, eval_set=cfg.eval_set,
                                    hub_files=cfg.hub_files, lc_min_instructions=cfg.lc_min_instructions)
        if out:
            from sp2dpo.storage import write_json

            write_json(out, summary)
        return summary

    run_and_report(run, as_json, "evaluate score")


@app.command("compare")
def compare_cmd(
    runs: list[str] = typer.Argument(..., help="NAME=DIR (or DIR, or annotations.json) per run, e.g. "
                                               "base=runs/eval/base."),
    out: str = OutOpt,
    glm: str = GlmOpt,
    instruction_difficulty: str = DifficultyOpt,
    df_gamed: str = GamedOpt,
    allow_missing: bool = MissingOpt,
    baseline: str = typer.Option(None, "--baseline", help="Run NAME the others are compared with (default: the first "
                                                          "run)."),
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Table (WR, LC WR, ± SE, avg length), paired ΔWR / ΔLC with 95% CIs against a baseline run, PNG chart."""
    from sp2dpo.evaluate.compare import compare

    cfg = _cfg(config=config, overrides=overrides, out=out, glm=glm, instruction_difficulty=instruction_difficulty,
               df_gamed=df_gamed, allow_missing=allow_missing or None, baseline_run=baseline)
    run_and_report(lambda: compare(runs, cfg), as_json, "evaluate compare")


def register(root: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    root.add_typer(app, name="evaluate")
