"""Stage: schedule. Semantic-gap annotations → one β_i per pair, written as an auditable artifact.

    consensus.py  several annotations per pair → one (majority category, agreement, ...)
    config.py     ScheduleConfig (the β mapping) and the controls
    beta.py       the pure, vectorised β schedule
    artifact.py   the artifact: build, read, verify, and the rows training uses
    audit.py      the Markdown + PNG report a reviewer reads
"""

from typing import Any

__all__ = ["ScheduleConfig", "build_artifact", "training_pairs", "read_artifact", "verify_artifact", "write_audit"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `sp2dpo --help` does not import numpy/pyarrow through the CLI registration.
    if name == "ScheduleConfig":
        from sp2dpo.schedule.config import ScheduleConfig

        return ScheduleConfig
    if name in ("build_artifact", "training_pairs", "read_artifact", "verify_artifact"):
        from sp2dpo.schedule import artifact

        return getattr(artifact, name)
    if name == "write_audit":
        from sp2dpo.schedule.audit import write_audit

        return write_audit
    raise AttributeError(f"module 'sp2dpo.schedule' has no attribute {name!r}")
