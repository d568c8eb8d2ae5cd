"""Data sets shipped inside the package, found by name so the demo needs no path.

See sp2dpo/NOTICE for sources and licenses (AlpacaEval data is CC BY-NC 4.0).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED = {
    "ultrafeedback-sample": "ultrafeedback_train_1000.jsonl",
    "ultrafeedback-eval": "ultrafeedback_eval_200.jsonl",
    "alpaca-eval": "alpaca_eval_gpt4_1106_preview.json",
}


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled data set {name!r}; known: {sorted(BUNDLED)}")
    return Path(str(resources.files("sp2dpo.data") / "bundled" / BUNDLED[name]))


def resolve_input(name_or_path: str) -> str:
    """A bundled data set name becomes its packaged path; anything else is returned unchanged."""
    return str(bundled_path(name_or_path)) if name_or_path in BUNDLED else name_or_path
