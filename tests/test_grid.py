"""The experiment grid as pure functions: arms, stages and keys, tuned-global selection, deltas,
the rendered comparison; and (slow) the packaged demo grid run end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from sp2dpo.config import load_config
from sp2dpo.pipeline.config import PipelineConfig
from sp2dpo.pipeline.grid import Arm, artifact_specs, delta_pairs, grid_arms, select_tuned_global
from sp2dpo.pipeline.report import render_markdown
from sp2dpo.pipeline.runner import plan
from sp2dpo.pipeline.stages import default_stages

STUDENTS = [{"name": "a", "model": "smollm2"}, {"name": "b", "model": "tiny-llama"}]


def _grid(**data) -> PipelineConfig:
    return PipelineConfig.model_validate({"students": STUDENTS, **data})


def test_grid_arms_per_student_and_seed():
    config = _grid(global_betas=[0.01, 0.1], seeds=[0, 1])
    arms = grid_arms(config)
    a = [x for x in arms if x.student == "a"]
    assert [x.arm for x in a] == ["base"] + ["global@0.01", "global@0.1", "semantic", "shuffled"] * 2
    assert [x.seed for x in a] == [None] + [0] * 4 + [1] * 4
    assert a[0] == Arm("a", "smollm2", "base") and a[0].train_stage is None and a[0].run_id == "base"
    g = a[1]
    assert (g.control, g.global_beta, g.artifact, g.run_id, g.train_stage) == (
        "global", 0.01, "global-0.01", "global-0.01-s0", "train-a-global-0.01-s0")
    assert len(arms) == 2 * (1 + 2 * 4)
    # The artifacts are one set for every student.
    assert artifact_specs(config) == {"semantic": {"control": "semantic"}, "shuffled": {"control": "shuffled"},
                                      "global-0.01": {"control": "global", "global_beta": 0.01},
                                      "global-0.1": {"control": "global", "global_beta": 0.1}}
    # controls and evaluate_base pick the families.
    fewer = grid_arms(_grid(controls=["semantic", "global"], evaluate_base=False, global_betas=[0.05]))
    assert [(x.student, x.arm) for x in fewer] == [("a", "global@0.05"), ("a", "semantic"),
                                                   ("b", "global@0.05"), ("b", "semantic")]
    assert PipelineConfig().global_betas == [0.01, 0.05, 0.1] and PipelineConfig().seeds == [0]


def test_grid_stages_share_artifacts_and_one_reference_per_student(tmp_path):
    config = _grid(global_betas=[0.05, 0.1])
    stages = {s.name: s for s in default_stages(config)}
    assert list(stages)[:5] == ["data", "annotate", "schedule", "reference-a", "reference-b"]
    assert list(stages)[-3:] == ["evaluate-a", "evaluate-b", "compare"]
    assert set(stages["schedule"].params["artifacts"]) == {"semantic", "shuffled", "global-0.05", "global-0.1"}
    trains = [n for n in stages if n.startswith("train-")]
    assert len(trains) == 8
    for name in trains:
        student = name.split("-")[1]
        assert stages[name].inputs == ("data", f"reference-{student}")
        assert stages[name].params["model"] == {"a": "smollm2", "b": "tiny-llama"}[student]
    assert stages["reference-b"].params["train"]["model"] == "tiny-llama"
    assert stages["evaluate-a"].inputs == tuple(n for n in trains if n.startswith("train-a-"))
    assert set(stages["compare"].inputs) >= {"schedule", "reference-a", "reference-b", "evaluate-a", "evaluate-b",
                                             *trains}

    keys = plan(config, list(stages.values()), str(tmp_path)).keys
    # A student's model re-keys only that student's stages (and the comparison).
    other = _grid(global_betas=[0.05, 0.1], students=[STUDENTS[0], {"name": "b", "model": str(tmp_path)}])
    keys2 = plan(other, default_stages(other), str(tmp_path)).keys
    changed = {n for n in keys if keys[n] != keys2[n]}
    assert changed == {"reference-b", "evaluate-b", "compare", *(n for n in trains if n.startswith("train-b-"))}
    # Seeds re-key training, never the shared artifacts or references.
    seeded = _grid(global_betas=[0.05, 0.1], seeds=[3])
    keys3 = plan(seeded, default_stages(seeded), str(tmp_path)).keys
    assert all(keys3[n] == keys[n] for n in ("data", "annotate", "schedule", "reference-a", "reference-b"))


def test_single_student_configs_keep_their_stages():
    for name in ("demo", "ultrafeedback-mini", "ultrafeedback-8b"):
        config = load_config(PipelineConfig, name)
        assert not config.students
        assert [s.name for s in default_stages(config)] == [
            "data", "annotate", "schedule", "reference", "train-semantic", "train-global", "train-shuffled",
            "evaluate", "compare"], name


@pytest.mark.parametrize("bad, match", [
    ({"students": [STUDENTS[0], STUDENTS[0]]}, "unique"),
    ({"students": [{"name": "has space", "model": "m"}]}, "pattern"),
    ({"global_betas": [0.1, 0.1]}, "distinct positive"),
    ({"global_betas": [0.0]}, "distinct positive"),
    ({"global_betas": []}, "at least 1"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"train": {"model": "smollm2"}}, "remove train.model"),
    ({"train": {"seed": 3}}, "remove train.seed"),
])
def test_grid_config_refuses_bad_values(bad, match):
    with pytest.raises(ValidationError, match=match):
        PipelineConfig.model_validate({"students": STUDENTS, **bad})


def _row(student, arm, seed, wr, lc, beta=None):
    control = "global" if arm.startswith("global") else ("base" if arm == "base" else arm)
    return {"student": student, "arm": arm, "control": None if control == "base" else control, "global_beta": beta,
            "seed": seed, "run_id": f"{arm}-s{seed}", "win_rate": wr, "lc_win_rate": lc}


def test_tuned_global_is_the_best_lc_global_arm_mean_over_seeds():
    rows = [_row("a", "global@0.01", 0, 40.0, 10.0, 0.01), _row("a", "global@0.01", 1, 40.0, 30.0, 0.01),
            _row("a", "global@0.1", 0, 10.0, 19.0, 0.1), _row("a", "global@0.1", 1, 10.0, 19.0, 0.1),
            _row("a", "semantic", 0, 90.0, 90.0), _row("b", "global@0.01", 0, 1.0, 5.0, 0.01),
            _row("b", "global@0.1", 0, 1.0, 5.0, 0.1)]
    t = select_tuned_global(rows, "a")
    assert (t["arm"], t["global_beta"], t["metric"], t["fallback"]) == ("global@0.01", 0.01, "lc_win_rate", None)
    assert t["values"] == {"global@0.01": 20.0, "global@0.1": 19.0}  # semantic is never a candidate
    # A tie goes to the beta listed first.
    assert select_tuned_global(rows, "b")["arm"] == "global@0.01"
    assert select_tuned_global(rows, "nobody") is None


def test_tuned_global_falls_back_to_win_rate_when_lc_is_not_estimable():
    rows = [_row("a", "global@0.01", 0, 30.0, 80.0, 0.01), _row("a", "global@0.1", 0, 45.0, None, 0.1)]
    t = select_tuned_global(rows, "a")
    assert (t["arm"], t["metric"]) == ("global@0.1", "win_rate")
    assert "not estimable" in t["fallback"] and "raw win rate" in t["rule"]


def test_delta_pairs_per_student_and_seed():
    rows = [_row("a", "base", None, 5, 5), _row("a", "global@0.1", 0, 1, 1, 0.1), _row("a", "semantic", 0, 1, 1),
            _row("a", "shuffled", 0, 1, 1), _row("a", "global@0.1", 1, 1, 1, 0.1), _row("a", "semantic", 1, 1, 1)]
    pairs = delta_pairs(rows, {"a": {"arm": "global@0.1"}})
    assert [(p["seed"], p["comparison"], p["a"], p["b"]) for p in pairs] == [
        (0, "semantic - tuned_global", "global@0.1", "semantic"), (0, "semantic - shuffled", "shuffled", "semantic"),
        (1, "semantic - tuned_global", "global@0.1", "semantic")]  # seed 1 has no shuffled run


def test_markdown_marks_tuned_global_noise_and_missing_lc():
    stats = {"delta": 1.5, "ci_low": -2.0, "ci_high": 4.0, "p_value": 0.4, "within_noise": True}
    none = {"delta": None, "ci_low": None, "ci_high": None, "p_value": None, "within_noise": None, "note": "few"}
    rows = [{**_row("a", "global@0.1", 0, 50.0, None, 0.1), "standard_error": 3.0, "lc_standard_error": None,
             "avg_length": 100, "n": 6, "mean_beta": 0.1, "tuned_global": True, "lc_note": "not estimated: 6 judged",
             "cost": {"wall_seconds": 12.0, "cpu_hours": 0.0067, "gpu_hours": 0.0, "tokens_trained": 900},
             "provenance": {"artifact_beta_digest": "ab" * 32, "reference": {"model_id": "m", "dtype": "float32"},
                            "train_config_hash": "h1"}}]
    md = render_markdown({
        "students": [{"name": "a", "model": "m"}], "global_betas": [0.1], "seeds": [0], "judge": "j", "glm": "g",
        "paired": {"n_resamples": 2000}, "pipeline_config_hash": "p", "tuned_global_rule": "rule",
        "rows": rows, "reference_cost": {"a": {"passes": 1, "seconds": 3.0}},
        "tuned_global": {"a": {"arm": "global@0.1", "metric": "win_rate", "fallback": "LC not estimable",
                               "values": {"global@0.1": 50.0}}},
        "deltas": [{"student": "a", "seed": 0, "comparison": "semantic - tuned_global", "a": "global@0.1",
                    "n_shared": 6, "win_rate": stats, "lc_win_rate": none}]})
    assert "| a | global@0.1 ★ | 0 | 50.00 | 3.00 | – |" in md
    assert "+1.50 [-2.00, +4.00]" in md and "WR within noise; LC not estimable" in md
    assert "LC win rate: not estimated: 6 judged" in md
    assert "abababababababab" in md and "m (float32)" in md


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_grid_pipeline_writes_the_comparison(tmp_path):
    """`sp2dpo pipeline --config demo-grid`, scaled down (6 pairs, 3 instructions, short answers):
    two students on CPU, two global betas, semantic and shuffled, one seed. comparison.json has
    every field, and each student's tuned_global is its best global arm by LC (by WR where LC
    is not estimable, as it is not on 3 instructions)."""
    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "sp2dpo"), "pipeline", "--config", "demo-grid", "--json",
               "--set", f"run_dir={run_dir}", "--set", "data.limit=6", "--set", "data.max_tokens=200",
               "--set", "train.max_length=256", "--set", "evaluate.limit=3", "--set", "evaluate.max_tokens=16"]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=3300, cwd=tmp_path,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    check_comparison(Path(summary["stages"]["compare"]["path"]))


def check_comparison(compare_dir: Path) -> None:
    """What the scaled-down demo grid's comparison must hold (3 instructions, one seed)."""
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (compare_dir / name).stat().st_size > 0, name
    c = json.loads((compare_dir / "comparison.json").read_text())
    assert [s["name"] for s in c["students"]] == ["smollm2", "tiny"] and c["global_betas"] == [0.05, 0.1]
    arms = ["base", "global@0.05", "global@0.1", "semantic", "shuffled"]
    assert [(r["student"], r["arm"]) for r in c["rows"]] == [(s, a) for s in ("smollm2", "tiny") for a in arms]
    for r in c["rows"]:
        for key in ("win_rate", "standard_error", "lc_win_rate", "lc_standard_error", "avg_length", "n", "mean_beta",
                    "seed", "cost", "provenance", "tuned_global"):
            assert key in r, key
        assert 1 <= r["n"] <= 3 and r["n"] + r["n_missing"] == 3 and 0 <= r["win_rate"] <= 100
        if r["arm"] == "base":
            assert r["seed"] is None and r["cost"] is None
            continue
        assert r["seed"] == 0 and r["mean_beta"] > 0
        if r["control"] == "global":
            assert r["mean_beta"] == pytest.approx(r["global_beta"])
        k, p = r["cost"], r["provenance"]
        assert k["wall_seconds"] > 0 and k["cpu_hours"] > 0 and k["gpu_hours"] == 0 and k["tokens_trained"] > 0
        assert len(p["artifact_beta_digest"]) == 64 and p["reference"]["model_id"] and p["train_config_hash"]
        assert p["seed"] == 0
    # The semantic and shuffled artifacts are shared: the same β digest for both students.
    digest = {(r["student"], r["arm"]): r["provenance"]["artifact_beta_digest"] for r in c["rows"] if r["provenance"]}
    for arm in arms[1:]:
        assert digest[("smollm2", arm)] == digest[("tiny", arm)]
    for student in ("smollm2", "tiny"):
        t = c["tuned_global"][student]
        globals_ = [r for r in c["rows"] if r["student"] == student and r["control"] == "global"]
        lc_ok = all(r["lc_win_rate"] is not None for r in globals_)
        metric = "lc_win_rate" if lc_ok else "win_rate"
        assert t["metric"] == metric and (t["fallback"] is None) == lc_ok
        best = max(globals_, key=lambda r: r[metric])
        assert t["values"][t["arm"]] == best[metric]
        assert [r["arm"] for r in c["rows"] if r["student"] == student and r["tuned_global"]] == [t["arm"]]
        deltas = {d["comparison"]: d for d in c["deltas"] if d["student"] == student}
        assert set(deltas) == {"semantic - tuned_global", "semantic - shuffled"}
        for d in deltas.values():
            assert 1 <= d["n_shared"] <= 3
            w = d["win_rate"]
            assert w["ci_low"] <= w["delta"] <= w["ci_high"] and 0 < w["p_value"] <= 1
            assert w["within_noise"] == (w["ci_low"] <= 0 <= w["ci_high"])
            assert "lc_win_rate" in d
    md = (compare_dir / "comparison.md").read_text()
    assert "★" in md and "Paired differences" in md and "Cost and provenance" in md


def test_the_single_student_comparison_reports_each_arms_achieved_mean_beta(tmp_path):
    """Without `students`, compare reads each control's artifact and puts its achieved mean β in
    the row and a `mean β` column; runs without one (base) show n/a."""
    from test_evaluate_score import MODELS, annotations_path

    from sp2dpo.evaluate.compare import compare
    from sp2dpo.evaluate.config import EvaluateConfig

    runs = [f"base={annotations_path(MODELS[0])}", f"sp2dpo={annotations_path(MODELS[1])}"]
    compare(runs, EvaluateConfig(out=str(tmp_path)), run_details={"sp2dpo": {"mean_beta": 0.0625,
                                                                              "target_mean_beta": 0.1}})
    rows = {r["run"]: r for r in json.loads((tmp_path / "comparison.json").read_text())}
    assert rows["sp2dpo"]["mean_beta"] == 0.0625 and rows["sp2dpo"]["target_mean_beta"] == 0.1
    assert "mean_beta" not in rows["base"]
    table = (tmp_path / "comparison.md").read_text().splitlines()
    assert "mean β" in table[0]
    assert "| 0.0625 |" in next(line for line in table if line.startswith("| sp2dpo |"))
    assert "| n/a |" in next(line for line in table if line.startswith("| base |"))


def test_the_single_student_compare_stage_reads_the_reference_artifacts():
    stages = {s.name: s for s in default_stages(PipelineConfig())}
    assert "reference" in stages["compare"].inputs
