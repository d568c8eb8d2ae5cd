"""Options and helpers every stage's CLI shares, so all commands look and behave alike."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from sp2dpo.config import StageConfig, load_config
from sp2dpo.utils import print_json_summary

C = TypeVar("C", bound=StageConfig)

ConfigOpt = typer.Option(None, "--config", "-c",
                         help="YAML config (a stage config, or a pipeline config with a section per stage).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: key.sub=value (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print a machine-readable JSON summary as the last line of stdout.")


def field_option(cls: type[BaseModel], name: str, *flags: str, default: Any = None, **kwargs: Any) -> Any:
    """A typer option whose help is config field `name`'s description.

    A flag that sets a config field says what the YAML key (and the docs' option table) says, from the one
    text in the config class, so the two cannot drift apart. The default stays None ("not given"), which
    build_config drops so the config/YAML value holds; a flag with no off-form (--insecure-no-auth)
    takes default=False, and its command passes `value or None`.
    """
    return typer.Option(default, *flags, help=cls.model_fields[name].description, **kwargs)


def build_config(cls: type[C], config: str | None, overrides: list[str] | None, section: str,
                 **cli_values: Any) -> C:
    """Config from YAML + `--set` overrides + explicit CLI flags (flags win; None = not given)."""
    # JSON is valid YAML, so each flag value survives the override parser with its type.
    extra = [f"{k}={json.dumps(v)}" for k, v in cli_values.items() if v is not None]
    try:
        return load_config(cls, config, list(overrides or []) + extra, section=section)
    except (ValueError, FileNotFoundError) as exc:
        fail(f"invalid config: {exc}")


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def run_and_report(fn: Callable[[], dict[str, Any]], as_json: bool, title: str) -> dict[str, Any]:
    """Run a stage, turn expected failures into clear errors, print the summary."""
    try:
        summary = fn()
    except (OSError, ValueError, KeyError) as exc:  # OSError covers unreachable storage too
        fail(str(exc).strip("'\""))
    if as_json:
        print_json_summary(summary)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_header=False)
        for key, value in summary.items():
            table.add_row(str(key), str(value))
        Console(file=sys.stdout).print(table)
    return summary
