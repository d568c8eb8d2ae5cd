"""The canonical pairs table: every input row lands in exactly one of pairs / quarantine."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq

from sp2dpo.data.prepare import DataConfig, prepare
from sp2dpo.data.schema import pair_id_of
from sp2dpo.data.validate import normalize_record

GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5",
        "metadata": {"score_chosen": 9.0, "score_rejected": 2.0}}


def _write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _run(tmp_path, inputs, **kw):
    out = tmp_path / "out"
    summary = prepare(DataConfig(inputs=inputs, out=str(out), **kw), show_progress=False)
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    return summary, pairs, quarantine


def test_bundled_sample_all_valid_and_ids_stable(tmp_path):
    s1, pairs1, q1 = _run(tmp_path / "a", ["ultrafeedback-sample"])
    s2, pairs2, _ = _run(tmp_path / "b", ["ultrafeedback-sample"])
    # The real slice holds 6 broken rows (4 with chosen == rejected, 2 with an empty answer):
    # they are quarantined with their reasons, not trained on.
    assert (s1["total"], s1["valid"], s1["quarantined"]) == (1000, 994, 6)
    assert s1["reasons"] == {"empty": 2, "identical": 4}
    assert sorted(q["location"] for q in q1) == ["line 307", "line 479", "line 656", "line 834", "line 911", "line 998"]
    ids = [p["pair_id"] for p in pairs1]
    assert len(set(ids)) == 994
    assert ids == [p["pair_id"] for p in pairs2]
    # The id is a pure function of the content, pinned so a change to hashing is caught.
    first = pairs1[0]
    assert first["pair_id"] == pair_id_of(first["prompt"], first["chosen"], first["rejected"])
    assert first["score_chosen"] >= first["score_rejected"]
    assert json.loads(first["meta"])["source_index"] >= 0


def test_pair_id_is_pinned():
    # Pinned: changing the hashing would silently orphan every artifact keyed by pair_id.
    assert pair_id_of("p", "a", "b") == "8ad7972c3a7a43fe4ae5c60fb53bdb64"
    # Same content, different formats → same id.
    conv = normalize_record({"prompt": [{"role": "user", "content": "p"}],
                             "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}, "x")
    plain = normalize_record({"prompt": "p", "chosen": "a", "rejected": "b"}, "x")
    assert conv["pair_id"] == plain["pair_id"]


FAULTS = [
    (b"{not json", "bad_json"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "bad_utf8"),
    (b'["a", "list"]', "not_object"),
    (b'42', "not_object"),
    (b'{"chosen": "a", "rejected": "b"}', "missing"),
    (b'{"prompt": "p", "rejected": "b"}', "missing"),
    (b'{"prompt": "p", "chosen": "", "rejected": "b"}', "empty"),
    (b'{"prompt": "   \\n\\t", "chosen": "a", "rejected": "b"}', "empty"),
    (b'{"prompt": null, "chosen": "a", "rejected": "b"}', "null"),
    (b'{"prompt": "p", "chosen": 7, "rejected": "b"}', "wrong_type"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "high"}', "wrong_type"),
    (b'{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', "bad_message"),
    (b'{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "  "}], '
     b'"rejected": "b"}', "empty"),
    (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical"),
]


def test_planted_faults_each_quarantined_with_reason(tmp_path):
    good = [json.dumps({**GOOD, "prompt": f"q{i}"}).encode() for i in range(5)]
    lines = good[:2] + [f for f, _ in FAULTS] + good[2:] + [good[0]]  # last line: exact duplicate
    path = _write_lines(tmp_path / "faults.jsonl", lines)
    summary, pairs, quarantine = _run(tmp_path, [path])
    assert summary["total"] == len(lines)
    assert summary["valid"] + summary["quarantined"] == summary["total"]
    assert summary["valid"] == 5 and len(pairs) == 5
    assert summary["duplicates"] == 1
    by_line = {q["location"]: q for q in quarantine}
    for i, (_, code) in enumerate(FAULTS):
        row = by_line[f"line {i + 3}"]
        assert row["reason_code"] == code, (i, row)
        assert row["reason"] and row["raw"]
    assert "caf\\xe9" in by_line["line 4"]["raw"]  # undecodable byte kept, escaped
    assert by_line[f"line {len(lines)}"]["reason_code"] == "duplicate"
    assert "faults.jsonl line 1" in by_line[f"line {len(lines)}"]["reason"]


def test_conversational_trl_format_and_hf_layout(tmp_path):
    rows = [
        # TRL conversational: prompt and completions as message lists.
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        # HF ultrafeedback_binarized: string prompt, completions are whole conversations, top-level scores.
        {"prompt": "2+2?", "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.5,
         "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
        # TRL implicit prompt: only chosen/rejected conversations.
        {"chosen": [{"role": "user", "content": "x?"}, {"role": "assistant", "content": "y"}],
         "rejected": [{"role": "user", "content": "x?"}, {"role": "assistant", "content": "z"}]},
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    summary, pairs, quarantine = _run(tmp_path, [str(path)])
    assert summary["valid"] == 3, quarantine
    sys_pair, hf_pair, implicit = pairs
    assert sys_pair["prompt"] == "hi" and sys_pair["chosen"] == "hello"
    assert json.loads(sys_pair["prompt_messages"])[0] == {"role": "system", "content": "be brief"}
    assert hf_pair["prompt_messages"] is None and hf_pair["chosen"] == "4" and hf_pair["score_rejected"] == 3.5
    assert json.loads(hf_pair["meta"]) == {"prompt_id": "abc"}
    assert implicit["prompt"] == "x?" and implicit["rejected"] == "z"


def test_parquet_json_array_and_saved_hf_dataset(tmp_path):
    import datasets
    import pyarrow as pa

    rows = [{**GOOD, "prompt": f"p{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=4)
    (tmp_path / "in.json").write_text(json.dumps(rows))
    splits = {"train": datasets.Dataset.from_list(rows[:6]), "test": datasets.Dataset.from_list(rows[6:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hfdir"))
    for inp in ["in.parquet", "in.json", "hfdir"]:
        summary, pairs, _ = _run(tmp_path / inp.replace(".", "_"), [str(tmp_path / inp)])
        assert summary["valid"] == 10, inp
        assert sorted(p["prompt"] for p in pairs) == sorted(r["prompt"] for r in rows)


def test_ray_engine_matches_local(tmp_path, ray_local):
    lines = [json.dumps({**GOOD, "prompt": f"q{i}"}).encode() for i in range(50)] + [b"{broken"]
    path = _write_lines(tmp_path / "in.jsonl", lines)
    local = _run(tmp_path / "l", [path], engine="local")
    import sp2dpo.data.readers as readers

    old = readers.JSONL_CHUNK_BYTES
    readers.JSONL_CHUNK_BYTES = 256  # many tasks → many Ray Data blocks
    try:
        distributed = _run(tmp_path / "r", [path], engine="ray")
    finally:
        readers.JSONL_CHUNK_BYTES = old
    assert distributed[0]["engine"] == "ray"
    assert distributed[1] == local[1]
    assert distributed[2] == local[2]
    assert distributed[2][0]["location"] == "line 51"


def test_cli_prepare_json_summary(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "sp2dpo.cli", "data", "prepare", "ultrafeedback-eval", "--out", str(out), "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["total"] == 200 and summary["valid"] + summary["quarantined"] == 200 and summary["valid"] >= 199


def test_cli_missing_input_is_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sp2dpo.cli", "data", "prepare", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "input not found" in proc.stderr and "Traceback" not in proc.stderr


def test_max_tokens_sets_long_pairs_aside_and_limit(tmp_path):
    rows = [{"prompt": "word " * n, "chosen": "answer " * n, "rejected": "b"} for n in (500, 10, 20, 30)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    summary, pairs, quarantine = _run(tmp_path, [str(path)], max_tokens=100, limit=1)
    assert [p["prompt"] for p in pairs] == ["word " * 10]
    assert [q["reason_code"] for q in quarantine] == ["too_long"]
    assert "over max_tokens=100" in quarantine[0]["reason"]
    assert summary["skipped_over_limit"] == 2 and summary["total"] == 4
