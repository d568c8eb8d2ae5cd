"""Compare runs: a table (WR, LC WR, standard errors, average length) and a PNG bar chart.

    sp2dpo evaluate compare base=runs/eval/base global=runs/eval/global sp2dpo=runs/eval/sp2dpo \
        shuffled=runs/eval/shuffled --out runs/eval/report
"""

from __future__ import annotations

import json
from typing import Any

from sp2dpo import storage
from sp2dpo.evaluate.config import EvaluateConfig
from sp2dpo.evaluate.score import score_annotations


def _resolve(run: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH`; PATH is an annotations.json or a directory holding one."""
    name, sep, path = run.partition("=")
    if not sep or "://" in name:
        name, path = "", run
    if storage.is_dir(path):
        path = storage.join_uri(path, "annotations.json")
    if not storage.is_file(path):
        raise FileNotFoundError(f"run {run!r}: no annotations file at {path}")
    return name, path


def compare(runs: list[str], cfg: EvaluateConfig) -> dict[str, Any]:
    if not runs:
        raise ValueError("give at least one run (NAME=DIR or DIR holding annotations.json)")
    out_uri = storage.absolute(cfg.out or ".")
    rows = []
    for run in runs:
        name, path = _resolve(run)
        s = score_annotations(path, glm=cfg.glm, instruction_difficulty=cfg.instruction_difficulty,
                              df_gamed=cfg.df_gamed, allow_missing=cfg.allow_missing, eval_set=cfg.eval_set)
        rows.append({"run": name or s["generator"], "generator": s["generator"], "win_rate": s["win_rate"],
                     "standard_error": s["standard_error"], "lc_win_rate": s["lc_win_rate"],
                     "lc_standard_error": s["lc_standard_error"], "avg_length": s["avg_length"], "n": s["n"],
                     "n_missing": s["n_missing"], "annotator": s["annotator"],
                     "comparable_with_leaderboard": s["comparable_with_leaderboard"]})
    names = [r["run"] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}: name them NAME=DIR")
    table = _markdown(rows)
    storage.write_text(storage.join_uri(out_uri, "comparison.md"), table)
    storage.write_text(storage.join_uri(out_uri, "comparison.json"), json.dumps(rows, indent=2))
    storage.write_bytes(storage.join_uri(out_uri, "comparison.png"), _plot(rows))
    print(table)
    return {"runs": len(rows), "table": storage.join_uri(out_uri, "comparison.md"),
            "chart": storage.join_uri(out_uri, "comparison.png"), "best_lc": max(rows, key=lambda r: r["lc_win_rate"])["run"]}


def _markdown(rows: list[dict]) -> str:
    lines = ["| run | WR (%) | ± SE | LC WR (%) | ± SE | avg length | n | judge |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        judge = r["annotator"] if r["comparable_with_leaderboard"] else f"{r['annotator']} (not leaderboard-comparable)"
        lines.append(f"| {r['run']} | {r['win_rate']:.2f} | {r['standard_error']:.2f} | {r['lc_win_rate']:.2f} | "
                     f"{r['lc_standard_error']:.2f} | {r['avg_length']} | {r['n']} | {judge} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 4.2))
    wr = ax.bar(x - width / 2, [r["win_rate"] for r in rows], width, yerr=[r["standard_error"] for r in rows],
                capsize=3, label="win rate", color="#4c72b0")
    lc = ax.bar(x + width / 2, [r["lc_win_rate"] for r in rows], width, yerr=[r["lc_standard_error"] for r in rows],
                capsize=3, label="LC win rate", color="#dd8452")
    ax.bar_label(wr, fmt="%.1f", fontsize=8, padding=2)
    ax.bar_label(lc, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r['run']}\n(avg len {r['avg_length']})" for r in rows], fontsize=8)
    ax.set_ylabel("% vs gpt4_1106_preview reference")
    judges = sorted({r["annotator"] for r in rows})
    comparable = all(r["comparable_with_leaderboard"] for r in rows)
    ax.set_title("AlpacaEval 2.0, judge: " + ", ".join(judges)
                 + ("" if comparable else "\n(not comparable with the leaderboard)"), fontsize=9)
    ax.set_ylim(0, max(10.0, max(max(r["win_rate"], r["lc_win_rate"]) for r in rows) * 1.25))
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
