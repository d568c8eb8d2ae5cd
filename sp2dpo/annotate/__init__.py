"""Stage: annotate — teacher semantic-gap annotations of every pair, streamed through Ray Data.

    from sp2dpo.annotate import AnnotateConfig, annotate
    summary = annotate(AnnotateConfig(pairs="runs/data", teacher="ratings", out="runs/ann"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sp2dpo.annotate.config import AnnotateConfig
    from sp2dpo.annotate.run import annotate

__all__ = ["AnnotateConfig", "annotate"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `sp2dpo --help` does not import pyarrow/pydantic models for this stage.
    if name == "AnnotateConfig":
        from sp2dpo.annotate.config import AnnotateConfig

        return AnnotateConfig
    if name == "annotate":
        from sp2dpo.annotate.run import annotate

        return annotate
    raise AttributeError(name)
