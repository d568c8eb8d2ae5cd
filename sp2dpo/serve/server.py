"""Start and stop the app from Python, the CLI and `ray job submit`.

    base_url = start_server(ServeConfig(port=8123))   # "http://127.0.0.1:8123/v1" once /health answers
    OpenAI(base_url=base_url, api_key=...).chat.completions.create(model="base", ...)
    stop_server()                                     # deletes the app; stops Serve/Ray if we started them
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any

from sp2dpo.serve.config import ServeConfig

log = logging.getLogger(__name__)

# What start_server started, so stop_server undoes exactly that and nothing that was already running.
_STATE: dict[str, Any] = {}


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The bearer key: $<api_key_env> when set, else the first line of api_key_file, else None (open)."""
    key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
    if key:
        return key
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file not found: {path}")
        text = path.read_text().strip()
        key = text.splitlines()[0].strip() if text else ""
        if not key:
            raise ValueError(f"api_key_file {path} is empty")
        return key
    return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; anything else (0.0.0.0, a LAN address, a name) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeConfig, api_key: str | None) -> None:
    """Refuse to serve a non-loopback host without a key unless insecure_no_auth says so."""
    if api_key or is_loopback(cfg.host):
        return
    if not cfg.insecure_no_auth:
        raise ValueError(
            f"host {cfg.host!r} is reachable from other machines and no API key is set: set "
            f"${cfg.api_key_env} or api_key_file, bind host 127.0.0.1, or pass --insecure-no-auth "
            "(insecure_no_auth: true) to serve the models to anyone who reaches the port")
    log.warning("serving %s:%d with no API key (insecure_no_auth): anyone who reaches the port can use the models",
                cfg.host, cfg.port)


def check_model_paths(cfg: ServeConfig) -> None:
    """Refuse a model directory that is plainly missing before any replica tries to load it (a
    replica stages a model on object storage to its node's cache when it starts)."""
    from sp2dpo import storage

    for m in cfg.models:
        if m.path and (storage.is_uri(m.path) or m.path.startswith((".", "/", "~")) or os.sep in m.path):
            if not storage.is_file(storage.join_uri(m.path, "config.json")):
                raise FileNotFoundError(f"model {m.id!r}: no Hugging Face model directory at {m.path} "
                                        "(config.json missing)")


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"


def start_server(cfg: ServeConfig, api_key: str | None = None) -> str:
    """Deploy the app (non-blocking) and return its OpenAI base URL once /health answers.

    `api_key` overrides the env var / file of the config. Connects to the cluster in RAY_ADDRESS
    or starts a local Ray; the Serve HTTP proxy listens on cfg.host:cfg.port.
    """
    import httpx
    import ray
    from ray import serve

    from sp2dpo.serve.app import build_app
    from sp2dpo.utils import init_ray

    key = api_key or resolve_api_key(cfg)
    check_exposure(cfg, key)
    check_model_paths(cfg)
    started_ray = not ray.is_initialized()
    init_ray()
    started_serve = not _serve_running()
    _STATE.update(app=cfg.app_name, started_ray=started_ray or _STATE.get("started_ray", False),
                  started_serve=started_serve or _STATE.get("started_serve", False))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, key), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False,
              logging_config={"enable_access_log": cfg.access_log})
    url = base_url(cfg)
    health = url[: -len("/v1")] + "/health"
    deadline = time.monotonic() + cfg.startup_timeout_s
    while True:
        try:
            if httpx.get(health, timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{health} did not answer within {cfg.startup_timeout_s:.0f} s "
                               "(is Serve already listening on another port in this cluster?)")
        time.sleep(0.5)


def stop_server() -> None:
    """Delete the app; shut Serve down and Ray too when start_server started them."""
    import ray
    from ray import serve

    if not _STATE or not ray.is_initialized():
        _STATE.clear()
        return
    try:
        if _STATE.get("started_serve"):
            serve.shutdown()
        else:
            serve.delete(_STATE["app"])
    finally:
        if _STATE.get("started_ray"):
            ray.shutdown()
        _STATE.clear()
