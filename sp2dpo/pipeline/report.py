"""The grid's comparison: numbers first (`comparison.json`), then Markdown and a PNG rendered from them.

    comparison.json   rows         one per (student, arm, seed): WR, LC, SEs, avg length, n, mean β,
                                   cost (wall time, CPU/GPU-hours, tokens) and provenance (artifact
                                   digest, reference tag, seed, config hashes)
                      tuned_global per student: the chosen global arm, the metric, the rule, the values
                      deltas       per student and seed: semantic − tuned_global and semantic −
                                   shuffled in WR and LC, paired bootstrap 95% CI over the shared
                                   instructions, sign-flip p-value, within_noise
    comparison.md     the same as tables
    comparison.png    WR and LC per arm, one panel per student

The paired statistics are sp2dpo.evaluate.paired's, the scores sp2dpo.evaluate.score's, with the
evaluate section's settings (glm, lc_min_instructions, n_resamples, bootstrap_seed).
"""

from __future__ import annotations

import json
from typing import Any

from sp2dpo import storage
from sp2dpo.pipeline.grid import TUNED_RULE, Arm, cost, delta_pairs, grid_arms, score_row, select_tuned_global


def collect(config: Any, sd: Any) -> dict[str, Any]:
    """Score every arm, pick each student's tuned global arm, compute the paired deltas."""
    from sp2dpo.evaluate.paired import paired_comparison
    from sp2dpo.evaluate.score import score_annotations
    from sp2dpo.pipeline.runner import load_object
    from sp2dpo.storage import read_sp2dpo_metadata

    cfg = sd.config
    train_cfg = load_object("sp2dpo.train.config:TrainConfig").model_validate(config.train)
    arms: list[Arm] = grid_arms(config)
    rows = []
    for arm in arms:
        run_dir = sd.input_path(f"evaluate-{arm.student}", arm.run_id)
        score = score_annotations(storage.join_uri(run_dir, "annotations.json"), glm=cfg.glm,
                                  instruction_difficulty=cfg.instruction_difficulty, df_gamed=cfg.df_gamed,
                                  allow_missing=cfg.allow_missing, eval_set=cfg.eval_set, hub_files=cfg.hub_files,
                                  lc_min_instructions=cfg.lc_min_instructions)
        row = score_row(arm, score)
        row["evaluation"] = run_dir
        row["mean_beta"] = row["target_mean_beta"] = row["cost"] = row["provenance"] = None
        if arm.train_stage is not None:
            artifact = sd.input_path(f"reference-{arm.student}", f"beta-{arm.artifact}.parquet")
            meta = read_sp2dpo_metadata(artifact)
            stats = meta.get("beta_stats") or {}
            summary = sd.inputs[arm.train_stage].summary
            row["mean_beta"] = stats.get("mean")
            row["target_mean_beta"] = stats.get("target_mean")
            row["cost"] = cost(summary, train_cfg)
            row["provenance"] = {
                "artifact": artifact, "artifact_beta_digest": meta.get("beta_digest"),
                "pair_ids_digest": meta.get("pair_ids_digest"), "schedule_hash": meta.get("schedule_hash"),
                "reference": meta.get("reference"), "seed": arm.seed, "train_config_hash": summary.get("config_hash"),
                "train_stage": arm.train_stage, "train_stage_key": sd.inputs[arm.train_stage].key,
                "model_dir": summary.get("model_dir"),
            }
        rows.append(row)

    students = [s.name for s in config.students]
    tuned = {name: select_tuned_global(rows, name) for name in students}
    for row in rows:
        row["tuned_global"] = bool(tuned.get(row["student"]) and tuned[row["student"]]["arm"] == row["arm"])
    deltas = []
    for pair in delta_pairs(rows, tuned):
        a = sd.input_path(f"evaluate-{pair['student']}", pair["a_run"])
        b = sd.input_path(f"evaluate-{pair['student']}", pair["b_run"])
        result = paired_comparison(a, b, cfg, cfg.n_resamples, cfg.bootstrap_seed)
        deltas.append({**pair, "n_shared": result["n_shared"], "win_rate": result["win_rate"],
                       "lc_win_rate": result["lc_win_rate"]})
    reference_cost = {}
    for name in students:
        stage = sd.inputs[f"reference-{name}"]
        passes = [v for v in stage.summary.values() if isinstance(v, dict) and "scored_pairs" in v]
        reference_cost[name] = {"passes": len(passes), "seconds": sum(float(v.get("seconds") or 0) for v in passes),
                                "reference": passes[0].get("reference") if passes else None}
    judges = sorted({str(r["annotator"]) for r in rows})
    return {
        "students": [{"name": s.name, "model": s.model} for s in config.students],
        "global_betas": list(config.global_betas),
        "seeds": list(config.seeds),
        "judge": judges[0] if len(judges) == 1 else judges,
        "glm": cfg.glm,
        "paired": {"n_resamples": cfg.n_resamples, "bootstrap_seed": cfg.bootstrap_seed, "ci": 0.95,
                   "test": "paired sign-flip (two-sided)", "direction": "b minus a, points"},
        "pipeline_config_hash": config.config_hash(),
        "tuned_global_rule": TUNED_RULE,
        "rows": rows,
        "tuned_global": tuned,
        "deltas": deltas,
        "reference_cost": reference_cost,
    }


def write_comparison(config: Any, sd: Any) -> dict[str, Any]:
    comparison = collect(config, sd)
    out = sd.path
    markdown = render_markdown(comparison)
    storage.write_text(storage.join_uri(out, "comparison.json"), json.dumps(comparison, indent=2, default=str))
    storage.write_text(storage.join_uri(out, "comparison.md"), markdown)
    storage.write_bytes(storage.join_uri(out, "comparison.png"), plot(comparison))
    return {"rows": len(comparison["rows"]), "table": storage.join_uri(out, "comparison.md"),
            "tuned_global": {k: (v or {}).get("arm") for k, v in comparison["tuned_global"].items()},
            "deltas": [{k: d[k] for k in ("student", "seed", "comparison")}
                       | {"wr": d["win_rate"]["delta"], "lc": d["lc_win_rate"]["delta"]} for d in comparison["deltas"]]}


# ----------------------------------------------------------------------------- rendering


def _num(value: Any, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _delta(d: dict[str, Any]) -> str:
    if d.get("delta") is None:
        return "n/a"
    return f"{d['delta']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def _verdict(delta: dict[str, Any]) -> str:
    parts = []
    for key, label in (("win_rate", "WR"), ("lc_win_rate", "LC")):
        d = delta[key]
        if d.get("delta") is None:
            parts.append(f"{label} not estimable")
        else:
            parts.append(f"{label} within noise" if d["within_noise"] else
                         f"{label} {'higher' if d['delta'] > 0 else 'lower'} (CI excludes 0)")
    return "; ".join(parts)


def render_markdown(c: dict[str, Any]) -> str:
    lines = [(f"# Experiment grid: students {', '.join(s['name'] for s in c['students'])}; "
              f"global β {c['global_betas']}; seeds {c['seeds']}"),
             "", f"Judge: {c['judge']}; LC GLM: {c['glm']}. ★ = the student's tuned global arm.", "",
             "| student | arm | seed | WR (%) | ± SE | LC WR (%) | ± SE | avg length | n | mean β |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in c["rows"]:
        arm = f"{r['arm']} ★" if r.get("tuned_global") else r["arm"]
        lines.append(f"| {r['student']} | {arm} | {_num(r['seed'], 'd')} | {_num(r['win_rate'])} | "
                     f"{_num(r['standard_error'])} | {_num(r['lc_win_rate'])} | {_num(r['lc_standard_error'])} | "
                     f"{_num(r['avg_length'], '.0f')} | {r['n']} | {_num(r['mean_beta'], '.4f')} |")
    notes = sorted({r["lc_note"] for r in c["rows"] if r["lc_win_rate"] is None and r.get("lc_note")})
    if notes:
        lines += ["", "LC win rate: " + "; ".join(notes)]
    lines += ["", "## Tuned global β", "", f"Rule: {c['tuned_global_rule']}.", "",
              "| student | tuned_global | chosen by | values |", "|---|---|---|---|"]
    for student, t in c["tuned_global"].items():
        if t is None:
            lines.append(f"| {student} | – | no global arm | |")
            continue
        values = ", ".join(f"{arm} {v:.2f}" for arm, v in t["values"].items())
        chosen = t["metric"] + (f" ({t['fallback']})" if t["fallback"] else "")
        lines.append(f"| {student} | {t['arm']} | {chosen} | {values} |")
    lines += ["", "## Paired differences", "",
              (f"b − a in points on the instructions both runs judged; 95% paired bootstrap CI "
               f"({c['paired']['n_resamples']} resamples), p from a paired sign-flip test. A difference whose "
               "CI contains 0 is within noise."), "",
              "| student | seed | comparison | a | n shared | ΔWR [95% CI] | p | ΔLC [95% CI] | p | reading |",
              "|---|---:|---|---|---:|---|---:|---|---:|---|"]
    for d in c["deltas"]:
        lines.append(f"| {d['student']} | {d['seed']} | {d['comparison']} | {d['a']} | {d['n_shared']} | "
                     f"{_delta(d['win_rate'])} | {_num(d['win_rate']['p_value'], '.3f')} | "
                     f"{_delta(d['lc_win_rate'])} | {_num(d['lc_win_rate'].get('p_value'), '.3f')} | {_verdict(d)} |")
    lines += ["", "## Cost and provenance", "",
              "| student | arm | seed | wall (s) | CPU-h | GPU-h | tokens trained | artifact β digest | reference "
              "| train config |",
              "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in c["rows"]:
        if r["cost"] is None:
            continue
        k, p = r["cost"], r["provenance"]
        ref = p.get("reference") or {}
        ref_text = f"{ref.get('model_id', '?')} ({ref.get('dtype', '?')})" if ref else "–"
        lines.append(f"| {r['student']} | {r['arm']} | {r['seed']} | {k['wall_seconds']:.1f} | {k['cpu_hours']:.4f} | "
                     f"{k['gpu_hours']:.4f} | {_num(k['tokens_trained'], 'd')} | "
                     f"{(p['artifact_beta_digest'] or '')[:16]} | {ref_text} | {p['train_config_hash']} |")
    lines += ["", "Reference passes (shared by a student's arms): " + ", ".join(
        f"{s} {v['passes']} pass(es), {v['seconds']:.1f} s" for s, v in c["reference_cost"].items()),
        f"Pipeline config hash: {c['pipeline_config_hash']}"]
    return "\n".join(lines) + "\n"


def plot(c: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    students = [s["name"] for s in c["students"]]
    fig, axes = plt.subplots(1, len(students), figsize=(max(5.0, 4.5 * len(students)), 4.2), squeeze=False)
    for ax, student in zip(axes[0], students):
        rows = [r for r in c["rows"] if r["student"] == student]
        x = np.arange(len(rows))
        width = 0.38
        wr = [r["win_rate"] for r in rows]
        lc = [r["lc_win_rate"] if r["lc_win_rate"] is not None else np.nan for r in rows]
        ax.bar(x - width / 2, wr, width, yerr=[r["standard_error"] or 0 for r in rows], capsize=3,
               label="win rate", color="#4c72b0")
        ax.bar(x + width / 2, lc, width, yerr=[r["lc_standard_error"] or 0 for r in rows], capsize=3,
               label="LC win rate", color="#dd8452")
        labels = [(r["arm"] + (" ★" if r.get("tuned_global") else ""))
                  + ("" if r["seed"] is None else f"\ns{r['seed']}") for r in rows]
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(student, fontsize=9)
        ax.set_ylabel("%")
        top = max([v for v in wr + lc if v is not None and np.isfinite(v)] or [10.0])
        ax.set_ylim(0, max(10.0, top * 1.25))
        ax.legend(fontsize=7)
    fig.suptitle(f"AlpacaEval 2.0 per arm, judge: {c['judge']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
