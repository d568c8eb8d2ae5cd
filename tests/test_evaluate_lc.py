"""Length-controlled win rate: AlpacaEval's hub files through the Hugging Face cache, parity with
alpaca_eval's own `get_length_controlled_winrate`, LC on models the difficulty estimate has never
seen, LC that is not estimable, and paired differences between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_evaluate_score import annotations_path, read
from typer.testing import CliRunner

from sp2dpo.cli import app
from sp2dpo.evaluate.config import EvaluateConfig
from sp2dpo.evaluate.difficulty import (
    estimate_difficulty,
    official_leaderboard,
    packaged_estimate,
    read_model_annotations,
    synthetic_gamed,
)
from sp2dpo.evaluate.paired import paired_comparison
from sp2dpo.evaluate.protocol import load_eval_set
from sp2dpo.evaluate.score import score_annotations

# The official annotations of ~45 leaderboard models (not shipped: ~60 MB; see its PROVENANCE.md).
RESULTS = Path(os.environ.get("SP2DPO_ALPACA_EVAL_RESULTS",
                              Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "results"))
needs_results = pytest.mark.skipif(not RESULTS.is_dir(), reason=f"leaderboard annotations not found at {RESULTS} "
                                   "(set SP2DPO_ALPACA_EVAL_RESULTS)")


@pytest.fixture(scope="module")
def eval_rows():
    return load_eval_set()


@pytest.fixture(scope="module")
def instructions(eval_rows):
    return [r["instruction"] for r in eval_rows]


def _hub_cache(root: Path, files: dict[str, str]) -> Path:
    """huggingface_hub's own cache layout under HF_HOME=root: hub/datasets--tatsu-lab--alpaca_eval
    with snapshots/<revision>/<file> and refs/main naming the revision."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / "datasets--tatsu-lab--alpaca_eval"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def _official_layout_files(eval_rows, values: np.ndarray) -> dict[str, str]:
    """df_gamed.csv and instruction_difficulty.csv in AlpacaEval's layouts, holding `values`."""
    gamed = synthetic_gamed(values, np.array([len(r["output"]) for r in eval_rows], float))
    gamed["not_gamed_baseline"] = False
    gamed = gamed[["model", "index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"]]
    difficulty = "index,instruction_difficulty\n" + "".join(f"{i},{float(v)!r}\n" for i, v in enumerate(values))
    return {"df_gamed.csv": gamed.to_csv(index=False), "instruction_difficulty.csv": difficulty}


def _offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def _cli_json(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sp2dpo.cli", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the official path: AlpacaEval's files from the Hugging Face cache ---------------------------

def test_hub_cache_files_are_used_offline(tmp_path, eval_rows, instructions):
    """With df_gamed.csv in the hub cache (HF_HUB_OFFLINE=1) `evaluate score` takes difficulty and
    the gamed rows from it and says so; the values are the ones in the cached file."""
    values = packaged_estimate(instructions)[::-1].copy()  # distinguishable from the shipped estimate
    files = _official_layout_files(eval_rows, values)
    _hub_cache(tmp_path / "hf", files)
    (tmp_path / "df_gamed.csv").write_text(files["df_gamed.csv"])
    path = str(annotations_path("alpaca-7b"))
    env = _offline_env(tmp_path / "hf")

    from_hub = _cli_json(["evaluate", "score", path], env)
    assert from_hub["difficulty_source"].startswith("hub tatsu-lab/alpaca_eval/df_gamed.csv")
    assert from_hub["df_gamed_source"].startswith("hub tatsu-lab/alpaca_eval/df_gamed.csv")
    assert str(tmp_path / "hf" / "hub") in from_hub["difficulty_source"]
    as_file = score_annotations(path, df_gamed=str(tmp_path / "df_gamed.csv"), hub_files=False)
    assert from_hub["lc_win_rate"] == pytest.approx(as_file["lc_win_rate"], abs=1e-9)
    shipped = score_annotations(path, hub_files=False)
    assert shipped["difficulty_source"].startswith("offline estimate")
    assert abs(from_hub["lc_win_rate"] - shipped["lc_win_rate"]) > 0.05  # the cached file really moved LC


def test_hub_cache_difficulty_alone_and_explicit_files_win(tmp_path, eval_rows, instructions):
    """Only instruction_difficulty.csv cached: difficulty from it, gamed rows synthesised; an
    --instruction-difficulty file given on the command line wins over the cache."""
    values = packaged_estimate(instructions)[::-1].copy()
    files = _official_layout_files(eval_rows, values)
    _hub_cache(tmp_path / "hf", {"instruction_difficulty.csv": files["instruction_difficulty.csv"]})
    env = _offline_env(tmp_path / "hf")
    path = str(annotations_path("alpaca-7b"))
    s = _cli_json(["evaluate", "score", path], env)
    assert s["difficulty_source"].startswith("hub tatsu-lab/alpaca_eval/instruction_difficulty.csv")
    assert s["df_gamed_source"].startswith("synthetic")
    own = tmp_path / "mine.csv"
    own.write_text(files["instruction_difficulty.csv"])
    explicit = _cli_json(["evaluate", "score", path, "--instruction-difficulty", str(own)], env)
    assert explicit["difficulty_source"] == f"file {own}"
    assert explicit["lc_win_rate"] == pytest.approx(s["lc_win_rate"], abs=1e-9)


def test_no_hub_files_and_offline_fall_back_to_the_estimate(tmp_path, eval_rows, instructions):
    """An empty cache offline, or hub_files=false with a full cache: the shipped estimate."""
    s = _cli_json(["evaluate", "score", str(annotations_path("alpaca-7b"))], _offline_env(tmp_path / "empty"))
    assert s["difficulty_source"].startswith("offline estimate") and s["df_gamed_source"].startswith("synthetic")
    _hub_cache(tmp_path / "hf", _official_layout_files(eval_rows, packaged_estimate(instructions)[::-1].copy()))
    off = _cli_json(["evaluate", "score", str(annotations_path("alpaca-7b")), "--set", "hub_files=false"],
                    _offline_env(tmp_path / "hf"))
    assert off["difficulty_source"].startswith("offline estimate")
    assert off["lc_win_rate"] == pytest.approx(s["lc_win_rate"], abs=1e-9)


# --- parity with alpaca_eval itself ----------------------------------------------------------------

PARITY = r"""
import json, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
from sp2dpo.evaluate.score import score_annotations
rows = json.load(open(sys.argv[1]))
theirs = get_length_controlled_winrate(rows, save_weights_dir=None, is_warn_extreme_changes=False)
ours = score_annotations(sys.argv[1], allow_missing=True)
print(json.dumps({"theirs": float(theirs["length_controlled_winrate"]), "ours": ours["lc_win_rate"],
                  "theirs_se": float(theirs["lc_standard_error"]), "ours_se": ours["lc_standard_error"],
                  "source": ours["difficulty_source"]}))
"""


@pytest.mark.parametrize("model, n_missing", [("FuseChat-Llama-3.2-1B-Instruct", 0), ("alpaca-7b", 0),
                                              ("alpaca-7b", 25)])
def test_lc_equals_alpaca_eval_with_the_hub_file(model, n_missing, tmp_path, eval_rows, instructions):
    """alpaca_eval's get_length_controlled_winrate and `evaluate score`, both reading df_gamed.csv
    from the hub cache with HF_HUB_OFFLINE=1, give the same LC. Rows whose preference is missing
    (--allow-missing) stay in the length std and the prediction in both."""
    _hub_cache(tmp_path / "hf", _official_layout_files(eval_rows, packaged_estimate(instructions)))
    rows = read(model)
    for i in range(0, 805, 805 // n_missing if n_missing else 10**9)[:n_missing]:
        rows[i]["preference"] = None
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))
    script = tmp_path / "parity.py"
    script.write_text(PARITY)
    proc = subprocess.run([sys.executable, str(script), str(path)], env=_offline_env(tmp_path / "hf"),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["source"].startswith("hub")
    assert out["ours"] == pytest.approx(out["theirs"], abs=1e-6)
    assert out["ours_se"] == pytest.approx(out["theirs_se"], abs=1e-6)


def test_missing_rows_count_in_the_length_std_and_prediction(tmp_path):
    """Dropping the missing rows instead (the old behaviour) gives another LC: the difference is real."""
    rows = read("alpaca-7b")
    for i in range(0, 805, 32):
        rows[i]["preference"] = None
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps(rows))
    dropped = tmp_path / "dropped.json"
    dropped.write_text(json.dumps([r for r in rows if r["preference"] is not None]))
    a = score_annotations(kept, allow_missing=True, hub_files=False)
    b = score_annotations(dropped, hub_files=False)
    assert a["n"] == b["n"] == 805 - 26 and a["n_missing"] == 26
    assert a["win_rate"] == pytest.approx(b["win_rate"])
    assert abs(a["lc_win_rate"] - b["lc_win_rate"]) > 1e-4


# --- models the estimate has never seen --------------------------------------------------------------

@pytest.fixture(scope="module")
def leaderboard_annotations():
    return read_model_annotations([RESULTS])


@needs_results
@pytest.mark.slow
@pytest.mark.parametrize("model", ["alpaca-7b", "falcon-7b-instruct", "jina-chat", "claude-2.1_concise",
                                   "claude-2", "FuseChat-Llama-3.2-1B-Instruct"])
def test_lc_leave_one_model_out(model, leaderboard_annotations, instructions, tmp_path):
    """Difficulty estimated without the scored model (its annotations, official weights and
    leaderboard row), then `evaluate score` with it: within 1 point of the leaderboard LC for
    short-output (alpaca-7b, falcon-7b, jina-chat, claude-2.1_concise), mid and long models."""
    values = estimate_difficulty(leaderboard_annotations, instructions, exclude=[model])
    csv = tmp_path / "difficulty.csv"
    csv.write_text("index,instruction_difficulty\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values)))
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(leaderboard_annotations[model]))
    s = score_annotations(path, instruction_difficulty=str(csv), hub_files=False)
    err = s["lc_win_rate"] - official_leaderboard().loc[model, "length_controlled_winrate"]
    assert abs(err) < 1.0, f"{model}: LC off by {err:+.2f} points"


@needs_results
@pytest.mark.slow
def test_packaged_estimate_is_reproducible(leaderboard_annotations, instructions):
    values = estimate_difficulty(leaderboard_annotations, instructions)
    assert np.allclose(values, packaged_estimate(instructions), atol=1e-5)


# --- LC that is not estimable (the demo: a handful of instructions) ---------------------------------

def _first(model: str, n: int, tmp_path: Path, name: str | None = None) -> Path:
    path = tmp_path / (name or model) / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(read(model)[:n]))
    return path


def test_lc_on_a_handful_of_instructions_is_null_with_the_reason(tmp_path):
    s = score_annotations(_first("FuseChat-Llama-3.1-8B-Instruct", 6, tmp_path), hub_files=False)
    assert s["lc_win_rate"] is None and s["lc_standard_error"] is None
    assert "lc_min_instructions=50" in s["lc_note"] and "6 judged instructions" in s["lc_note"]
    assert s["win_rate"] is not None and s["n"] == 6
    many = score_annotations(_first("FuseChat-Llama-3.1-8B-Instruct", 200, tmp_path, "many"), hub_files=False)
    assert many["lc_win_rate"] is not None and many["lc_note"] is None
    lowered = score_annotations(_first("FuseChat-Llama-3.1-8B-Instruct", 6, tmp_path), hub_files=False,
                                lc_min_instructions=5)
    assert lowered["lc_win_rate"] is not None


def test_lc_is_null_when_the_fit_zeroes_every_weight(tmp_path):
    """All draws against outputs as long as the reference: no signal, the L1 fit sets every weight
    to zero, and a constant 50 is not reported as a result."""
    rows = [dict(r, output_2=r["output_1"], preference=1.5) for r in read("alpaca-7b")[:80]]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))
    s = score_annotations(path, glm="length_controlled_noreg", hub_files=False)
    assert s["lc_win_rate"] is None and "every GLM weight to zero" in s["lc_note"]


def test_compare_of_demo_sized_runs_shows_no_constant_lc(tmp_path):
    """The demo's compare (6 instructions per run): LC is n/a with the reason, in the table, the
    JSON, the chart and the paired differences; never 50.00 ± 0.00."""
    runs = [f"{name}={_first(model, 6, tmp_path, name).parent}" for name, model in
            (("global", "FuseChat-Llama-3.2-1B-Instruct"), ("sp2dpo", "FuseChat-Llama-3.1-8B-Instruct"))]
    result = CliRunner().invoke(app, ["evaluate", "compare", *runs, "--out", str(tmp_path / "report"), "--json",
                                      "--set", "hub_files=false"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["best_lc"] is None
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "50.00" not in table and "0.00 |" not in table.split("\n\n")[0]
    assert table.count("n/a [") == 2 and "lc_min_instructions" in table
    rows = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert [r["lc_win_rate"] for r in rows] == [None, None] and all(r["lc_note"] for r in rows)
    paired = rows[1]["paired"]
    assert paired["n_shared"] == 6 and paired["lc_win_rate"]["delta"] is None and paired["lc_win_rate"]["note"]
    assert paired["win_rate"]["delta"] is not None
    assert (tmp_path / "report" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- paired differences between runs ---------------------------------------------------------------

CFG = EvaluateConfig(hub_files=False)


def test_paired_run_against_itself_is_zero_and_within_noise():
    p = annotations_path("alpaca-7b")
    r = paired_comparison(str(p), str(p), CFG, n_resamples=500)
    assert r["n_shared"] == 805
    for key in ("win_rate", "lc_win_rate"):
        d = r[key]
        assert d["delta"] == pytest.approx(0.0, abs=1e-9)
        assert d["within_noise"] and d["p_value"] == pytest.approx(1.0)


def test_paired_real_difference_is_not_noise_and_swaps_sign():
    a = str(annotations_path("FuseChat-Llama-3.2-1B-Instruct"))
    b = str(annotations_path("FuseChat-Llama-3.1-8B-Instruct"))
    r = paired_comparison(a, b, CFG, n_resamples=1000)
    assert r["win_rate"]["delta"] == pytest.approx(r["b"]["win_rate"] - r["a"]["win_rate"], abs=1e-9)
    assert r["lc_win_rate"]["delta"] == pytest.approx(r["b"]["lc_win_rate"] - r["a"]["lc_win_rate"], abs=1e-6)
    for key in ("win_rate", "lc_win_rate"):
        d = r[key]
        assert d["ci_low"] < d["delta"] < d["ci_high"] and d["ci_low"] > 0
        assert not d["within_noise"] and d["p_value"] < 0.01
    back = paired_comparison(b, a, CFG, n_resamples=1000)
    assert back["lc_win_rate"]["delta"] == pytest.approx(-r["lc_win_rate"]["delta"], abs=1e-6)


def test_paired_small_perturbation_is_within_noise(tmp_path):
    """Re-judging noise (each preference moved at random, zero mean, inside [1, 2]) is reported as noise."""
    rows = read("FuseChat-Llama-3.2-1B-Instruct")
    rng = np.random.default_rng(0)
    noisy = []
    for r in rows:
        room = min(r["preference"] - 1.0, 2.0 - r["preference"])
        noisy.append(dict(r, preference=float(r["preference"] + rng.uniform(-1, 1) * room)))
    path = tmp_path / "noisy" / "annotations.json"
    path.parent.mkdir()
    path.write_text(json.dumps(noisy))
    r = paired_comparison(str(annotations_path("FuseChat-Llama-3.2-1B-Instruct")), str(path.parent), CFG)
    assert r["win_rate"]["within_noise"] and r["lc_win_rate"]["within_noise"]
    # Paired: the CI is under half as wide as one run's own 95% interval (2 x 1.96 SE).
    assert r["win_rate"]["ci_high"] - r["win_rate"]["ci_low"] < 1.96 * r["a"]["standard_error"]


def test_paired_uses_only_shared_instructions_and_refuses_disjoint_runs(tmp_path):
    a = _first("alpaca-7b", 300, tmp_path, "a")
    rows = read("FuseChat-Llama-3.2-1B-Instruct")[200:]
    b = tmp_path / "b" / "annotations.json"
    b.parent.mkdir()
    b.write_text(json.dumps(rows))
    r = paired_comparison(str(a), str(b), CFG, n_resamples=200)
    assert r["n_shared"] == 100 and r["a"]["n"] == 300 and r["b"]["n"] == 605
    c = tmp_path / "c" / "annotations.json"
    c.parent.mkdir()
    c.write_text(json.dumps(read("FuseChat-Llama-3.2-1B-Instruct")[300:]))
    with pytest.raises(ValueError, match="share no judged instruction"):
        paired_comparison(str(a), str(c), CFG, n_resamples=200)


def test_compare_baseline_option(tmp_path):
    runs = [f"small={annotations_path('FuseChat-Llama-3.2-1B-Instruct')}",
            f"big={annotations_path('FuseChat-Llama-3.1-8B-Instruct')}", f"alpaca={annotations_path('alpaca-7b')}"]
    result = CliRunner().invoke(app, ["evaluate", "compare", *runs, "--baseline", "big", "--out", str(tmp_path),
                                      "--json", "--set", "hub_files=false", "--set", "n_resamples=300"])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads((tmp_path / "comparison.json").read_text())}
    assert rows["big"]["paired"] is None and rows["small"]["paired"]["baseline"] == "big"
    assert rows["small"]["paired"]["lc_win_rate"]["delta"] < 0 < rows["small"]["paired"]["lc_win_rate"]["p_value"]
    assert "Differences against big" in (tmp_path / "comparison.md").read_text()
    bad = CliRunner().invoke(app, ["evaluate", "compare", *runs, "--baseline", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "baseline_run" in bad.output


@pytest.mark.slow
def test_linearised_lc_bootstrap_matches_refitting():
    """The contributions behind ΔLC's CI: a bootstrap draw's mean contribution tracks the LC refitted
    on the same resampled instructions (two full GLM fits per draw in alpaca_eval's way)."""
    from sp2dpo.evaluate.score import fit_lc, lc_inputs, read_scored_rows

    eval_rows = load_eval_set()
    inputs = lc_inputs(eval_rows, hub_files=False)
    rows, _ = read_scored_rows(annotations_path("alpaca-7b"), eval_rows, False)
    c = fit_lc(rows, [], inputs, "length_controlled_v1", 50, contributions=True)["contributions"]
    rng = np.random.default_rng(1)
    refit, linear = [], []
    for _ in range(25):
        idx = rng.integers(0, len(rows), len(rows))
        refit.append(fit_lc([rows[i] for i in idx], [], inputs, "length_controlled_v1", 50)["lc_win_rate"])
        linear.append(c[idx].mean())
    refit, linear = np.array(refit), np.array(linear)
    assert np.corrcoef(refit, linear)[0, 1] > 0.98
    assert np.abs(refit - linear).mean() < 0.15
