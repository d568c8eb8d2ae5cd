"""The audit report of a β artifact: what a reviewer reads before trusting a run.

    sp2dpo audit runs/beta.parquet --out runs/audit

Writes OUT/report.md (provenance, counts, β statistics per category, agreement, flipped and
dropped pairs, the schedule config) and three PNG plots: the β histogram, the β histogram by
category, and the category × magnitude heat map (pair counts, with the mean β in each cell).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from sp2dpo.annotate.schema import MAGNITUDE_MAX, MAGNITUDE_MIN
from sp2dpo.schedule.artifact import read_artifact
from sp2dpo.schedule.beta import ALL_CATEGORIES
from sp2dpo.storage import join_uri, makedirs, write_bytes
from sp2dpo.utils import progress_bar

LISTED_PAIRS = 20  # flipped/dropped pairs listed in full; the counts are always complete


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _stats(values: np.ndarray) -> dict[str, float | None]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {k: None for k in ("mean", "std", "min", "median", "max")}
    # A constant column (a pinned category) reports std 0, not float noise.
    std = 0.0 if values.min() == values.max() else float(values.std())
    return {"mean": float(values.mean()), "std": std, "min": float(values.min()),
            "median": float(np.median(values)), "max": float(values.max())}


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in ("beta", "beta_semantic", "magnitude", "confidence", "agreement"):
        out[name] = table[name].to_numpy(zero_copy_only=False).astype(np.float64)  # null → NaN
    for name in ("n_annotations", "n_failed"):
        out[name] = table[name].to_numpy(zero_copy_only=False).astype(np.int64)
    for name in ("flipped", "dropped"):
        out[name] = table[name].to_numpy(zero_copy_only=False).astype(bool)
    out["category"] = np.asarray(table["category"].to_pylist(), dtype=object)
    out["pair_id"] = np.asarray(table["pair_id"].to_pylist(), dtype=object)
    return out


def plot_beta_hist(col: dict[str, np.ndarray], cfg: dict, control: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = ~col["dropped"]
    beta = col["beta"][trained]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(cfg["beta_min"] * 0.9, cfg["beta_max"] * 1.02, 41)
    ax.hist(beta, bins=bins, color="#4c72b0", edgecolor="white")
    ax.axvline(cfg["beta0"], color="black", linestyle="-", linewidth=1.2, label=f"β₀ = {cfg['beta0']:g}")
    if len(beta):
        ax.axvline(beta.mean(), color="#dd8452", linestyle="--", linewidth=1.2, label=f"mean β = {beta.mean():.4g}")
    for edge, name in ((cfg["beta_min"], "β_min"), (cfg["beta_max"], "β_max")):
        ax.axvline(edge, color="grey", linestyle=":", linewidth=1, label=f"{name} = {edge:g}")
    ax.set_xlabel("β_i")
    ax.set_ylabel("pairs")
    ax.set_title(f"β over the {trained.sum():,} trained pairs (control: {control})")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_beta_by_category(col: dict[str, np.ndarray], cfg: dict, categories: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3
    nrows = max(1, -(-len(categories) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, 2.4 * nrows), sharex=True, squeeze=False)
    bins = np.linspace(cfg["beta_min"] * 0.9, cfg["beta_max"] * 1.02, 31)
    for ax, category in zip(axes.flat, categories):
        mask = (col["category"] == category) & ~col["dropped"]
        values = col["beta"][mask]
        ax.hist(values, bins=bins, color="#55a868", edgecolor="white")
        ax.axvline(cfg["beta0"], color="black", linewidth=0.8)
        dropped = int(((col["category"] == category) & col["dropped"]).sum())
        title = f"{category} (n={mask.sum():,}" + (f", {dropped:,} dropped" if dropped else "") + ")"
        ax.set_title(title, fontsize=9)
        if len(values):
            ax.axvline(values.mean(), color="#dd8452", linestyle="--", linewidth=0.8)
    for ax in list(axes.flat)[len(categories):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("β_i")
    fig.suptitle("β by consensus category (black: β₀, dashed: category mean)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_heatmap(col: dict[str, np.ndarray], categories: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = np.arange(MAGNITUDE_MIN, MAGNITUDE_MAX + 0.5, 0.5)  # medians of two votes land on halves
    rows = [c for c in categories if np.isfinite(col["magnitude"][col["category"] == c]).any()]
    counts = np.zeros((len(rows), len(levels)), dtype=np.int64)
    mean_beta = np.full((len(rows), len(levels)), np.nan)
    for i, category in enumerate(rows):
        for j, level in enumerate(levels):
            mask = (col["category"] == category) & np.isclose(col["magnitude"], level)
            counts[i, j] = mask.sum()
            trained = mask & ~col["dropped"]
            if trained.any():
                mean_beta[i, j] = col["beta"][trained].mean()
    fig, ax = plt.subplots(figsize=(1.1 * len(levels) + 3, 0.6 * max(len(rows), 1) + 1.6))
    if not rows:
        ax.text(0.5, 0.5, "no annotated pairs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, label="pairs")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(len(rows)):
        for j in range(len(levels)):
            if counts[i, j]:
                text = f"{counts[i, j]}\nβ={mean_beta[i, j]:.3f}" if np.isfinite(mean_beta[i, j]) else f"{counts[i, j]}\ndropped"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > threshold else "black")
    ax.set_xticks(range(len(levels)), [f"{level:g}" for level in levels])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("consensus magnitude (0 none · 1 minor · 2 clear · 3 severe)")
    ax.set_title("pairs per category × magnitude (cell: count, mean β of trained pairs)", fontsize=10)
    return _png(fig)


def _config_yaml(cfg: dict) -> str:
    """The config in ScheduleConfig's field order (the metadata JSON has its keys sorted)."""
    from pydantic import ValidationError

    from sp2dpo.schedule.beta import ScheduleConfig

    try:
        return ScheduleConfig.model_validate(cfg).to_yaml().rstrip()
    except ValidationError:  # written by another version: show it as stored
        return yaml.safe_dump(cfg, sort_keys=False).rstrip()


def _pair_list(col: dict[str, np.ndarray], mask: np.ndarray) -> list[str]:
    rows = np.flatnonzero(mask)
    lines = ["| pair_id | category | magnitude | confidence | agreement | annotations | β |", "|---|---|---|---|---|---|---|"]
    for i in rows[:LISTED_PAIRS]:
        lines.append(f"| `{col['pair_id'][i]}` | {col['category'][i]} | {_fmt(col['magnitude'][i])} | "
                     f"{_fmt(col['confidence'][i], 3)} | {_fmt(col['agreement'][i], 3)} | {col['n_annotations'][i]} | "
                     f"{_fmt(col['beta'][i])} |")
    if len(rows) > LISTED_PAIRS:
        lines.append(f"\n({len(rows) - LISTED_PAIRS:,} more not listed; filter the artifact on this flag for all.)")
    return lines


def write_audit(artifact_path: str, out_dir: str, show_progress: bool = False) -> dict[str, Any]:
    """Write OUT/report.md and the PNG plots for the artifact at `artifact_path`; return the summary."""
    with progress_bar(5, "audit", disable=not show_progress) as bar:
        table, meta = read_artifact(artifact_path)
        cfg = meta.get("schedule_config")
        if not cfg:
            raise ValueError(f"{artifact_path}: no schedule_config in the metadata; not written by `sp2dpo schedule`")
        col = _columns(table)
        control = meta.get("control", "?")
        present = [c for c in ALL_CATEGORIES if (col["category"] == c).any()]
        makedirs(out_dir)
        bar.update()

        plots = {
            "beta_hist.png": plot_beta_hist(col, cfg, control),
            "beta_by_category.png": plot_beta_by_category(col, cfg, present),
            "category_magnitude_heatmap.png": plot_heatmap(col, present),
        }
        for name, data in plots.items():
            write_bytes(join_uri(out_dir, name), data)
            bar.update()

        n = table.num_rows
        trained = ~col["dropped"]
        overall = _stats(col["beta"][trained])
        prov = meta.get("provenance", {})
        lines = [
            "# β artifact audit",
            "",
            f"- artifact: `{artifact_path}`",
            f"- control: **{control}**" + (f" (shuffle seed {meta.get('shuffle_seed')})" if control == "shuffled" else ""),
            f"- schedule hash: `{meta.get('schedule_hash')}` · artifact version {meta.get('artifact_version')} · "
            f"sp2dpo {meta.get('library_version')}",
            f"- pairs: {n:,} · trained: {int(trained.sum()):,} · dropped: {int(col['dropped'].sum()):,} · "
            f"flipped: {int(col['flipped'].sum()):,} · unannotated: {int((col['category'] == 'unannotated').sum()):,}",
            f"- β over trained pairs: mean {_fmt(overall['mean'])} (β₀ = {cfg['beta0']:g}"
            + (", mean-rescaled" if cfg.get("rescale_mean") else "") + f"), std {_fmt(overall['std'])}, "
            f"min {_fmt(overall['min'])}, median {_fmt(overall['median'])}, max {_fmt(overall['max'])}; "
            f"rescale factor {_fmt(meta.get('beta_stats', {}).get('rescale_factor'))}",
            f"- β column sha256: `{meta.get('beta_digest')}` · pair-id digest: `{meta.get('pair_ids_digest')}`",
            "",
            "## β by category",
            "",
            "β statistics over the trained pairs of each consensus category; *semantic β mean* is the schedule's "
            "value before any control (equal to *β mean* under `--control semantic`).",
            "",
            "| category | pairs | share | dropped | flipped | β mean | β std | β min | β median | β max | semantic β mean "
            "| magnitude mean | confidence mean | agreement mean |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        per_category = {}
        for category in present:
            mask = col["category"] == category
            s = _stats(col["beta"][mask & trained])
            sem = _stats(col["beta_semantic"][mask & trained])
            per_category[category] = {"pairs": int(mask.sum()), **s}
            lines.append(
                f"| {category} | {mask.sum():,} | {mask.mean():.1%} | {int((mask & col['dropped']).sum()):,} | "
                f"{int((mask & col['flipped']).sum()):,} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['min'])} | "
                f"{_fmt(s['median'])} | {_fmt(s['max'])} | {_fmt(sem['mean'])} | "
                f"{_fmt(float(np.nanmean(col['magnitude'][mask])) if np.isfinite(col['magnitude'][mask]).any() else None, 3)} | "
                f"{_fmt(float(np.nanmean(col['confidence'][mask])) if np.isfinite(col['confidence'][mask]).any() else None, 3)} | "
                f"{_fmt(float(np.nanmean(col['agreement'][mask])) if np.isfinite(col['agreement'][mask]).any() else None, 3)} |"
            )

        agreement = col["agreement"][np.isfinite(col["agreement"])]
        n_ann = col["n_annotations"]
        bins = [("unanimous (1.0)", agreement >= 1.0), ("≥ 2/3", (agreement >= 2 / 3 - 1e-9) & (agreement < 1.0)),
                ("≥ 1/2", (agreement >= 0.5) & (agreement < 2 / 3 - 1e-9)), ("< 1/2", agreement < 0.5)]
        lines += [
            "",
            "## Agreement",
            "",
            f"Consensus over {int(n_ann.sum()):,} valid annotations ({int(col['n_failed'].sum()):,} failed, counted but not "
            f"voted). Mean agreement {_fmt(float(agreement.mean()) if len(agreement) else None, 3)} over "
            f"{len(agreement):,} annotated pairs; a pair's confidence is its voters' mean confidence × agreement.",
            "",
            "| agreement | pairs |",
            "|---|---|",
            *[f"| {label} | {int(mask.sum()):,} |" for label, mask in bins],
            "",
            "| valid annotations per pair | pairs |",
            "|---|---|",
            *[f"| {k} | {int(v):,} |" for k, v in zip(*np.unique(n_ann, return_counts=True))],
            "",
            "## Annotation provenance",
            "",
            f"- annotations: `{prov.get('annotations')}` · pairs: `{prov.get('pairs')}`",
            f"- rows read: {prov.get('annotation_rows')} · by status: {prov.get('status_counts')} · "
            f"duplicates ignored: {prov.get('duplicate_rows')} · rows for pairs not in the table: {prov.get('orphan_rows')}",
            f"- teachers (rows): {prov.get('teachers')}",
            f"- prompt versions (rows): {prov.get('prompt_versions')}",
            "",
            f"## Flipped pairs ({int(col['flipped'].sum()):,})",
            "",
            "Chosen and rejected are swapped at training (the consensus says the rejected answer is better).",
            "",
            *(_pair_list(col, col["flipped"]) if col["flipped"].any() else ["None."]),
            "",
            f"## Dropped pairs ({int(col['dropped'].sum()):,})",
            "",
            "Excluded from training by the noise / reversed / unannotated policy.",
            "",
            *(_pair_list(col, col["dropped"]) if col["dropped"].any() else ["None."]),
            "",
            "## Plots",
            "",
            "![β histogram](beta_hist.png)",
            "",
            "![β by category](beta_by_category.png)",
            "",
            "![category × magnitude](category_magnitude_heatmap.png)",
            "",
            "## Schedule config",
            "",
            "```yaml",
            _config_yaml(cfg),
            "```",
            "",
        ]
        report = join_uri(out_dir, "report.md")
        write_bytes(report, "\n".join(lines).encode())
        bar.update()
    return {
        "report": report,
        "plots": [join_uri(out_dir, name) for name in plots],
        "control": control,
        "pairs": n,
        "trained": int(trained.sum()),
        "dropped": int(col["dropped"].sum()),
        "flipped": int(col["flipped"].sum()),
        "mean_beta": overall["mean"],
        "per_category": per_category,
    }
