"""`sp2dpo serve`: host models behind one OpenAI-compatible Ray Serve app.

    sp2dpo serve                                        # bundled SmolLM2-135M-Instruct as `base` on :8000
    sp2dpo serve --model sp2dpo=runs/train/final --model base=smollm2 --port 8123
    sp2dpo serve --config serve.yaml                    # blocks; Ctrl-C shuts down cleanly
    sp2dpo serve --config serve.yaml --detach           # on a running cluster (RAY_ADDRESS): deploy, return
    SP2DPO_API_KEY=... sp2dpo serve --host 0.0.0.0      # beyond loopback only with a key (or --insecure-no-auth)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer

from sp2dpo.cli_common import ConfigOpt, JsonOpt, SetOpt, build_config, fail, field_option, run_and_report
from sp2dpo.serve.config import ServeConfig


def _model_specs(specs: list[str], engine: str | None) -> list[dict]:
    """`ID=PATH` or `PATH` (id: the directory name; a bundled name serves as `base`)."""
    from sp2dpo.models import BUNDLED_MODEL_NAMES

    models = []
    for spec in specs:
        model_id, sep, path = spec.partition("=")
        if not sep:
            path = spec
            model_id = "base" if spec in BUNDLED_MODEL_NAMES else Path(spec.rstrip("/")).name
        entry = {"id": model_id, "path": None if path in BUNDLED_MODEL_NAMES else path}
        if engine:
            entry["engine"] = engine
        models.append(entry)
    return models


def serve_cmd(
    config: str = ConfigOpt,
    overrides: list[str] = SetOpt,
    model: list[str] = typer.Option(None, "--model", "-m", help="ID=PATH or PATH of a Hugging Face model dir "
                                                                "(repeatable); replaces the config's models."),
    engine: str = typer.Option(None, help="Engine for the --model models: transformers | vllm."),
    host: str = field_option(ServeConfig, "host"),
    port: int = field_option(ServeConfig, "port"),
    api_key_file: str = field_option(ServeConfig, "api_key_file"),
    insecure_no_auth: bool = field_option(ServeConfig, "insecure_no_auth", "--insecure-no-auth", default=False),
    detach: bool = typer.Option(False, "--detach", help="Deploy on the running cluster (RAY_ADDRESS) and return; the "
                                                        "app keeps serving."),
    as_json: bool = JsonOpt,
) -> None:
    """Serve base and tuned models over the OpenAI API (chat, completions, streaming, logprobs)."""
    if engine is not None and engine not in ("transformers", "vllm"):
        fail(f"--engine must be transformers or vllm, got {engine!r}")
    if engine is not None and not model:
        fail("--engine applies to --model models; set engine per model in the config instead")
    models = _model_specs(model, engine) if model else None
    cfg = build_config(ServeConfig, config, overrides, "serve", models=models, host=host, port=port,
                       api_key_file=api_key_file, insecure_no_auth=insecure_no_auth or None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if detach and not os.environ.get("RAY_ADDRESS"):
        fail("--detach needs a running cluster: set RAY_ADDRESS (ray job submit does) or drop --detach")
    if detach:
        run_and_report(lambda: _start(cfg, detach=True), as_json, "serve")
        return
    _serve_until_interrupted(lambda: run_and_report(lambda: _start(cfg, detach=False), as_json, "serve"))


def _start(cfg, detach: bool) -> dict:
    from sp2dpo.serve.server import resolve_api_key, start_server, stop_server

    t0 = time.perf_counter()
    try:
        url = start_server(cfg)
    except (TimeoutError, RuntimeError) as exc:  # a replica that cannot load its model, a busy port
        stop_server()
        raise ValueError(f"could not start the app: {exc}") from None
    return {
        "base_url": url,
        "models": [m.id for m in cfg.models],
        "engines": {m.id: m.engine for m in cfg.models},
        "auth": "bearer" if resolve_api_key(cfg) else "none",
        "host": cfg.host,
        "app": cfg.app_name,
        "detached": detach,
        "startup_s": round(time.perf_counter() - t0, 1),
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve_until_interrupted(start) -> None:
    from sp2dpo.serve.server import stop_server

    # SIGTERM (kill, container stop) takes the same clean path as Ctrl-C, during start-up too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start()
        typer.secho("serving; press Ctrl-C to stop", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.secho("shutting down", err=True)
    finally:
        stop_server()


def register(root: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    root.command("serve")(serve_cmd)
