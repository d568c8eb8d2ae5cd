"""The experiment grid: students × arms × seeds, each student's tuned global-β baseline, and the
comparison that puts them side by side.

    per student   base          the untrained backbone (evaluated once, no seed)
                  global@β      standard DPO at each β of `global_betas`, once per seed
                  semantic      SP²DPO's β_i, once per seed
                  shuffled      β_i permuted across the pairs, once per seed
    (`controls` picks which of global / semantic / shuffled are in; `evaluate_base` the base row)

The artifacts (`semantic`, `shuffled`, one `global-β` per β) are built once from one annotation
run and shared by every student; each student scores its own reference log-probs once, shared by
its arms. The functions here are pure: they expand a config into arms, pick `tuned_global` from
scored rows, and assemble the comparison dict that sp2dpo/pipeline/report.py renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Deltas the comparison reports per student and seed: (name, arm a, arm b), b minus a.
DELTAS = (("semantic - tuned_global", "tuned_global", "semantic"), ("semantic - shuffled", "shuffled", "semantic"))
TUNED_RULE = ("the global arm with the highest LC win rate (mean over seeds); when any global arm's LC win rate "
              "is not estimable, the highest raw win rate instead; ties go to the beta listed first in global_betas")


@dataclass(frozen=True)
class Arm:
    """One row of the grid: a (student, arm, seed) to train (unless base) and evaluate."""

    student: str
    model: str
    arm: str  # base | global@0.05 | semantic | shuffled
    control: str | None = None  # semantic | global | shuffled; None for base
    global_beta: float | None = None
    seed: int | None = None  # None for base

    @property
    def artifact(self) -> str | None:
        """The shared artifact this arm trains on (`beta-<artifact>.parquet`), None for base."""
        if self.control is None:
            return None
        return f"global-{self.global_beta:g}" if self.control == "global" else self.control

    @property
    def run_id(self) -> str:
        """The arm's name inside its student's evaluate stage (and its served model id)."""
        return "base" if self.control is None else f"{self.artifact}-s{self.seed}"

    @property
    def train_stage(self) -> str | None:
        return None if self.control is None else f"train-{self.student}-{self.run_id}"


def global_arm(beta: float) -> str:
    return f"global@{beta:g}"


def grid_arms(config: Any) -> list[Arm]:
    """Every (student, arm, seed) of a grid config, students in order, base first."""
    arms: list[Arm] = []
    for student in config.students:
        if config.evaluate_base:
            arms.append(Arm(student.name, student.model, "base"))
        for seed in config.seeds:
            if "global" in config.controls:
                arms += [Arm(student.name, student.model, global_arm(b), "global", b, seed)
                         for b in config.global_betas]
            arms += [Arm(student.name, student.model, c, c, None, seed) for c in ("semantic", "shuffled")
                     if c in config.controls]
    return arms


def artifact_specs(config: Any) -> dict[str, dict[str, Any]]:
    """The artifacts every student trains on, built once: name → build_artifact arguments."""
    specs: dict[str, dict[str, Any]] = {}
    for control in ("semantic", "shuffled"):
        if control in config.controls:
            specs[control] = {"control": control}
    if "global" in config.controls:
        for beta in config.global_betas:
            specs[f"global-{beta:g}"] = {"control": "global", "global_beta": beta}
    return specs


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def select_tuned_global(rows: list[dict[str, Any]], student: str) -> dict[str, Any] | None:
    """The student's `tuned_global` arm by TUNED_RULE, with the values it was chosen on."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["student"] == student and row["control"] == "global":
            by_arm.setdefault(row["arm"], []).append(row)
    if not by_arm:
        return None
    lc_ok = all(_finite(r["lc_win_rate"]) for arm_rows in by_arm.values() for r in arm_rows)
    metric = "lc_win_rate" if lc_ok else "win_rate"
    values = {arm: sum(r[metric] for r in arm_rows) / len(arm_rows) for arm, arm_rows in by_arm.items()}
    best = max(values, key=values.__getitem__)  # first of equal maxima: global_betas order
    return {"arm": best, "global_beta": by_arm[best][0]["global_beta"], "metric": metric,
            "fallback": None if lc_ok else "LC win rate not estimable for some global arm: chosen by raw win rate",
            "values": values, "rule": TUNED_RULE}


def cost(summary: dict[str, Any], train: Any) -> dict[str, Any]:
    """Wall time, CPU/GPU-hours and tokens of one training run, from its summary and TrainConfig."""
    wall = float(summary.get("wall_seconds") or 0.0)
    per_worker = dict(train.resources_per_worker or {})
    cpus = float(per_worker.get("CPU", 1.0))
    gpus = float(per_worker.get("GPU", 1.0 if train.use_gpu else 0.0))
    workers = int(summary.get("num_workers") or train.num_workers)
    return {"wall_seconds": wall, "train_seconds": summary.get("train_seconds"),
            "cpu_hours": round(wall * workers * cpus / 3600, 6), "gpu_hours": round(wall * workers * gpus / 3600, 6),
            "tokens_trained": summary.get("tokens"), "pairs_trained": summary.get("pairs_trained"),
            "steps": summary.get("steps"), "num_workers": workers}


def score_row(arm: Arm, score: dict[str, Any]) -> dict[str, Any]:
    """One row of the table: the arm and its AlpacaEval numbers (LC and its SE may be null)."""
    return {"student": arm.student, "model": arm.model, "arm": arm.arm, "control": arm.control,
            "global_beta": arm.global_beta, "seed": arm.seed, "run_id": arm.run_id,
            **{k: score.get(k) for k in ("win_rate", "standard_error", "lc_win_rate", "lc_standard_error",
                                         "avg_length", "n", "n_missing", "annotator")},
            "lc_note": score.get("lc_note")}


def delta_pairs(rows: list[dict[str, Any]], tuned: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The (student, seed, name, run a, run b) of each delta the comparison reports."""
    index = {(r["student"], r["arm"], r["seed"]): r for r in rows}
    out = []
    for student in dict.fromkeys(r["student"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["student"] == student and r["seed"] is not None})
        for seed in seeds:
            for name, a, b in DELTAS:
                a_arm = (tuned.get(student) or {}).get("arm") if a == "tuned_global" else a
                ra, rb = index.get((student, a_arm, seed)), index.get((student, b, seed))
                if ra is not None and rb is not None:
                    out.append({"student": student, "seed": seed, "comparison": name, "a": ra["arm"], "b": rb["arm"],
                                "a_run": ra["run_id"], "b_run": rb["run_id"]})
    return out
