"""Each setting documented once: the option tables in docs/ and the CLI's config help are rendered
from the config classes' `Field(description=...)`.

A docs page marks a table with two comments; everything between them is generated:

    <!-- options: sp2dpo.pipeline.config:PipelineConfig -->
    | key | type | default | description |
    ...
    <!-- /options -->

`python -m sp2dpo.config_docs` rewrites every marked table under docs/; `--check` exits 1 naming
the pages that disagree with their schema (tests/test_config_docs.py runs that check).
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sp2dpo.pipeline.runner import load_object

MARKER = re.compile(r"(<!-- options: (?P<cls>[\w.]+:\w+) -->\n)(?P<body>.*?)(<!-- /options -->)", re.S)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type: `list[str]`, `int | None`, `sigmoid | robust`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", "")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(str(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "None")


def default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        value = value.value
    text = json.dumps(value, default=str)
    return f"`{text}`" if len(text) <= 160 else "see the class"


def missing_descriptions(cls: type[BaseModel]) -> list[str]:
    """Fields of `cls` (and of the config models it nests) without a description."""
    missing = [f"{cls.__name__}.{name}" for name, f in cls.model_fields.items() if not (f.description or "").strip()]
    for f in cls.model_fields.values():
        for nested in _nested_models(f.annotation):
            missing += missing_descriptions(nested)
    return sorted(set(missing))


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _nested_models(a)]


def options_table(cls: type[BaseModel]) -> str:
    """The markdown table of `cls`'s settings, one row per field, in declaration order."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in cls.model_fields.items():
        description = " ".join((f.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name(f.annotation)} | {default_text(f)} | {description} |")
    return "\n".join(rows) + "\n"


def options_help(cls: type[BaseModel]) -> str:
    """The same settings as plain text, for a command's `--help`."""
    lines = ["Config keys (YAML, or --set KEY=VALUE):"]
    for name, f in cls.model_fields.items():
        lines.append(f"  {name} = {default_text(f).strip('`')}: {' '.join((f.description or '').split())}")
    return "\n".join(lines)


def render(text: str) -> str:
    """`text` with every marked table regenerated from its class."""
    return MARKER.sub(lambda m: m.group(1) + options_table(load_object(m.group("cls"))) + m.group(4), text)


def pages(root: Path = DOCS) -> list[Path]:
    return sorted(p for p in root.glob("*.md") if MARKER.search(p.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate (or --check) the option tables in docs/.")
    ap.add_argument("--check", action="store_true", help="exit 1 if any page differs from its schema")
    args = ap.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(page)
            if not args.check:
                page.write_text(fresh)
    if args.check and stale:
        print("option tables differ from the config schema in: " + ", ".join(map(str, stale))
              + "\nrun `python -m sp2dpo.config_docs` to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
