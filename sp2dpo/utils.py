"""Small helpers shared by every stage: JSON summaries, progress bars, nested-dict merges,
connecting to Ray.

Reading and writing files or object-store URIs is `sp2dpo.storage`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def print_json_summary(summary: dict[str, Any]) -> None:
    """The machine-readable summary every `--json` command prints as its last stdout line."""
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` applied: nested mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if nested else value
    return merged


@contextmanager
def progress_bar(total: int | None, description: str, disable: bool = False) -> Iterator[Any]:
    """A tqdm bar on stderr (so `--json` stdout stays clean)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, file=sys.stderr, disable=disable, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def quiet_ray_worker() -> None:
    """Worker setup hook of a dashboard-less local Ray: silence the state-API warnings of Ray
    Train's placement-group cleaner (it still cleans up; only its polling cannot report)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to the cluster in RAY_ADDRESS / `address`, or start a local one. Idempotent.

    Inside `ray job submit` RAY_ADDRESS is set, so the same call joins the cluster; on a laptop it
    starts a local instance. Logs go to files, not the terminal, so progress bars stay readable.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("configure_logging", True)
    kwargs.setdefault("logging_level", "WARNING")
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local and not kwargs["include_dashboard"]:
        # No dashboard means no state API, and Ray Train's placement-group cleaner then warns every
        # few seconds that it cannot query it: a wall of noise over the progress bars.
        kwargs.setdefault("runtime_env", {"worker_process_setup_hook": "sp2dpo.utils.quiet_ray_worker"})
    store_mb = os.environ.get("SP2DPO_RAY_OBJECT_STORE_MB")
    if store_mb and local:
        # Cap the object store of a local instance (tests, small laptops); Ray Data spills beyond.
        kwargs.setdefault("object_store_memory", int(store_mb) << 20)
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), **kwargs)
    # Ray Data's own progress bars fight with ours: keep one bar per stage.
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
