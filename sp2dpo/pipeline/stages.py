"""The SP²DPO pipeline as a list of stages over the stage Python APIs.

    data → annotate → schedule (semantic + global + shuffled artifacts, audit) → reference
         → train-<control> → evaluate-<control> (serve, generate, judge, score) → compare

Each function below only maps the pipeline's dirs onto one stage API call; the logic lives in the
stage packages. A stage API that this installation lacks raises StageUnavailable when the
pipeline is planned, before anything runs.
"""

from __future__ import annotations

from typing import Any

from sp2dpo.pipeline.config import PipelineConfig
from sp2dpo.pipeline.runner import Stage, StageDir, load_object


def with_paths(cfg: Any, **paths: Any) -> Any:
    """A copy of a stage config with the pipeline's paths filled in (validated: a renamed field
    is an error here, not a silently ignored attribute)."""
    return type(cfg).model_validate({**cfg.model_dump(), **paths})


def run_data(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    from sp2dpo.data.prepare import prepare

    return prepare(with_paths(sd.config, out=sd.path))


def run_annotate(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    annotate = load_object("sp2dpo.annotate:annotate")
    return annotate(with_paths(sd.config, pairs=sd.input_path("data", "pairs.parquet"), out=sd.path))


def run_schedule(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    build_artifact = load_object("sp2dpo.schedule:build_artifact")
    write_audit = load_object("sp2dpo.schedule.audit:write_audit")
    pairs = sd.input_path("data", "pairs.parquet")
    annotations = sd.input_path("annotate")
    summary: dict[str, Any] = {}
    for control in config.controls:
        summary[control] = build_artifact(pairs, annotations, sd.join(f"beta-{control}.parquet"), sd.config,
                                          control=control)
    summary["audit"] = write_audit(sd.join(f"beta-{config.controls[0]}.parquet"), sd.join("audit"))
    return summary


def run_reference(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    # One pass of the reference model over the pairs serves every control: beta does not enter it.
    reference_logps = load_object("sp2dpo.train:reference_logps")
    return reference_logps(sd.input_path("data", "pairs.parquet"), sd.join("reference_logps.parquet"), sd.config)


def run_train(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    train = load_object("sp2dpo.train:train")
    control = sd.params["control"]
    return train(with_paths(sd.config, artifact=sd.input_path("schedule", f"beta-{control}.parquet"),
                            reference_logps=sd.input_path("reference", "reference_logps.parquet"), out=sd.path))


def run_evaluate(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    from sp2dpo.pipeline.runner import _section_config

    evaluate = load_object("sp2dpo.evaluate")
    serve = load_object("sp2dpo.serve")
    serve_cfg = _section_config(Stage("serve", run_evaluate, "serve", "sp2dpo.serve:ServeConfig"), config)
    control = sd.params["control"]
    checkpoint = sd.input_path(f"train-{control}", "checkpoint")
    base_url = serve.start_server(with_paths(serve_cfg, model=checkpoint))
    try:
        generated = evaluate.generate(with_paths(sd.config, base_url=base_url, out=sd.path))
        judged = evaluate.judge(with_paths(sd.config, out=sd.path))
        scored = evaluate.score(with_paths(sd.config, out=sd.path))
    finally:
        serve.stop_server()
    return {"control": control, "generate": generated, "judge": judged, "score": scored}


def run_compare(config: PipelineConfig, sd: StageDir) -> dict[str, Any]:
    compare = load_object("sp2dpo.evaluate:compare")
    runs = {name.removeprefix("evaluate-"): result.path for name, result in sd.inputs.items()}
    return compare(runs, sd.path)


def default_stages(config: PipelineConfig) -> list[Stage]:
    stages = [
        Stage("data", run_data, "data", "sp2dpo.data.prepare:DataConfig", description="pairs table"),
        Stage("annotate", run_annotate, "annotate", "sp2dpo.annotate:AnnotateConfig", ("data",),
              path_fields=("out", "pairs"), description="teacher semantic-gap annotations"),
        Stage("schedule", run_schedule, "schedule", "sp2dpo.schedule:ScheduleConfig", ("data", "annotate"),
              params={"controls": list(config.controls)}, description="beta artifacts and audit"),
        Stage("reference", run_reference, "train", "sp2dpo.train:TrainConfig", ("data",),
              description="reference log-probs"),
    ]
    for control in config.controls:
        stages.append(Stage(f"train-{control}", run_train, "train", "sp2dpo.train:TrainConfig",
                            ("schedule", "reference"), {"control": control},
                            path_fields=("out", "artifact", "reference_logps"), description=f"train the {control} student"))
    for control in config.controls:
        stages.append(Stage(f"evaluate-{control}", run_evaluate, "evaluate", "sp2dpo.evaluate:EvaluateConfig",
                            (f"train-{control}",), {"control": control, "serve": config.serve},
                            path_fields=("out", "base_url"), description=f"serve and evaluate the {control} student"))
    stages.append(Stage("compare", run_compare, None, None, tuple(f"evaluate-{c}" for c in config.controls),
                        description="comparison table"))
    return stages
