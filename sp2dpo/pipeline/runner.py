"""A resumable runner for an ordered list of stages, each writing into its own content-addressed dir.

    run_dir/
      data-3f2a9c1e04b7/         _SUCCESS.json + the stage's files
      annotate-9be01d7a22c4/
      ...
      pipeline.json              the latest run: one entry per stage (key, path, status, summary)

A stage's key hashes its name, code version, parameters, its config section (validated, defaults
included, path fields left out since the runner owns paths) and the keys of the stages it reads.
So a changed setting re-keys that stage and everything downstream, and nothing else. A stage is
complete when its dir holds `_SUCCESS.json` with the same key, written last and atomically: a run
killed or failed mid-way leaves earlier stages complete, and the same command resumes after them.
A stage dir that exists without a marker is handed back to the stage as is, so stages that keep
partial progress (annotation shards) pick up where they stopped.

The core is plain Python: stages are functions `(config, stage_dir) -> summary dict`; Ray enters
only inside the stages that use it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sp2dpo import storage
from sp2dpo.config import StageConfig
from sp2dpo.storage import join_uri, makedirs, write_json

MARKER = "_SUCCESS.json"
ERROR_FILE = "_ERROR.txt"
MANIFEST = "pipeline.json"


class StageUnavailable(ValueError):
    """A stage whose implementation cannot be imported in this installation."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, path: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage, self.path, self.cause = stage, path, cause


def load_object(path: str) -> Any:
    """`package.module:attr` → the object, or StageUnavailable naming what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as exc:
        raise StageUnavailable(f"{path} is not available in this installation ({exc})") from exc


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    `run(config, stage_dir)` does the work and returns a JSON-able summary. `section` names the
    pipeline-config section that parameterises it (validated by `config_cls`, a class or a
    `module:Class` path, imported only when the stage is planned); `inputs` names the stages whose
    outputs it reads. Bump `version` when the stage's code changes what it writes.
    """

    name: str
    run: Callable[[Any, StageDir], dict[str, Any]]
    section: str | None = None
    config_cls: type[StageConfig] | str | None = None
    inputs: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    path_fields: tuple[str, ...] = ("out",)
    version: str = "1"
    description: str = ""


@dataclass
class StageResult:
    name: str
    key: str
    path: str
    status: str  # complete (found done) | ran | failed | pending (plan only)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class StageDir:
    """What a running stage gets: its output dir, its validated section and its inputs' results."""

    name: str
    key: str
    path: str
    config: Any
    params: dict[str, Any]
    inputs: dict[str, StageResult]

    def join(self, *parts: str) -> str:
        return join_uri(self.path, *parts)

    def input_path(self, stage: str, *parts: str) -> str:
        return join_uri(self.inputs[stage].path, *parts)


def _section_config(stage: Stage, config: Any) -> Any:
    raw = getattr(config, stage.section) if stage.section else {}
    if stage.config_cls is None:
        return raw
    cls = load_object(stage.config_cls) if isinstance(stage.config_cls, str) else stage.config_cls
    if isinstance(raw, cls):
        return raw
    data = raw.model_dump(mode="json") if isinstance(raw, StageConfig) else dict(raw or {})
    try:
        return cls.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"section {stage.section!r} of the pipeline config: {exc}") from None


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, StageConfig) else value


def stage_key(stage: Stage, section: Any, input_keys: dict[str, str]) -> str:
    body = _dump(section)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in stage.path_fields}
    payload = {"stage": stage.name, "version": stage.version, "params": stage.params, "config": body,
               "inputs": {name: input_keys[name] for name in stage.inputs}}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def read_json(uri: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None


def check_run_dir_reachable(run_dir: str) -> None:
    """Refuse, before any stage starts, a local run dir that some node of the cluster cannot see.

    Stages run wherever Ray places them and hand each other paths, so every node must reach
    the run dir: object storage always does; a local path only if it is a mount shared by every
    node. We check that by asking a task on each other node for a probe file written here."""
    if storage.is_uri(run_dir) or not (os.environ.get("RAY_ADDRESS") or _ray_initialized()):
        return  # object storage, or no cluster: a laptop's local Ray has one node
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sp2dpo.utils import init_ray

    init_ray()
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        return
    os.makedirs(run_dir, exist_ok=True)
    probe = os.path.join(run_dir, f".reachable-{uuid.uuid4().hex}")
    with open(probe, "w") as f:
        f.write("probe\n")
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(probe)
                for node in others]
        found = ray.get(refs, timeout=120)
    finally:
        os.remove(probe)
    blind = [node for node, seen in zip(others, found) if not seen]
    if blind:
        raise ValueError(
            f"run_dir {run_dir} is on this node's local disk, and {len(blind)} of the cluster's {len(others) + 1} "
            "nodes cannot see it (stages run on any node and read each other's outputs): set run_dir to an "
            "object-store URI every node reaches (e.g. --set run_dir=s3://BUCKET/runs/NAME) or to a mount "
            "shared by every node")


def _ray_initialized() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@dataclass
class Plan:
    stages: list[Stage]
    sections: dict[str, Any]
    keys: dict[str, str]
    paths: dict[str, str]


def plan(config: Any, stages: list[Stage], run_dir: str, until: str | None = None) -> Plan:
    """Validate every selected stage's section and compute keys and paths; runs nothing."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names: {names}")
    if until is not None:
        if until not in names:
            raise ValueError(f"unknown stage {until!r} (until); stages: {names}")
        stages = stages[: names.index(until) + 1]
    sections: dict[str, Any] = {}
    keys: dict[str, str] = {}
    paths: dict[str, str] = {}
    for stage in stages:
        missing = [n for n in stage.inputs if n not in keys]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which must come before it")
        try:
            sections[stage.name] = _section_config(stage, config)
        except StageUnavailable as exc:
            raise StageUnavailable(f"stage {stage.name!r} is not available yet: {exc}; "
                                   f"run the stages before it with --until / `until:`") from None
        keys[stage.name] = stage_key(stage, sections[stage.name], keys)
        paths[stage.name] = join_uri(run_dir, f"{stage.name}-{keys[stage.name]}")
    return Plan(stages, sections, keys, paths)


def is_complete(path: str, key: str) -> dict[str, Any] | None:
    marker = read_json(join_uri(path, MARKER))
    return marker if marker is not None and marker.get("key") == key else None


def run_pipeline(
    config: Any,
    stages: list[Stage],
    run_dir: str,
    until: str | None = None,
    force: list[str] | tuple[str, ...] = (),
    dry_run: bool = False,
    verbose: bool = False,
) -> list[StageResult]:
    """Run `stages` in order, skipping those already complete; return one result per stage.

    Each running stage's library output (Ray, vLLM, Serve, progress bars of workers) goes to
    `run_dir/logs/<stage>.log` and the console shows one live line per stage; `verbose` streams
    it all instead (sp2dpo.pipeline.console)."""
    from sp2dpo.pipeline.console import PipelineConsole

    run_dir = storage.absolute(run_dir)  # stages hand paths to Ray workers with other working dirs
    console = PipelineConsole(run_dir, verbose=verbose or dry_run)
    p = plan(config, stages, run_dir, until)
    unknown = set(force) - set(p.keys)
    if unknown:
        raise ValueError(f"unknown stage(s) to force: {sorted(unknown)}; stages: {list(p.keys)}")
    if not dry_run:
        check_run_dir_reachable(run_dir)
    results: dict[str, StageResult] = {}
    manifest = {"run_dir": run_dir, "config_hash": getattr(config, "config_hash", lambda: None)(), "stages": []}
    started = time.perf_counter()
    n = len(p.stages)
    for i, stage in enumerate(p.stages, 1):
        key, path = p.keys[stage.name], p.paths[stage.name]
        marker = None if stage.name in force else is_complete(path, key)
        label = f"[{i}/{n}] {stage.name}"
        if marker is not None:
            result = StageResult(stage.name, key, path, "complete", marker.get("summary", {}), 0.0)
            console.print(f"[green]✓[/] {label} [dim]complete, skipped ({path})[/]")
        elif dry_run:
            result = StageResult(stage.name, key, path, "pending")
            console.print(f"[yellow]•[/] {label} [dim]to run ({path})[/]")
        else:
            console.rule(f"{label}: {stage.description or stage.name}")
            console.print(f"[dim]output: {path}[/]")
            try:
                with console.stage(stage.name) as log:
                    result = _run_stage(stage, config, p, results)
            except StageFailed:
                console.print(f"[red]✗[/] {label} [dim]failed; traceback in {join_uri(path, ERROR_FILE)}[/]")
                if log is not None:
                    console.print(f"[red]  its log (Ray, vLLM, Serve, workers): {log}[/]")
                manifest["stages"].append({"name": stage.name, "key": key, "path": path, "status": "failed"})
                write_json(join_uri(run_dir, MANIFEST), manifest)
                raise
            console.print(f"[green]✓[/] {label} [dim]done in {result.seconds:.1f} s[/]")
        results[stage.name] = result
        if not dry_run:
            manifest["stages"].append({"name": result.name, "key": key, "path": path, "status": result.status,
                                       "seconds": result.seconds, "summary": result.summary})
            manifest["seconds"] = round(time.perf_counter() - started, 3)
            write_json(join_uri(run_dir, MANIFEST), manifest)
    return list(results.values())


def _run_stage(stage: Stage, config: Any, p: Plan, done: dict[str, StageResult]) -> StageResult:
    key, path = p.keys[stage.name], p.paths[stage.name]
    makedirs(path)
    stage_dir = StageDir(stage.name, key, path, p.sections[stage.name], dict(stage.params),
                         {name: done[name] for name in stage.inputs})
    begun = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    try:
        summary = stage.run(config, stage_dir) or {}
    except BaseException as exc:
        # Kept next to the outputs: the console may be gone (a cluster job) when someone looks.
        _write_text(join_uri(path, ERROR_FILE), "".join(traceback.format_exception(exc)))
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise StageFailed(stage.name, path, exc) from exc
    seconds = round(time.perf_counter() - t0, 3)
    write_json(join_uri(path, MARKER), {
        "stage": stage.name, "key": key, "version": stage.version, "params": stage.params,
        "config": _dump(p.sections[stage.name]), "inputs": {n: p.keys[n] for n in stage.inputs},
        "summary": summary, "started_at": begun.isoformat(), "seconds": seconds,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
    })
    if storage.exists(join_uri(path, ERROR_FILE)):
        storage.delete_file(join_uri(path, ERROR_FILE))
    return StageResult(stage.name, key, path, "ran", summary, seconds)


def _write_text(uri: str, text: str) -> None:
    try:
        storage.write_text(uri, text)
    except OSError as exc:  # never hide the stage's own error behind this one
        print(f"could not write {uri}: {exc}", file=sys.stderr)
