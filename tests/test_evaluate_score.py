"""Scoring against the real AlpacaEval 2.0 leaderboard: the leaderboard's own annotation files
(tests/data/alpaca_eval) must give its win rates exactly and its LC win rates closely."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sp2dpo.cli import app
from sp2dpo.evaluate.difficulty import (
    lc_from_official_weights,
    leaderboard_prior,
    official_leaderboard,
    packaged_estimate,
)
from sp2dpo.evaluate.protocol import is_switched, load_eval_set, parse_preference
from sp2dpo.evaluate.score import score_annotations

DATA = Path(__file__).parent / "data" / "alpaca_eval"
MODELS = ["FuseChat-Llama-3.1-8B-Instruct", "FuseChat-Llama-3.2-1B-Instruct", "alpaca-7b"]


def annotations_path(model: str) -> Path:
    return DATA / f"{model}.annotations.json.gz"


def read(model: str) -> list[dict]:
    with gzip.open(annotations_path(model), "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def board():
    return official_leaderboard()


@pytest.fixture(scope="module")
def instructions():
    return [r["instruction"] for r in load_eval_set()]


@pytest.fixture(scope="module")
def scores():
    return {m: score_annotations(annotations_path(m), hub_files=False) for m in MODELS}


@pytest.mark.parametrize("model", MODELS)
def test_win_rate_equals_leaderboard(model, scores, board):
    s, row = scores[model], board.loc[model]
    assert abs(s["win_rate"] - row["win_rate"]) < 0.01
    assert abs(s["standard_error"] - row["standard_error"]) < 0.01
    assert abs(s["discrete_win_rate"] - row["discrete_win_rate"]) < 0.01
    assert (s["n_wins"], s["n_wins_base"], s["n"]) == (row["n_wins"], row["n_wins_base"], row["n_total"])
    assert s["avg_length"] == row["avg_length"]
    assert s["comparable_with_leaderboard"] and s["n_missing"] == 0


def test_win_rate_matches_alpaca_eval_itself():
    from alpaca_eval.metrics import get_winrate

    from sp2dpo.evaluate.annotations import winrate_metrics

    rows = read("FuseChat-Llama-3.2-1B-Instruct")
    ours, theirs = winrate_metrics(rows), get_winrate(rows)
    for key in ("win_rate", "standard_error", "discrete_win_rate", "n_wins", "n_wins_base", "n_draws"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key


@pytest.mark.parametrize("model", MODELS)
def test_lc_win_rate_close_to_leaderboard(model, scores, board):
    """In-sample: the shipped difficulty estimate used this model's annotations (the held-out
    check is tests/test_evaluate_lc.py and benchmarks/bench_evaluate_lc.py)."""
    err = scores[model]["lc_win_rate"] - board.loc[model, "length_controlled_winrate"]
    assert abs(err) < 1.5, f"{model}: LC off by {err:+.2f} points"
    # The GLM's length slope must point the right way: longer than the baseline = penalised.
    assert scores[model]["glm_weights"]["np.tanh(std_delta_len)"] < 0


def test_regularisation_toward_baseline_matters_for_short_outputs(scores, board):
    """Without the gamed-baseline rows and difficulty, the short-output alpaca-7b overshoots."""
    target = board.loc["alpaca-7b", "length_controlled_winrate"]
    minimal = score_annotations(annotations_path("alpaca-7b"), glm="length_controlled_minimal")
    assert minimal["lc_win_rate"] - target > 5
    assert abs(scores["alpaca-7b"]["lc_win_rate"] - target) < abs(minimal["lc_win_rate"] - target)


def test_difficulty_distribution_reproduces_every_leaderboard_lc(instructions):
    """The leaderboard prior reproduces each of ~200 leaderboard LCs from the official weights; the
    shipped posterior means (shrunk toward the prior, then calibrated) stay close to them too."""
    _, max_err = leaderboard_prior()
    assert max_err < 0.5
    check = lc_from_official_weights(packaged_estimate(instructions))
    err = (check["predicted"] - check["length_controlled_winrate"]).abs()
    assert len(check) > 150 and err.max() < 2.0 and err.mean() < 0.5, err.sort_values().tail()
    assert np.isfinite(packaged_estimate(instructions)).all()


def test_official_files_are_accepted(tmp_path, instructions, scores):
    """--instruction-difficulty / --df-gamed in AlpacaEval's layout (df_gamed preferences in [1, 2]
    are moved to [0, 1]); with our own values written in that layout the result is unchanged."""
    from sp2dpo.evaluate.difficulty import synthetic_gamed

    values = packaged_estimate(instructions)
    gamed = synthetic_gamed(values, np.array([len(r["output"]) for r in load_eval_set()], float))
    gamed["preference"] += 1.0
    gamed["not_gamed_baseline"] = False
    gamed.to_csv(tmp_path / "df_gamed.csv", index=False)
    s = score_annotations(annotations_path("alpaca-7b"), df_gamed=str(tmp_path / "df_gamed.csv"), hub_files=False)
    assert s["lc_win_rate"] == pytest.approx(scores["alpaca-7b"]["lc_win_rate"], abs=1e-6)
    assert s["difficulty_source"].startswith("df_gamed")


def test_order_randomisation_and_parser_are_the_official_ones():
    """Re-parsing the leaderboard judge's raw log-probs with our seeded order gives its preferences."""
    rows = [r for r in read("alpaca-7b") if isinstance(r.get("raw_completion"), dict)]
    assert len(rows) > 800
    switched = 0
    for r in rows:
        s = is_switched(r["instruction"])
        switched += s
        assert parse_preference(r["raw_completion"], s) == pytest.approx(r["preference"], abs=1e-6)
    assert 0.4 < switched / len(rows) < 0.6


def test_missing_answer_tokens_give_nan():
    completion = {"logprobs": {"content": [{"token": "The", "logprob": -0.1,
                                            "top_logprobs": [{"token": "The", "logprob": -0.1}]}]}}
    assert math.isnan(parse_preference(completion, switched=False))
    only_m = {"logprobs": {"content": [{"token": "m", "logprob": -0.1,
                                        "top_logprobs": [{"token": "m", "logprob": -0.1}]}]}}
    assert parse_preference(only_m, switched=False) == 1.0  # baseline shown first and certain
    assert parse_preference(only_m, switched=True) == 2.0


# --- bad input ---------------------------------------------------------------------------------

def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))  # NaN is written as the bare token NaN, as Python does
    return path


@pytest.fixture(scope="module")
def small():
    return read("FuseChat-Llama-3.2-1B-Instruct")[:40]


@pytest.mark.parametrize("case, message", [
    ("missing", "missing or NaN preference"),
    ("nan", "missing or NaN preference"),
    ("null", "missing or NaN preference"),
    ("mismatched", "not in the AlpacaEval eval set"),
    ("duplicate", "repeat an earlier instruction"),
    ("range", "outside [1, 2]"),
    ("text", "non-numeric preference"),
    ("generators", "several generator_2"),
])
def test_bad_annotations_are_refused(case, message, small, tmp_path):
    rows = [dict(r) for r in small]
    if case == "missing":
        del rows[3]["preference"]
    elif case == "nan":
        rows[3]["preference"] = float("nan")
    elif case == "null":
        rows[3]["preference"] = None
    elif case == "mismatched":
        rows[5]["instruction"] = rows[5]["instruction"] + " (edited)"
    elif case == "duplicate":
        rows[7] = dict(rows[2])
    elif case == "range":
        rows[1]["preference"] = 2.5
    elif case == "text":
        rows[1]["preference"] = "M"
    elif case == "generators":
        rows[1]["generator_2"] = "another-model"
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        score_annotations(path)
    result = CliRunner().invoke(app, ["evaluate", "score", str(path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))  # input untouched


def test_allow_missing_scores_the_rest_and_counts(small, tmp_path):
    rows = [dict(r) for r in small]
    rows[3]["preference"] = float("nan")
    s = score_annotations(_write(tmp_path, rows), allow_missing=True)
    assert (s["n"], s["n_missing"]) == (39, 1)
    assert not s["comparable_with_leaderboard"] and "39 of 805" in s["note"]


def test_score_cli_json_summary(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "score", str(annotations_path("alpaca-7b")), "--json",
                                      "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert {"win_rate", "lc_win_rate", "n", "avg_length"} <= set(summary)
    assert json.loads((tmp_path / "s.json").read_text())["win_rate"] == summary["win_rate"]


def test_compare_table_and_chart(tmp_path):
    runs = [f"{m.split('-')[0]}{i}={annotations_path(m)}" for i, m in enumerate(MODELS)]
    result = CliRunner().invoke(app, ["evaluate", "compare", *runs, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["runs"] == 3 and summary["best_lc"] == "FuseChat0"
    table = (tmp_path / "comparison.md").read_text()
    scores_table, differences = table.split("\n\n", 1)
    assert scores_table.count("\n") == 1 + 3 and "63.33" in scores_table and "± SE" in scores_table
    assert differences.count("| FuseChat1 |") == 1 and differences.count("| alpaca2 |") == 1
    assert "ΔLC" in differences and "95% CI" in differences
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dup = CliRunner().invoke(app, ["evaluate", "compare", f"a={annotations_path(MODELS[0])}",
                                   f"a={annotations_path(MODELS[1])}", "--out", str(tmp_path)])
    assert dup.exit_code == 2 and "unique" in dup.output


def test_lc_on_fewer_instructions_than_cv_folds_fits_without_cv():
    import numpy as np

    from sp2dpo.evaluate.lc import length_controlled_winrate

    few = length_controlled_winrate(np.array([0.3, 0.9]), np.array([100.0, 200.0]), np.array([50.0, 300.0]),
                                    np.array([0.1, -0.2]), glm="length_controlled_noreg")
    assert few["glm_cross_validated"] is False and 0 < few["lc_win_rate"] < 100
    rng = np.random.default_rng(0)
    many = length_controlled_winrate(rng.random(20), rng.random(20) * 100 + 50, rng.random(20) * 100 + 50,
                                     rng.standard_normal(20), glm="length_controlled_noreg")
    assert many["glm_cross_validated"] is True
