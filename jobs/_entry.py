"""Shared body of the `ray job submit` entrypoints: run one `sp2dpo` subcommand in the job driver.

The driver joins the cluster through RAY_ADDRESS (set by `ray job submit`), so the stage code is
the same that runs from the CLI on a laptop, reading the same config file.
"""

from __future__ import annotations

import sys


def run(*stage: str) -> None:
    from sp2dpo.cli import app

    app([*stage, *sys.argv[1:]], prog_name=f"jobs/{stage[0]}.py")
