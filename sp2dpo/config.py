"""Typed configuration shared by Python, the CLI and `ray job submit` entrypoints.

Every stage has one pydantic schema (a subclass of `StageConfig`). A config is loaded from YAML,
then `key.sub=value` overrides are applied, then it is validated: the same function serves
`sp2dpo <stage> --config x.yaml --set key=value`, `jobs/<stage>.py --config x.yaml` and Python.

A YAML file may hold one stage's config, or a whole pipeline config with one section per stage
(`annotate:`, `schedule:`, ...): `load_config(..., section="annotate")` then reads that section.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def config_hash(self) -> str:
        """Stable hash of the validated config (defaults included): keys sorted, JSON-encoded."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def packaged_config_path(name: str) -> Path:
    """Path of a YAML shipped in `sp2dpo/configs/` (`demo` or `demo.yaml`)."""
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = Path(str(resources.files("sp2dpo") / "configs" / filename))
    if not path.exists():
        available = sorted(p.name for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no packaged config {name!r}; available: {available}")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. `path` may name a packaged config (`demo`) instead of a file."""
    p = Path(path)
    if not p.exists() and "/" not in str(path):
        p = packaged_config_path(str(path))
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (`3`, `true`, `[1,2]`, `null`)."""
    data = json.loads(json.dumps(data))  # deep copy, plain types only
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> C:
    """Load `cls` from YAML (or its defaults when `path` is None), apply overrides, validate."""
    data = read_yaml(path) if path else {}
    if section and section in data and isinstance(data[section], dict):
        data = data[section]
    return cls.model_validate(apply_overrides(data, overrides))
