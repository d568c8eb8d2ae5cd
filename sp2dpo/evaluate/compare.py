"""Compare runs: a table (WR, LC WR, standard errors, average length), paired differences
against a baseline run (ΔWR, ΔLC with 95% CIs) and a PNG bar chart.

    sp2dpo evaluate compare base=runs/eval/base global=runs/eval/global sp2dpo=runs/eval/sp2dpo \
        shuffled=runs/eval/shuffled --out runs/eval/report
"""

from __future__ import annotations

import json
from typing import Any

from sp2dpo import storage
from sp2dpo.evaluate.config import EvaluateConfig
from sp2dpo.evaluate.paired import paired_from_rows, resolve_annotations
from sp2dpo.evaluate.protocol import load_eval_set
from sp2dpo.evaluate.score import lc_inputs, read_scored_rows, summarise


def _resolve(run: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH`; PATH is an annotations.json or a directory holding one."""
    name, sep, path = run.partition("=")
    if not sep or "://" in name:
        name, path = "", run
    return name, resolve_annotations(path)


def compare(runs: list[str], cfg: EvaluateConfig,
            run_details: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Score every run; then each run against the baseline run (`baseline_run`, default the
    first): paired ΔWR and ΔLC on the instructions both judged (sp2dpo.evaluate.paired).
    `run_details` adds fields to a run's row by name; a `mean_beta` among them gets a column."""
    if not runs:
        raise ValueError("give at least one run (NAME=DIR or DIR holding annotations.json)")
    out_uri = storage.absolute(cfg.out or ".")
    eval_rows = load_eval_set(cfg.eval_set)
    inputs = lc_inputs(eval_rows, cfg.instruction_difficulty, cfg.df_gamed, cfg.hub_files)
    rows, loaded = [], []
    for run in runs:
        name, path = _resolve(run)
        scored, missing = read_scored_rows(path, eval_rows, cfg.allow_missing)
        s = summarise(scored, missing, inputs, cfg.glm, cfg.lc_min_instructions)
        loaded.append((scored, missing, s))
        rows.append({"run": name or s["generator"], "generator": s["generator"], "win_rate": s["win_rate"],
                     "standard_error": s["standard_error"], "lc_win_rate": s["lc_win_rate"],
                     "lc_standard_error": s["lc_standard_error"], "lc_note": s["lc_note"],
                     "avg_length": s["avg_length"], "n": s["n"], "n_missing": s["n_missing"],
                     "annotator": s["annotator"], "comparable_with_leaderboard": s["comparable_with_leaderboard"],
                     "difficulty_source": s["difficulty_source"]})
        rows[-1].update((run_details or {}).get(rows[-1]["run"], {}))
    names = [r["run"] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}: name them NAME=DIR")
    base = cfg.baseline_run or names[0]
    if base not in names:
        raise ValueError(f"baseline_run {base!r} is not one of the runs {names}; set --baseline to one of them")
    b = names.index(base)
    for i, r in enumerate(rows):
        if i == b:
            r["paired"] = None
            continue
        pair = paired_from_rows(loaded[b], loaded[i], inputs, cfg, cfg.n_resamples, cfg.bootstrap_seed)
        r["paired"] = {"baseline": base, "n_shared": pair["n_shared"], "win_rate": pair["win_rate"],
                       "lc_win_rate": pair["lc_win_rate"]}
    table = _markdown(rows, base)
    storage.write_text(storage.join_uri(out_uri, "comparison.md"), table)
    storage.write_text(storage.join_uri(out_uri, "comparison.json"), json.dumps(rows, indent=2))
    storage.write_bytes(storage.join_uri(out_uri, "comparison.png"), _plot(rows))
    print(table)
    lc_rows = [r for r in rows if r["lc_win_rate"] is not None]
    return {"runs": len(rows), "baseline_run": base, "table": storage.join_uri(out_uri, "comparison.md"),
            "chart": storage.join_uri(out_uri, "comparison.png"),
            "best_lc": max(lc_rows, key=lambda r: r["lc_win_rate"])["run"] if lc_rows else None}


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _markdown(rows: list[dict], base: str) -> str:
    with_beta = any("mean_beta" in r for r in rows)
    beta_header = " mean β |" if with_beta else ""
    lines = ["| run | WR (%) | ± SE | LC WR (%) | ± SE | avg length | n |" + beta_header + " judge |",
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_beta else "") + "---|"]
    notes = []
    for r in rows:
        judge = r["annotator"] if r["comparable_with_leaderboard"] else f"{r['annotator']} (not leaderboard-comparable)"
        lc = _num(r["lc_win_rate"])
        if r["lc_win_rate"] is None:
            lc = f"n/a [{len(notes) + 1}]"
            notes.append(r["lc_note"])
        beta = f" {_num(r.get('mean_beta'), '.4f')} |" if with_beta else ""
        lines.append(f"| {r['run']} | {r['win_rate']:.2f} | {r['standard_error']:.2f} | {lc} | "
                     f"{_num(r['lc_standard_error'])} | {r['avg_length']} | {r['n']} |{beta} {judge} |")
    lines += [f"\n[{i}] LC win rate {note}" for i, note in enumerate(notes, 1)]
    paired = [r for r in rows if r["paired"]]
    if paired:
        lines += ["", (f"Differences against {base} (run minus {base}, points; paired bootstrap 95% CI over the "
                       "instructions both judged; p: paired sign-flip test):"), "",
                  "| run | n shared | ΔWR | 95% CI | p | ΔLC | 95% CI | p |", "|---|---:|---:|---|---:|---:|---|---:|"]
        for r in paired:
            cells = []
            for key in ("win_rate", "lc_win_rate"):
                d = r["paired"][key]
                if d["delta"] is None:
                    cells += ["n/a", "n/a", "n/a"]
                    continue
                noise = " (within noise)" if d["within_noise"] else ""
                p_value = f"{d['p_value']:.3f}" if d["p_value"] >= 0.001 else "<0.001"
                cells += [f"{d['delta']:+.2f}", f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]{noise}", p_value]
            lines.append(f"| {r['run']} | {r['paired']['n_shared']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict]) -> bytes:
    import io
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 4.2))
    wr = ax.bar(x - width / 2, [r["win_rate"] for r in rows], width, yerr=[r["standard_error"] for r in rows],
                capsize=3, label="win rate", color="#4c72b0")
    # A run whose LC is not estimable gets no bar (NaN), not a bar at some constant.
    lc_values = [math.nan if r["lc_win_rate"] is None else r["lc_win_rate"] for r in rows]
    lc = ax.bar(x + width / 2, lc_values, width, yerr=[r["lc_standard_error"] or 0.0 for r in rows],
                capsize=3, label="LC win rate", color="#dd8452")
    ax.bar_label(wr, fmt="%.1f", fontsize=8, padding=2)
    ax.bar_label(lc, labels=["n/a" if v is None else f"{v:.1f}" for v in (r["lc_win_rate"] for r in rows)],
                 fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r['run']}\n(avg len {r['avg_length']})" for r in rows], fontsize=8)
    ax.set_ylabel("% vs gpt4_1106_preview reference")
    judges = sorted({r["annotator"] for r in rows})
    comparable = all(r["comparable_with_leaderboard"] for r in rows)
    ax.set_title("AlpacaEval 2.0, judge: " + ", ".join(judges)
                 + ("" if comparable else "\n(not comparable with the leaderboard)"), fontsize=9)
    ax.set_ylim(0, max(10.0, max(max(r["win_rate"], r["lc_win_rate"] or 0.0) for r in rows) * 1.25))
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
