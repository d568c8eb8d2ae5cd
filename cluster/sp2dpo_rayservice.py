"""The Serve application builder that cluster/kuberay/rayservice.yaml names in its serveConfigV2.

    import_path: sp2dpo_rayservice:build            # runtime_env.working_dir: this directory
    args: {api_key_env: SP2DPO_API_KEY, models: [...]}

It builds sp2dpo's own OpenAI-compatible Serve app (sp2dpo/serve/app.py) from `args`, which are a
`sp2dpo.serve.ServeConfig`. Where the app listens is decided by the Serve config around it
(`http_options`, the application's `name` and `route_prefix`), so those ServeConfig fields are
refused here instead of being silently ignored. The bearer key comes from the environment variable
`api_key_env` names (a Kubernetes Secret in the manifest), read in the task that builds the app;
only its SHA-256 reaches the replicas. Without a key the app refuses to start: an endpoint on a
cluster is never open. tests/test_cluster_serve.py deploys the manifest's Serve config through
this builder.
"""

from typing import Any

# ServeConfig fields that only `sp2dpo serve` / start_server use; in a Serve config file the
# equivalent settings live outside `args`.
NOT_ARGS = {
    "host": "http_options.host",
    "port": "http_options.port",
    "app_name": "the application's name",
    "route_prefix": "the application's route_prefix",
    "access_log": "logging_config.enable_access_log",
    "startup_timeout_s": "the RayService's health thresholds",
    "insecure_no_auth": "nowhere: an endpoint on a cluster always needs the key",
}


def build(args: dict) -> Any:
    from sp2dpo.serve.app import build_app
    from sp2dpo.serve.config import ServeConfig
    from sp2dpo.serve.server import check_model_paths, resolve_api_key

    misplaced = {k: NOT_ARGS[k] for k in sorted(set(args) & set(NOT_ARGS))}
    if misplaced:
        raise ValueError(f"these args belong elsewhere in the Serve config: {misplaced}")
    cfg = ServeConfig.model_validate(args)
    key = resolve_api_key(cfg)
    if not key:
        raise ValueError(f"no API key: ${cfg.api_key_env} is unset or empty on this node "
                         "(the manifest reads it from the Secret sp2dpo-serve-api-key)")
    check_model_paths(cfg)  # a student missing on S3 fails here, not in every replica
    return build_app(cfg, key)
