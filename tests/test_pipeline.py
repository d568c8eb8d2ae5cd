"""The pipeline runner: content-addressed stage dirs, skip when complete, resume after a failure or
a kill. The first stage is the real data stage; the stages after it are small functions defined
here (fakes of the later stages, which is all the runner needs: it never looks inside a stage)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sp2dpo.pipeline.config import PipelineConfig
from sp2dpo.pipeline.runner import (
    ERROR_FILE,
    MANIFEST,
    MARKER,
    Stage,
    StageFailed,
    StageUnavailable,
    plan,
    run_pipeline,
)
from sp2dpo.pipeline.stages import default_stages

REPO = Path(__file__).resolve().parents[1]


def _pairs_file(tmp_path: Path, n: int = 8) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"})
                              for i in range(n)))
    return str(path)


def _config(tmp_path: Path, **data) -> PipelineConfig:
    return PipelineConfig(run_dir=str(tmp_path / "run"),
                          data={"inputs": [_pairs_file(tmp_path)], "engine": "local", **data})


def _data_stage() -> Stage:
    return default_stages(PipelineConfig())[0]


class Recorder:
    """Fake downstream stages that log each call and derive their output from their input's."""

    def __init__(self, fail_once: set[str] | None = None):
        self.calls: list[str] = []
        self.fail_once = set(fail_once or ())

    def count_pairs(self, config, sd):
        self.calls.append(sd.name)
        if sd.name in self.fail_once:
            self.fail_once.discard(sd.name)
            Path(sd.join("partial.txt")).write_text("half done")
            raise RuntimeError("teacher endpoint went away")
        n = pq.read_table(sd.input_path("data", "pairs.parquet")).num_rows
        Path(sd.join("count.txt")).write_text(str(n * sd.config.get("factor", 1)))
        return {"pairs": n}

    def report(self, config, sd):
        self.calls.append(sd.name)
        count = int(Path(sd.input_path("count", "count.txt")).read_text())
        Path(sd.join("report.txt")).write_text(f"{sd.params['title']}: {count}")
        return {"count": count}

    def stages(self, title: str = "pairs") -> list[Stage]:
        return [
            _data_stage(),
            Stage("count", self.count_pairs, "annotate", None, ("data",)),
            Stage("report", self.report, "evaluate", None, ("count",), params={"title": title}),
        ]


def _run(config, stages, **kw):
    return {r.name: r for r in run_pipeline(config, stages, config.run_dir, **kw)}


def _marker(result) -> dict:
    return json.loads(Path(result.path, MARKER).read_text())


def test_runs_in_order_then_skips_complete_stages(tmp_path):
    config, rec = _config(tmp_path), Recorder()
    first = _run(config, rec.stages())
    assert rec.calls == ["count", "report"]
    assert [r.status for r in first.values()] == ["ran", "ran", "ran"]
    data = first["data"]
    assert Path(data.path).name == f"data-{data.key}"
    assert pq.read_table(Path(data.path, "pairs.parquet")).num_rows == 8 == data.summary["valid"]
    assert Path(first["report"].path, "report.txt").read_text() == "pairs: 8"
    marker = _marker(data)
    assert marker["key"] == data.key and marker["summary"]["valid"] == 8
    assert marker["config"]["inputs"] == config.data["inputs"]
    assert _marker(first["report"])["inputs"] == {"count": first["count"].key}

    stamps = {name: Path(r.path, MARKER).stat().st_mtime_ns for name, r in first.items()}
    second = _run(config, rec.stages())
    assert rec.calls == ["count", "report"], "nothing re-ran"
    assert [r.status for r in second.values()] == ["complete"] * 3
    assert second["report"].summary == {"count": 8}
    assert {name: Path(r.path, MARKER).stat().st_mtime_ns for name, r in second.items()} == stamps
    manifest = json.loads(Path(config.run_dir, MANIFEST).read_text())
    assert [(s["name"], s["status"]) for s in manifest["stages"]] == [("data", "complete"), ("count", "complete"),
                                                                       ("report", "complete")]


def test_keys_follow_config_and_inputs(tmp_path):
    rec = Recorder()
    base = _config(tmp_path)
    keys = plan(base, rec.stages(), base.run_dir).keys
    assert plan(base, rec.stages(), base.run_dir).keys == keys  # deterministic
    # A changed data setting re-keys data and everything downstream of it.
    limited = plan(_config(tmp_path, limit=5), rec.stages(), base.run_dir).keys
    assert all(limited[name] != keys[name] for name in keys)
    # A changed downstream setting re-keys only that stage and its dependents.
    factor = plan(base.model_copy(update={"annotate": {"factor": 3}}), rec.stages(), base.run_dir).keys
    assert factor["data"] == keys["data"] and factor["count"] != keys["count"] and factor["report"] != keys["report"]
    # Stage parameters count; the output path a user writes in a section does not (the runner owns paths).
    assert plan(base, rec.stages("other"), base.run_dir).keys["report"] != keys["report"]
    moved = base.model_copy(update={"data": {**base.data, "out": "/elsewhere"}})
    assert plan(moved, rec.stages(), base.run_dir).keys == keys

    _run(base, rec.stages())
    rerun = _run(base.model_copy(update={"annotate": {"factor": 3}}), rec.stages())
    assert rec.calls == ["count", "report", "count", "report"]
    assert rerun["data"].status == "complete"
    assert Path(rerun["report"].path, "report.txt").read_text() == "pairs: 24"
    # Both versions stay side by side: going back to the old settings is free.
    again = _run(base, rec.stages())
    assert [r.status for r in again.values()] == ["complete"] * 3
    assert Path(again["report"].path, "report.txt").read_text() == "pairs: 8"


def test_force_and_until(tmp_path):
    config, rec = _config(tmp_path), Recorder()
    partial = _run(config, rec.stages(), until="count")
    assert list(partial) == ["data", "count"] and rec.calls == ["count"]
    _run(config, rec.stages())
    assert rec.calls == ["count", "report"]
    forced = _run(config, rec.stages(), force=["count"])
    assert rec.calls == ["count", "report", "count"], "a forced stage re-runs; its unchanged dependents do not"
    assert [r.status for r in forced.values()] == ["complete", "ran", "complete"]
    with pytest.raises(ValueError, match="unknown stage"):
        _run(config, rec.stages(), until="train")
    with pytest.raises(ValueError, match="force"):
        _run(config, rec.stages(), force=["nope"])


def test_resume_after_a_failing_stage(tmp_path):
    config, rec = _config(tmp_path), Recorder(fail_once={"count"})
    with pytest.raises(StageFailed, match="teacher endpoint went away") as info:
        _run(config, rec.stages())
    failed_dir = Path(info.value.path)
    assert "RuntimeError: teacher endpoint went away" in (failed_dir / ERROR_FILE).read_text()
    assert not (failed_dir / MARKER).exists()
    manifest = json.loads(Path(config.run_dir, MANIFEST).read_text())
    assert [(s["name"], s["status"]) for s in manifest["stages"]] == [("data", "ran"), ("count", "failed")]
    data_marker = (Path(manifest["stages"][0]["path"]) / MARKER).read_text()

    resumed = _run(config, rec.stages())
    assert rec.calls == ["count", "count", "report"]
    assert [r.status for r in resumed.values()] == ["complete", "ran", "ran"]
    assert Path(resumed["count"].path) == failed_dir, "same settings, same dir"
    # The partial output is handed back to the stage, not wiped; the stale error file is gone.
    assert (failed_dir / "partial.txt").exists() and not (failed_dir / ERROR_FILE).exists()
    assert (Path(resumed["data"].path) / MARKER).read_text() == data_marker


def test_unavailable_or_misconfigured_stage_fails_before_anything_runs(tmp_path):
    config, rec = _config(tmp_path), Recorder()
    stages = [*rec.stages(), Stage("train", rec.report, "train", "sp2dpo.no_such_stage:TrainConfig", ("count",))]
    with pytest.raises(StageUnavailable, match="stage 'train' is not available yet"):
        _run(config, stages)
    assert rec.calls == [] and not Path(config.run_dir).exists()
    bad = config.model_copy(update={"data": {**config.data, "limt": 3}})
    with pytest.raises(ValueError, match="(?s)section .data.*limt"):
        _run(bad, rec.stages())
    with pytest.raises(ValueError, match="must come before"):
        _run(config, list(reversed(rec.stages())))


KILL_SCRIPT = """
import os, sys, time
from pathlib import Path
from sp2dpo.pipeline.config import PipelineConfig
from sp2dpo.pipeline.runner import Stage, run_pipeline
from sp2dpo.pipeline.stages import default_stages

flags = Path(sys.argv[2])

def slow(config, sd):
    Path(sd.join("shard-0.txt")).write_text("kept")
    (flags / "started").write_text(sd.path)
    while not (flags / "go").exists():
        time.sleep(0.2)
    return {"shards": len(list(Path(sd.path).glob("shard-*.txt")))}

def last(config, sd):
    (flags / "last-ran").write_text("yes")
    return {}

config = PipelineConfig.model_validate_json(sys.argv[1])
stages = [default_stages(config)[0], Stage("slow", slow, None, None, ("data",)),
          Stage("last", last, None, None, ("slow",))]
for r in run_pipeline(config, stages, config.run_dir):
    print("RESULT", r.name, r.status, flush=True)
"""


def test_kill_mid_way_then_rerun_resumes(tmp_path):
    config = _config(tmp_path)
    script, flags = tmp_path / "pipe.py", tmp_path / "flags"
    script.write_text(KILL_SCRIPT)
    flags.mkdir()
    argv = [sys.executable, str(script), config.model_dump_json(), str(flags)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (flags / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the slow stage never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    slow_dir = Path((flags / "started").read_text())
    assert not (slow_dir / MARKER).exists() and not (flags / "last-ran").exists()
    data_dirs = list(Path(config.run_dir).glob("data-*"))
    assert len(data_dirs) == 1 and (data_dirs[0] / MARKER).exists()
    data_marker = (data_dirs[0] / MARKER).read_text()

    (flags / "started").unlink()
    (flags / "go").write_text("")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert results == [["data", "complete"], ["slow", "ran"], ["last", "ran"]]
    assert (flags / "started").read_text() == str(slow_dir)
    assert (data_dirs[0] / MARKER).read_text() == data_marker, "the finished stage was not redone"
    assert json.loads((slow_dir / MARKER).read_text())["summary"] == {"shards": 1}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sp2dpo.cli", "pipeline", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_runs_skips_plans_and_reports_bad_input(tmp_path):
    import yaml

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "until": "data",
                                   "data": {"inputs": [_pairs_file(tmp_path)], "limit": 5}}))
    first = _cli("--config", str(cfg), "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["ran"] == ["data"] and summary["complete"] == []
    data_dir = Path(summary["stages"]["data"]["path"])
    assert pq.read_table(data_dir / "pairs.parquet").num_rows == 5
    assert "[1/1] data" in first.stderr  # progress goes to stderr, the summary alone to stdout

    second = _cli("--config", str(cfg), "--json", "--plan")
    assert json.loads(second.stdout.strip().splitlines()[-1])["complete"] == ["data"]
    changed = _cli("--config", str(cfg), "--set", "data.limit=3", "--json", "--plan")
    assert json.loads(changed.stdout.strip().splitlines()[-1])["pending"] == ["data"]

    for args, message in [(["--set", "data.limt=3"], "limt"), (["--until", "nope"], "unknown stage 'nope'"),
                          (["--set", "controls=[semantic,random]"], "controls")]:
        bad = _cli("--config", str(cfg), *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert message in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_real_stages_data_annotate_schedule(tmp_path, ray_local):
    config = PipelineConfig(run_dir=str(tmp_path / "run"), until="schedule",
                            data={"inputs": ["ultrafeedback-sample"], "limit": 30},
                            annotate={"teacher": "ratings"}, schedule={"beta0": 0.1})
    results = _run(config, default_stages(config), until="schedule")
    assert [r.status for r in results.values()] == ["ran", "ran", "ran"]
    schedule_dir = Path(results["schedule"].path)
    betas = {c: pq.read_table(schedule_dir / f"beta-{c}.parquet") for c in config.controls}
    pair_ids = set(pq.read_table(Path(results["data"].path, "pairs.parquet")).column("pair_id").to_pylist())
    for control, table in betas.items():
        assert set(table.column("pair_id").to_pylist()) == pair_ids, control
    assert set(betas["global"].column("beta").to_pylist()) == {0.1}
    assert sorted(betas["shuffled"].column("beta").to_pylist()) == sorted(betas["semantic"].column("beta").to_pylist())
    assert any(schedule_dir.joinpath("audit").iterdir())
    again = _run(config, default_stages(config), until="schedule")
    assert [r.status for r in again.values()] == ["complete"] * 3


def test_reference_stage_scores_once_for_controls_with_the_same_rows(tmp_path, ray_local, tiny_model_dir):
    config = PipelineConfig(run_dir=str(tmp_path / "run"), until="reference",
                            data={"inputs": ["ultrafeedback-sample"], "limit": 6, "max_tokens": 200},
                            annotate={"teacher": "ratings"}, schedule={"beta0": 0.1},
                            train={"model": str(tiny_model_dir), "max_length": 256})
    results = _run(config, default_stages(config), until="reference")
    summary = results["reference"].summary
    assert "scored_pairs" in summary["semantic"]
    # Same pairs, no flips or drops by default: global and shuffled reuse the semantic pass.
    assert summary["global"]["reused_from"] == summary["shuffled"]["reused_from"] == summary["semantic"]["artifact"]
    ref_dir = Path(results["reference"].path)
    tables = {c: pq.read_table(ref_dir / f"beta-{c}.parquet") for c in config.controls}
    for control in ("global", "shuffled"):
        assert tables[control]["ref_chosen_logps"].equals(tables["semantic"]["ref_chosen_logps"])
        assert tables[control]["beta"].equals(
            pq.read_table(Path(results["schedule"].path) / f"beta-{control}.parquet")["beta"])
    from sp2dpo.schedule.artifact import read_artifact

    assert read_artifact(str(ref_dir / "beta-global.parquet"))[1]["reference"] == \
        read_artifact(str(ref_dir / "beta-semantic.parquet"))[1]["reference"]


# ----------------------------------------------------------------------------- the console


def _noisy_stage(config, sd):
    """Output the way Ray, vLLM and workers produce it: Python streams, logging, the raw fd, a
    child process and a tqdm bar."""
    import logging

    from tqdm import tqdm

    print("INFO noisy-stdout")
    print("INFO noisy-stderr", file=sys.stderr)
    # A library that sets up its logger when first imported, as vLLM does, inside the stage.
    logger = logging.getLogger("sp2dpo.test.noisy")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    logger.warning("noisy-logging")
    logger.removeHandler(handler)
    os.write(2, b"noisy-fd2\n")
    subprocess.run([sys.executable, "-c", "import sys; print('noisy-child', file=sys.stderr)"], check=True)
    for _ in tqdm(range(3), desc="train"):
        pass
    return {"ok": True}


def _noisy_stages() -> list[Stage]:
    return [_data_stage(), Stage("noisy", _noisy_stage, inputs=("data",), description="makes noise")]


def test_a_quiet_run_keeps_library_output_in_the_stage_log(tmp_path, capfd):
    config = _config(tmp_path)
    results = {r.name: r for r in run_pipeline(config, _noisy_stages(), config.run_dir)}
    assert results["noisy"].status == "ran"
    out, err = capfd.readouterr()
    console = out + err
    assert "[2/2] noisy: makes noise" in console and "noisy done in" in console
    for noise in ("noisy-stdout", "noisy-stderr", "noisy-logging", "noisy-fd2", "noisy-child", "3/3"):
        assert noise not in console, (noise, console)
    log = (tmp_path / "run" / "logs" / "noisy.log").read_text()
    for line in ("noisy-stdout", "noisy-stderr", "noisy-logging", "noisy-fd2", "noisy-child", "3/3"):
        assert line in log, (line, log)
    # The descriptors are back: output after the run reaches the terminal again.
    os.write(2, b"after-the-run\n")
    assert "after-the-run" in capfd.readouterr().err


def test_the_console_holds_descriptors_only_while_a_stage_runs(tmp_path, capfd):
    """A quiet console copies the terminal's descriptor when a stage starts and closes it when the
    stage ends: a long-lived process (a notebook, a service) running many pipelines keeps none."""
    from sp2dpo.pipeline.console import PipelineConsole

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    console = PipelineConsole(str(tmp_path))
    assert open_fds() == before
    for _ in range(3):
        with console.stage("noisy"):
            assert open_fds() > before  # the log, the saved fds 1 and 2, the terminal's copy
            print("inside")
        assert open_fds() == before
    console.print("after the stages")
    assert "after the stages" in "".join(capfd.readouterr())
    assert "inside" in (tmp_path / "logs" / "noisy.log").read_text()


def test_verbose_streams_library_output(tmp_path, capfd):
    config = _config(tmp_path)
    run_pipeline(config, _noisy_stages(), config.run_dir, verbose=True)
    console = "".join(capfd.readouterr())
    for line in ("noisy-stdout", "noisy-stderr", "noisy-fd2", "noisy-child"):
        assert line in console, line
    assert not (tmp_path / "run" / "logs" / "noisy.log").exists()


def test_a_failed_stage_names_its_log(tmp_path, capfd):
    def broken(config, sd):
        print("the real reason, deep in a library")
        raise RuntimeError("boom")

    config = _config(tmp_path)
    with pytest.raises(StageFailed):
        run_pipeline(config, [_data_stage(), Stage("broken", broken, inputs=("data",))], config.run_dir)
    console = "".join(capfd.readouterr())
    log = tmp_path / "run" / "logs" / "broken.log"
    assert f"its log (Ray, vLLM, Serve, workers): {log}" in console.replace("\n", "")
    assert "the real reason" in log.read_text()


def test_latest_progress_reads_the_newest_tqdm_bar():
    from sp2dpo.pipeline.console import latest_progress

    text = ("(RayTrainWorker pid=1) train:  42%|████▏     | 5/12 [00:30<00:38]\r"
            "\x1b[36m(RayTrainWorker pid=1)\x1b[0m train:  58%|█████▊    | 7/12 [00:53<00:46, loss=0.6]\n")
    assert latest_progress(text) == "train 7/12"
    assert latest_progress(" 50%|█████     | 1/2 [00:01<00:01]") == "1/2"
    assert latest_progress("INFO no bar here") is None
