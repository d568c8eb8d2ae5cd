"""Shared body of the `ray job submit` entrypoints: run one `sp2dpo` subcommand in the job driver.

The driver joins the cluster through RAY_ADDRESS (set by `ray job submit`), so the stage code is
the same that runs from the CLI on a laptop, reading the same config file.
"""

from __future__ import annotations

import os
import sys


def run(*stage: str) -> None:
    # The job's working dir is a Ray-managed copy that can be removed while the job still runs:
    # Ray unpacks a working dir with overwrite, so a second raylet sharing this node's Ray temp dir
    # (several nodes on one host) replaces it on first use. Relative sys.path entries would then
    # fail every later import that resolves them (pkg_resources does), so pin them now.
    sys.path[:] = [os.path.abspath(p) for p in sys.path]
    from sp2dpo.cli import app

    app([*stage, *sys.argv[1:]], prog_name=f"jobs/{stage[0]}.py")
