"""No secret reaches an output, a marker, a log or an error message.

Secrets are planted in the environment (the serving key, a hub token, object-store credentials),
a small pipeline runs with them as a user would run it, and every byte it left behind is searched:
the run dir (tables, markers, `pipeline.json`, reports, models), its captured stdout/stderr and
the whole Ray session dir of that run (every driver, worker, raylet, GCS and Serve log).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _planted() -> dict[str, str]:
    token = secrets.token_hex(12)
    return {"SP2DPO_API_KEY": f"sk-planted-{token}", "HF_TOKEN": f"hf_planted{token}",
            "AWS_SECRET_ACCESS_KEY": f"awsplanted{token}"}


def _leaks(root: Path, planted: dict[str, str]) -> list[str]:
    """`path: NAME` for every file under root holding a planted value (raw bytes, any file type)."""
    found = []
    needles = {name: value.encode() for name, value in planted.items()}
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:  # a socket or a file removed while we look
            continue
        found += [f"{path}: {name}" for name, needle in needles.items() if needle in data]
    return found


def test_refusals_and_errors_never_echo_a_key(tmp_path, monkeypatch):
    """Errors that concern a key name where it comes from, never what it is."""
    from sp2dpo.serve import ServeConfig
    from sp2dpo.serve.server import check_exposure, resolve_api_key

    planted = _planted()["SP2DPO_API_KEY"]
    monkeypatch.setenv("SP2DPO_API_KEY", planted)
    cfg = ServeConfig(host="0.0.0.0")
    assert resolve_api_key(cfg) == planted
    check_exposure(cfg, resolve_api_key(cfg))
    empty = tmp_path / "key"
    empty.write_text("\n")
    monkeypatch.delenv("SP2DPO_API_KEY")
    with pytest.raises(ValueError) as info:
        resolve_api_key(ServeConfig(api_key_file=str(empty)))
    assert planted not in str(info.value)
    with pytest.raises(ValueError) as info:
        check_exposure(cfg, None)
    assert planted not in str(info.value) and "$SP2DPO_API_KEY" in str(info.value)
    # A config dump (what markers and pipeline.json hold) names the variable, not its value.
    monkeypatch.setenv("SP2DPO_API_KEY", planted)
    assert planted not in cfg.to_yaml() and "SP2DPO_API_KEY" in cfg.to_yaml()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_pipeline_run_leaves_no_planted_secret_anywhere(tmp_path, tiny_model_dir):
    """The demo pipeline (ratings teacher, the tiny student, two AlpacaEval instructions) with a
    serving key, a hub token and object-store credentials planted; then a wrong key and a bad
    request against a served app. Nothing the run wrote or logged holds any of them."""
    planted = _planted()
    ray_tmp = Path(tempfile.mkdtemp(prefix="sp2sec-", dir="/tmp"))  # short: Ray's socket paths
    run_dir = tmp_path / "run"
    env = {**os.environ, **planted, "RAY_TMPDIR": str(ray_tmp), "SP2DPO_RAY_OBJECT_STORE_MB": "512"}
    env.pop("RAY_ADDRESS", None)
    overrides = [f"run_dir={run_dir}", f"train.model={tiny_model_dir}", "data.limit=6", "data.max_tokens=200",
                 "teachers=[{teacher: ratings}]", "controls=[semantic]", "train.max_length=256",
                 "evaluate.limit=2", "evaluate.max_tokens=16", f"serve.port={_free_port()}"]
    argv = [sys.executable, "-m", "sp2dpo.cli", "pipeline", "--config", "demo", "--json"]
    for item in overrides:
        argv += ["--set", item]
    try:
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
        (tmp_path / "pipeline.stdout").write_text(proc.stdout)
        (tmp_path / "pipeline.stderr").write_text(proc.stderr)
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["complete"] == [] and "evaluate" in summary["ran"], summary
        # The served key really was in use: the evaluate stage could only answer by sending it.
        assert json.loads((Path(summary["stages"]["evaluate"]["path"]) / "semantic" / "score.json").read_text())

        # A served app asked with a wrong key and with a bad body: what it logs and answers.
        served = _serve_and_misuse(env, tiny_model_dir, tmp_path, planted["SP2DPO_API_KEY"])
        assert served["401"] and served["400"]

        sessions = list((ray_tmp / "ray").glob("session_*"))
        assert sessions and any((s / "logs").is_dir() for s in sessions)
        leaks = _leaks(tmp_path, planted) + _leaks(ray_tmp, planted)
        assert leaks == [], leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


SERVE = """
import json, sys
import httpx
from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server

model_dir, port, wrong = sys.argv[1], int(sys.argv[2]), sys.argv[3]
url = start_server(ServeConfig(port=port, models=[ModelConfig(id="tiny", path=model_dir, max_model_len=256)]))
try:
    h = {"Authorization": "Bearer " + wrong}
    r401 = httpx.post(url + "/chat/completions", headers=h, timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    import os
    good = {"Authorization": "Bearer " + os.environ["SP2DPO_API_KEY"]}
    r400 = httpx.post(url + "/chat/completions", headers=good, timeout=60, content=b"{not json")
    print(json.dumps({"401": r401.status_code == 401 and wrong not in r401.text,
                      "400": r400.status_code == 400, "bodies": [r401.text, r400.text]}))
finally:
    stop_server()
"""


def _serve_and_misuse(env: dict, model_dir, tmp_path: Path, key: str) -> dict:
    # The wrong key is the right one with one character changed: a log that echoed presented keys
    # would show it, and most of the right one with it.
    wrong = key[:-1] + ("0" if key[-1] != "0" else "1")
    proc = subprocess.run([sys.executable, "-c", SERVE, str(model_dir), str(_free_port()), wrong], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "serve.stdout").write_text(proc.stdout)
    (tmp_path / "serve.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Ray's own log lines may follow on stdout: the result is the last JSON line.
    result = next(json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{"))
    assert wrong not in proc.stderr and key[:-1] not in proc.stderr
    return result


@pytest.mark.slow
def test_ray_session_logs_are_searched(tmp_path):
    """The search itself finds a secret that a worker prints (so the test above can fail)."""
    planted = {"PLANTED": "leak-" + secrets.token_hex(8)}
    ray_tmp = Path(tempfile.mkdtemp(prefix="sp2sec-", dir="/tmp"))
    code = ("import os, ray; ray.init(num_cpus=1, include_dashboard=False)\n"
            "@ray.remote\ndef f():\n    print('token', os.environ['PLANTED'])\n"
            "ray.get(f.remote()); ray.shutdown()")
    env = {**os.environ, **planted, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300, check=True)
        leaks = _leaks(ray_tmp, planted)
        assert any("/logs/" in leak for leak in leaks), leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_leak_search_reads_binary_files(tmp_path):
    planted = {"K": "s3cr3t-" + secrets.token_hex(4)}
    (tmp_path / "a.parquet").write_bytes(b"PAR1\x00\x01" + planted["K"].encode() + b"\xff")
    (tmp_path / "clean.txt").write_text("nothing here")
    assert _leaks(tmp_path, planted) == [f"{tmp_path / 'a.parquet'}: K"]
