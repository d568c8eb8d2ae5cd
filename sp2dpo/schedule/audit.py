"""The audit report of a β artifact: what a reviewer reads before trusting a run.

    sp2dpo audit runs/beta.parquet --out runs/audit

Writes OUT/report.md (provenance, counts, β statistics per category, agreement, flipped and
dropped pairs, the schedule config) and three PNG plots: the β histogram, the β histogram by
category, and the category × magnitude heat map (pair counts, with the mean β in each cell).

`audit_stats` computes every number of the report into a dict (testable on its own);
`render_report` turns that dict into Markdown; `write_audit` writes both, and the plots.
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
                cell = f"β={mean_beta[i, j]:.3f}" if np.isfinite(mean_beta[i, j]) else "dropped"
                text = f"{counts[i, j]}\n{cell}"
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

    from sp2dpo.schedule.config import ScheduleConfig

    try:
        return ScheduleConfig.model_validate(cfg).to_yaml().rstrip()
    except ValidationError:  # written by another version: show it as stored
        return yaml.safe_dump(cfg, sort_keys=False).rstrip()


# ----------------------------------------------------------------------------- statistics


def _finite_mean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _number(x: Any) -> Any:
    """NaN → None, numpy scalars → Python numbers: the statistics dict holds plain values."""
    if isinstance(x, np.generic):
        x = x.item()
    return None if isinstance(x, float) and not np.isfinite(x) else x


def _pairs(col: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    """How many pairs `mask` selects, and the first LISTED_PAIRS of them in full."""
    rows = np.flatnonzero(mask)
    names = ("pair_id", "category", "magnitude", "confidence", "agreement", "n_annotations", "beta")
    listed = [{name: _number(col[name][i]) for name in names} for i in rows[:LISTED_PAIRS]]
    return {"count": len(rows), "listed": listed}


def _category_stats(col: dict[str, np.ndarray], category: str) -> dict[str, Any]:
    mask = col["category"] == category
    trained = mask & ~col["dropped"]
    return {
        "pairs": int(mask.sum()),
        "share": float(mask.mean()),
        "dropped": int((mask & col["dropped"]).sum()),
        "flipped": int((mask & col["flipped"]).sum()),
        "beta": _stats(col["beta"][trained]),
        "beta_semantic_mean": _stats(col["beta_semantic"][trained])["mean"],
        "magnitude_mean": _finite_mean(col["magnitude"][mask]),
        "confidence_mean": _finite_mean(col["confidence"][mask]),
        "agreement_mean": _finite_mean(col["agreement"][mask]),
    }


def _agreement_stats(col: dict[str, np.ndarray]) -> dict[str, Any]:
    agreement = col["agreement"][np.isfinite(col["agreement"])]
    n_ann = col["n_annotations"]
    bins = [("unanimous (1.0)", agreement >= 1.0), ("≥ 2/3", (agreement >= 2 / 3 - 1e-9) & (agreement < 1.0)),
            ("≥ 1/2", (agreement >= 0.5) & (agreement < 2 / 3 - 1e-9)), ("< 1/2", agreement < 0.5)]
    return {
        "valid_annotations": int(n_ann.sum()),
        "failed_annotations": int(col["n_failed"].sum()),
        "mean": float(agreement.mean()) if len(agreement) else None,
        "annotated_pairs": len(agreement),
        "bins": {label: int(mask.sum()) for label, mask in bins},
        "annotations_per_pair": {int(k): int(v) for k, v in zip(*np.unique(n_ann, return_counts=True))},
    }


def audit_stats(table: pa.Table, meta: dict[str, Any]) -> dict[str, Any]:
    """Every number the report shows, from the artifact table and its metadata."""
    col = _columns(table)
    trained = ~col["dropped"]
    present = [c for c in ALL_CATEGORIES if (col["category"] == c).any()]
    return {
        "control": meta.get("control", "?"),
        "pairs": table.num_rows,
        "trained": int(trained.sum()),
        "dropped": int(col["dropped"].sum()),
        "flipped": int(col["flipped"].sum()),
        "unannotated": int((col["category"] == "unannotated").sum()),
        "beta": _stats(col["beta"][trained]),
        "rescale_factor": meta.get("beta_stats", {}).get("rescale_factor"),
        "per_category": {c: _category_stats(col, c) for c in present},
        "agreement": _agreement_stats(col),
        "flipped_pairs": _pairs(col, col["flipped"]),
        "dropped_pairs": _pairs(col, col["dropped"]),
    }


# ----------------------------------------------------------------------------- rendering


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines; cells are printed as given."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def _pair_list(pairs: dict[str, Any]) -> list[str]:
    if not pairs["count"]:
        return ["None."]
    header = ["pair_id", "category", "magnitude", "confidence", "agreement", "annotations", "β"]
    rows = [[f"`{r['pair_id']}`", r["category"], _fmt(r["magnitude"]), _fmt(r["confidence"], 3),
             _fmt(r["agreement"], 3), r["n_annotations"], _fmt(r["beta"])] for r in pairs["listed"]]
    lines = _table(header, rows)
    if pairs["count"] > LISTED_PAIRS:
        more = pairs["count"] - LISTED_PAIRS
        lines.append(f"\n({more:,} more not listed; filter the artifact on this flag for all.)")
    return lines


def _overview(stats: dict[str, Any], meta: dict[str, Any], cfg: dict, artifact_path: str) -> list[str]:
    control, beta = stats["control"], stats["beta"]
    shuffled = f" (shuffle seed {meta.get('shuffle_seed')})" if control == "shuffled" else ""
    rescaled = ", mean-rescaled" if cfg.get("rescale_mean") else ""
    return [
        "# β artifact audit",
        "",
        f"- artifact: `{artifact_path}`",
        f"- control: **{control}**{shuffled}",
        f"- schedule hash: `{meta.get('schedule_hash')}` · artifact version {meta.get('artifact_version')} · "
        f"sp2dpo {meta.get('library_version')}",
        f"- pairs: {stats['pairs']:,} · trained: {stats['trained']:,} · dropped: {stats['dropped']:,} · "
        f"flipped: {stats['flipped']:,} · unannotated: {stats['unannotated']:,}",
        f"- β over trained pairs: mean {_fmt(beta['mean'])} (β₀ = {cfg['beta0']:g}{rescaled}), "
        f"std {_fmt(beta['std'])}, min {_fmt(beta['min'])}, median {_fmt(beta['median'])}, "
        f"max {_fmt(beta['max'])}; rescale factor {_fmt(stats['rescale_factor'])}",
        f"- β column sha256: `{meta.get('beta_digest')}` · pair-id digest: `{meta.get('pair_ids_digest')}`",
    ]


def _by_category(stats: dict[str, Any]) -> list[str]:
    header = ["category", "pairs", "share", "dropped", "flipped", "β mean", "β std", "β min", "β median", "β max",
              "semantic β mean", "magnitude mean", "confidence mean", "agreement mean"]
    rows = [[c, f"{s['pairs']:,}", f"{s['share']:.1%}", f"{s['dropped']:,}", f"{s['flipped']:,}",
             *(_fmt(s["beta"][k]) for k in ("mean", "std", "min", "median", "max")), _fmt(s["beta_semantic_mean"]),
             _fmt(s["magnitude_mean"], 3), _fmt(s["confidence_mean"], 3), _fmt(s["agreement_mean"], 3)]
            for c, s in stats["per_category"].items()]
    return [
        "## β by category",
        "",
        "β statistics over the trained pairs of each consensus category; *semantic β mean* is the schedule's "
        "value before any control (equal to *β mean* under `--control semantic`).",
        "",
        *_table(header, rows),
    ]


def _agreement(stats: dict[str, Any]) -> list[str]:
    a = stats["agreement"]
    return [
        "## Agreement",
        "",
        f"Consensus over {a['valid_annotations']:,} valid annotations ({a['failed_annotations']:,} failed, counted "
        f"but not voted). Mean agreement {_fmt(a['mean'], 3)} over {a['annotated_pairs']:,} annotated pairs; a "
        "pair's confidence is its voters' mean confidence × agreement.",
        "",
        *_table(["agreement", "pairs"], [[label, f"{n:,}"] for label, n in a["bins"].items()]),
        "",
        *_table(["valid annotations per pair", "pairs"], [[k, f"{n:,}"] for k, n in a["annotations_per_pair"].items()]),
    ]


def _provenance(meta: dict[str, Any]) -> list[str]:
    prov = meta.get("provenance", {})
    return [
        "## Annotation provenance",
        "",
        f"- annotations: `{prov.get('annotations')}` · pairs: `{prov.get('pairs')}`",
        f"- rows read: {prov.get('annotation_rows')} · by status: {prov.get('status_counts')} · "
        f"duplicates ignored: {prov.get('duplicate_rows')} · "
        f"rows for pairs not in the table: {prov.get('orphan_rows')}",
        f"- teachers (rows): {prov.get('teachers')}",
        f"- prompt versions (rows): {prov.get('prompt_versions')}",
    ]


def render_report(stats: dict[str, Any], meta: dict[str, Any], cfg: dict, artifact_path: str) -> str:
    """The Markdown report of `audit_stats(...)`; the plots are referenced by their file names."""
    flipped, dropped = stats["flipped_pairs"], stats["dropped_pairs"]
    sections = [
        _overview(stats, meta, cfg, artifact_path),
        _by_category(stats),
        _agreement(stats),
        _provenance(meta),
        [f"## Flipped pairs ({flipped['count']:,})", "",
         "Chosen and rejected are swapped at training (the consensus says the rejected answer is better).", "",
         *_pair_list(flipped)],
        [f"## Dropped pairs ({dropped['count']:,})", "",
         "Excluded from training by the noise / reversed / unannotated policy.", "", *_pair_list(dropped)],
        ["## Plots", "", "![β histogram](beta_hist.png)", "", "![β by category](beta_by_category.png)", "",
         "![category × magnitude](category_magnitude_heatmap.png)"],
        ["## Schedule config", "", "```yaml", _config_yaml(cfg), "```"],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def write_audit(artifact_path: str, out_dir: str, show_progress: bool = False) -> dict[str, Any]:
    """Write OUT/report.md and the PNG plots for the artifact at `artifact_path`; return the summary."""
    with progress_bar(5, "audit", disable=not show_progress) as bar:
        table, meta = read_artifact(artifact_path)
        cfg = meta.get("schedule_config")
        if not cfg:
            raise ValueError(f"{artifact_path}: no schedule_config in the metadata; not written by `sp2dpo schedule`")
        stats = audit_stats(table, meta)
        col = _columns(table)
        present = list(stats["per_category"])
        makedirs(out_dir)
        bar.update()

        plots = {
            "beta_hist.png": plot_beta_hist(col, cfg, stats["control"]),
            "beta_by_category.png": plot_beta_by_category(col, cfg, present),
            "category_magnitude_heatmap.png": plot_heatmap(col, present),
        }
        for name, data in plots.items():
            write_bytes(join_uri(out_dir, name), data)
            bar.update()

        report = join_uri(out_dir, "report.md")
        write_bytes(report, render_report(stats, meta, cfg, artifact_path).encode())
        bar.update()
    return {
        "report": report,
        "plots": [join_uri(out_dir, name) for name in plots],
        "control": stats["control"],
        "pairs": stats["pairs"],
        "trained": stats["trained"],
        "dropped": stats["dropped"],
        "flipped": stats["flipped"],
        "mean_beta": stats["beta"]["mean"],
        "per_category": {c: {"pairs": s["pairs"], **s["beta"]} for c, s in stats["per_category"].items()},
    }
