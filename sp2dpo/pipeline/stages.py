"""The SP²DPO pipeline as a list of stages over the stage Python APIs.

    data → annotate (every teacher) → schedule (semantic + global + shuffled artifacts, audit)
         → reference (offline reference log-probs per artifact) → train-<control> (one student each)
         → evaluate (one Serve app hosts base, students and judge; generate, judge, score) → compare

With `students:` (the experiment grid, sp2dpo/pipeline/grid.py) the same stage functions run as

    data → annotate → schedule (semantic, shuffled, one global-β artifact per β: shared)
         → reference-<student> (one pass per backbone, shared by its arms)
         → train-<student>-<arm>-s<seed> → evaluate-<student> → compare (comparison.json/.md/.png)

Each function below only maps the pipeline's dirs onto one stage API call; the logic lives in the
stage packages. A stage API that this installation lacks raises StageUnavailable when the
pipeline is planned, before anything runs.
"""

from __future__ import annotations

from typing import Any

from sp2dpo.pipeline.config import PipelineConfig
from sp2dpo.pipeline.runner import Stage, StageDir, load_object
from sp2dpo.storage import read_sp2dpo_metadata, write_json, write_parquet
from sp2dpo.utils import deep_merge

TRAIN_CONFIG = "sp2dpo.train.config:TrainConfig"
EVALUATE_CONFIG = "sp2dpo.evaluate.config:EvaluateConfig"
RUN_LABELS = {"base": "base", "semantic": "sp2dpo", "global": "dpo-global", "shuffled": "shuffled-beta"}


def with_paths(cfg: Any, **paths: Any) -> Any:
    """A copy of a stage config with the pipeline's paths filled in (validated: a renamed field
    is an error here, not a silently ignored attribute)."""
    return type(cfg).model_validate({**cfg.model_dump(), **paths})


def run_data(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    from sp2dpo.data.prepare import prepare

    return prepare(with_paths(sd.config, out=sd.path))


def run_annotate(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    """Every teacher writes into this one dir; the schedule's consensus step reads them all."""
    annotate = load_object("sp2dpo.annotate:annotate")
    base = sd.config.model_dump()
    paths = {"pairs": sd.input_path("data", "pairs.parquet"), "out": sd.path}
    summaries = {}
    for override in sd.params["teachers"] or [{}]:
        cfg = type(sd.config).model_validate(deep_merge(base, {**override, **paths}))
        summaries[f"{cfg.resolved_teacher_name}/{cfg.resolved_prompt_version}"] = annotate(cfg)
    return summaries


def run_schedule(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    """One artifact per entry of params `artifacts` (the grid's shared set), else per control."""
    build_artifact = load_object("sp2dpo.schedule:build_artifact")
    write_audit = load_object("sp2dpo.schedule.audit:write_audit")
    pairs = sd.input_path("data", "pairs.parquet")
    annotations = sd.input_path("annotate")
    specs = sd.params.get("artifacts") or {control: {"control": control} for control in config.controls}
    summary: dict[str, Any] = {}
    for name, spec in specs.items():
        summary[name] = build_artifact(pairs, annotations, sd.join(f"beta-{name}.parquet"), sd.config, **spec)
    audited = "semantic" if "semantic" in specs else next(iter(specs))
    summary["audit"] = write_audit(sd.join(f"beta-{audited}.parquet"), sd.join("audit"))
    return summary


def run_reference(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    """Reference log-probs for each control's artifact; training then holds no reference model.

    Model, max_length and dtype are training's (the artifact records them and training checks).
    The controls share pairs and differ in β, so one pass serves every artifact whose rows
    (pair, flipped, dropped) are the same; only a different flip or drop set gets its own pass.
    """
    compute_reference = load_object("sp2dpo.train.reference:compute_reference")
    from sp2dpo.schedule.artifact import REF_LOGP_COLUMNS, read_artifact

    scored: list[tuple[Any, str]] = []  # (rows key table, scored artifact path)
    summaries: dict[str, Any] = {}
    for control in sd.params.get("artifacts") or config.controls:
        source, out = sd.input_path("schedule", f"beta-{control}.parquet"), sd.join(f"beta-{control}.parquet")
        table, metadata = read_artifact(source)
        rows = table.select(["pair_id", "flipped", "dropped"])
        match = next((path for key, path in scored if key.equals(rows)), None)
        if match is None:
            cfg = with_paths(sd.config, artifact=source, pairs=sd.input_path("data", "pairs.parquet"), out=out,
                             **sd.params["train"])
            summaries[control] = compute_reference(cfg)
            scored.append((rows, out))
            continue
        done, done_metadata = read_artifact(match)
        for name in REF_LOGP_COLUMNS:
            table = table.append_column(name, done[name])
        write_parquet(table, out, {**metadata, "reference": done_metadata["reference"]})
        summaries[control] = {"artifact": out, "reused_from": match}
    return summaries


def run_train(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    """One student on one artifact; a grid arm also sets its student's model and its seed."""
    train = load_object("sp2dpo.train.trainer:train")
    control = sd.params["control"]
    artifact = sd.params.get("artifact", control)
    reference = sd.params.get("reference_stage", "reference")
    arm = {k: sd.params[k] for k in ("model", "seed") if k in sd.params}
    return train(with_paths(sd.config, artifact=sd.input_path(reference, f"beta-{artifact}.parquet"),
                            pairs=sd.input_path("data", "pairs.parquet"), out=sd.path,
                            name=f"sp2dpo-{sd.name}", compute_reference=False, **arm))


def evaluation_runs(config: PipelineConfig, sd: StageDir) -> list[dict[str, Any]]:
    """The models an evaluate stage serves and scores: served id, model path, generator label."""
    if "runs" in sd.params:  # the grid: one evaluate stage per student
        return [{"id": r["id"], "label": r["label"],
                 "path": sd.input_path(r["train_stage"], "model") if r.get("train_stage") else r["model"]}
                for r in sd.params["runs"]]
    runs = ([{"id": "base", "label": RUN_LABELS["base"], "path": sd.params["base_model"]}]
            if config.evaluate_base else [])
    return runs + [{"id": c, "label": RUN_LABELS[c], "path": sd.input_path(f"train-{c}", "model")}
                   for c in config.controls]


def served_models(config: PipelineConfig, sd: StageDir) -> list[dict[str, Any]]:
    """Base model, the students and (unless the judge is an outside endpoint) the judge, each
    served like the serve section's first model entry."""
    template = dict((sd.params["serve"].get("models") or [{}])[0])
    models = {run["id"]: run["path"] for run in evaluation_runs(config, sd)}
    if not sd.config.judge_endpoint:
        models["judge"] = config.judge_model
    return [{**template, "id": name, "path": path} for name, path in models.items()]


def run_evaluate(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    serve = load_object("sp2dpo.serve")
    run = load_object("sp2dpo.evaluate.run")
    score_annotations = load_object("sp2dpo.evaluate.score:score_annotations")

    serve_cfg = serve.ServeConfig.model_validate({"access_log": False, **sd.params["serve"],
                                                  "models": served_models(config, sd)})
    base_url = serve.start_server(serve_cfg)
    summary: dict[str, Any] = {"endpoint": base_url}
    try:
        for run_spec in evaluation_runs(config, sd):
            name = run_spec["id"]
            # Requests to our own app carry its key (its env var); an outside judge keeps its own.
            local_judge = {} if sd.config.judge_endpoint else {"judge_api_key_env": serve_cfg.api_key_env}
            cfg = with_paths(sd.config, endpoint=base_url, model=name, name=run_spec["label"], out=sd.join(name),
                             judge_endpoint=sd.config.judge_endpoint or base_url,
                             judge_model=sd.config.judge_model or "judge", api_key_env=serve_cfg.api_key_env,
                             **local_judge)
            generated = run.generate(cfg)
            judged = run.judge(cfg, generated["model_outputs"])
            scored = score_annotations(judged["annotations"], glm=cfg.glm,
                                       instruction_difficulty=cfg.instruction_difficulty, df_gamed=cfg.df_gamed,
                                       allow_missing=cfg.allow_missing, eval_set=cfg.eval_set,
                                       hub_files=cfg.hub_files, lc_min_instructions=cfg.lc_min_instructions)
            write_json(sd.join(name, "score.json"), scored)
            summary[name] = {k: scored.get(k) for k in ("win_rate", "lc_win_rate", "n", "n_missing", "avg_length")}
    finally:
        serve.stop_server()
    return summary


def run_compare(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    compare = load_object("sp2dpo.evaluate.compare:compare")
    runs = (["base"] if config.evaluate_base else []) + list(config.controls)
    # Each arm's achieved mean β next to its scores: a global or shuffled arm whose mean missed
    # the semantic arm's would not be a like-for-like control.
    details = {}
    for control in config.controls:
        stats = read_sp2dpo_metadata(sd.input_path("reference", f"beta-{control}.parquet")).get("beta_stats") or {}
        details[RUN_LABELS[control]] = {"mean_beta": stats.get("mean"), "target_mean_beta": stats.get("target_mean")}
    return compare([f"{RUN_LABELS[r]}={sd.input_path('evaluate', r)}" for r in runs],
                   with_paths(sd.config, out=sd.path), run_details=details)


def _input_stages(config: PipelineConfig) -> list[Stage]:
    """The pairs table and its annotations: the same for one student and for the grid."""
    return [
        Stage("data", run_data, "data", "sp2dpo.data.config:DataConfig", description="pairs table"),
        Stage("annotate", run_annotate, "annotate", "sp2dpo.annotate.config:AnnotateConfig", ("data",),
              params={"teachers": config.teachers}, path_fields=("out", "pairs"),
              description="teacher semantic-gap annotations"),
    ]


def default_stages(config: PipelineConfig) -> list[Stage]:
    if config.students:
        return grid_stages(config)
    train = load_object(TRAIN_CONFIG).model_validate(config.train)
    eval_paths = ("out", "endpoint", "model", "name")
    stages = [
        *_input_stages(config),
        Stage("schedule", run_schedule, "schedule", "sp2dpo.schedule.config:ScheduleConfig", ("data", "annotate"),
              params={"controls": list(config.controls)}, description="beta artifacts and audit"),
        Stage("reference", run_reference, "reference", "sp2dpo.train.reference:ReferenceConfig", ("data", "schedule"),
              params={"controls": list(config.controls),
                      "train": {"model": train.reference_id(), "max_length": train.max_length, "dtype": train.dtype}},
              path_fields=("out", "artifact", "pairs", "model", "max_length", "dtype"),
              description="reference log-probs"),
    ]
    for control in config.controls:
        stages.append(Stage(f"train-{control}", run_train, "train", TRAIN_CONFIG, ("data", "reference"),
                            {"control": control},
                            path_fields=("artifact", "pairs", "out", "name", "storage_path", "compute_reference"),
                            description=f"train the {control} student"))
    stages.append(Stage("evaluate", run_evaluate, "evaluate", EVALUATE_CONFIG,
                        tuple(f"train-{c}" for c in config.controls),
                        {"serve": config.serve, "base_model": train.model, "judge_model": config.judge_model,
                         "evaluate_base": config.evaluate_base, "controls": list(config.controls)},
                        path_fields=eval_paths, description="serve base + students + judge; generate, judge, score"))
    stages.append(Stage("compare", run_compare, "evaluate", EVALUATE_CONFIG, ("evaluate", "reference"),
                        path_fields=eval_paths,
                        description="comparison table and chart"))
    return stages


def run_grid_compare(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    from sp2dpo.pipeline.report import write_comparison

    return write_comparison(config, sd)


def grid_stages(config: PipelineConfig) -> list[Stage]:
    """The experiment grid's stages (see the module docstring and sp2dpo/pipeline/grid.py)."""
    from sp2dpo.pipeline.grid import artifact_specs, grid_arms

    train = load_object(TRAIN_CONFIG).model_validate(config.train)
    specs = artifact_specs(config)
    arms = grid_arms(config)
    eval_paths = ("out", "endpoint", "model", "name")
    stages = [
        *_input_stages(config),
        Stage("schedule", run_schedule, "schedule", "sp2dpo.schedule.config:ScheduleConfig", ("data", "annotate"),
              params={"artifacts": specs}, description="beta artifacts shared by every student, and audit"),
    ]
    for student in config.students:
        stages.append(Stage(
            f"reference-{student.name}", run_reference, "reference", "sp2dpo.train.reference:ReferenceConfig",
            ("data", "schedule"),
            params={"artifacts": list(specs),
                    "train": {"model": student.model, "max_length": train.max_length, "dtype": train.dtype}},
            path_fields=("out", "artifact", "pairs", "model", "max_length", "dtype"),
            description=f"reference log-probs of {student.name}, shared by its arms"))
    for arm in arms:
        if arm.train_stage is None:
            continue
        stages.append(Stage(
            arm.train_stage, run_train, "train", TRAIN_CONFIG, ("data", f"reference-{arm.student}"),
            {"control": arm.control, "artifact": arm.artifact, "reference_stage": f"reference-{arm.student}",
             "model": arm.model, "seed": arm.seed},
            path_fields=("artifact", "pairs", "out", "name", "storage_path", "compute_reference", "model", "seed"),
            description=f"train {arm.student} {arm.arm} seed {arm.seed}"))
    for student in config.students:
        own = [a for a in arms if a.student == student.name]
        runs = [{"id": a.run_id, "label": f"{a.student}-{a.run_id}", "train_stage": a.train_stage,
                 **({} if a.train_stage else {"model": a.model})} for a in own]
        stages.append(Stage(
            f"evaluate-{student.name}", run_evaluate, "evaluate", EVALUATE_CONFIG,
            tuple(a.train_stage for a in own if a.train_stage),
            {"serve": config.serve, "judge_model": config.judge_model, "runs": runs},
            path_fields=eval_paths,
            description=f"serve {student.name}'s base and arms + judge; generate, judge, score"))
    inputs = ("schedule", *(f"reference-{s.name}" for s in config.students),
              *(a.train_stage for a in arms if a.train_stage), *(f"evaluate-{s.name}" for s in config.students))
    stages.append(Stage("compare", run_grid_compare, "evaluate", EVALUATE_CONFIG, inputs,
                        {"grid": [a.run_id for a in arms], "global_betas": config.global_betas},
                        path_fields=eval_paths, description="comparison: rows, tuned global, paired deltas, cost"))
    return stages
