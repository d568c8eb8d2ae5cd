"""Teacher text → annotation: strict validation first, then explicit repairs, else a failed row.

    parse_annotation('{"category": "style", "magnitude": 1, "confidence": 0.7, "rationale": "..."}')
    → Parsed(status="ok", ...)

- `ok`: the text is exactly one JSON object that validates against `Annotation` as is.
- `repaired`: the text needed fixes that do not guess at meaning: code fences, text around the
  object, single quotes / Python literals, trailing commas, category spelling ("Instruction
  Following"), numbers given as strings, a confidence given as a percentage ("85%" → 0.85), a
  fractional magnitude rounded to the nearest level, an over-long rationale cut. Every fix is
  listed in `repairs`.
- `failed`: nothing usable (no object, unknown category, a missing field, a magnitude outside
  0..3 or a confidence outside [0, 1] — a bare 85 may mean 85% or a 0-100 scale, so it is not
  guessed): the reason is kept and the caller stores the raw text, so nothing is silently dropped.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sp2dpo.annotate.schema import (
    CATEGORIES,
    MAGNITUDE_MAX,
    MAGNITUDE_MIN,
    RATIONALE_MAX_CHARS,
    Annotation,
)

# Names teachers reach for instead of ours; only unambiguous ones.
CATEGORY_ALIASES = {
    "instruction": "instruction_following",
    "instructions": "instruction_following",
    "instruction_violation": "instruction_following",
    "correctness": "reasoning",
    "correctness_reasoning": "reasoning",
    "harm": "safety",
    "harmful": "safety",
    "factual": "factuality",
    "factual_accuracy": "factuality",
    "helpful": "helpfulness",
    "helpfulness_completeness": "helpfulness",
    "completeness": "helpfulness",
    "style_tone": "style",
    "tone": "style",
    "formatting": "style",
    "tie": "no_real_difference",
    "noise": "no_real_difference",
    "noise_or_tie": "no_real_difference",
    "none": "no_real_difference",
    "label_noise": "no_real_difference",
}

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
# A stretch a teacher quotes from its fenced prompt (prompts.fence): the pair's text, never its answer.
_FENCED = re.compile(r"<<<([a-z_]+)_([0-9a-f]{16})>>>.*?<<<end_\1_\2>>>", re.DOTALL)


@dataclass
class Parsed:
    status: str  # ok | repaired | failed
    category: str | None = None
    magnitude: int | None = None
    confidence: float | None = None
    rationale: str | None = None
    repairs: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "magnitude": self.magnitude,
            "confidence": self.confidence,
            "rationale": self.rationale,
            "status": self.status,
            "repairs": json.dumps(self.repairs) if self.repairs else None,
        }


def failed(reason: str) -> Parsed:
    return Parsed(status="failed", repairs=[reason])


def _first_object(text: str) -> str | None:
    """The first balanced {...} in `text`, honouring quoted strings (either quote style)."""
    start = text.find("{")
    while start >= 0:
        depth, quote, escaped = 0, None, False
        for i in range(start, len(text)):
            ch = text[i]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i + 1]
        start = text.find("{", start + 1)
    return None


def _load_object(text: str, repairs: list[str]) -> dict | None:
    """Near-JSON → dict, recording each step that was needed."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    fenced = _FENCE.search(stripped)
    if fenced:
        repairs.append("removed code fence")
        stripped = fenced.group(1).strip()
    candidate = _first_object(stripped)
    if candidate is None:
        return None
    if candidate != stripped:
        repairs.append("extracted the JSON object from surrounding text")
    try:
        value = json.loads(candidate)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    no_trailing = _TRAILING_COMMA.sub(r"\1", candidate)
    if no_trailing != candidate:
        try:
            value = json.loads(no_trailing)
            repairs.append("removed trailing comma")
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            pass
    # Single quotes, True/False/None: a Python dict literal. literal_eval evaluates no code.
    pythonish = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", no_trailing)))
    try:
        value = ast.literal_eval(pythonish)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    if isinstance(value, dict):
        repairs.append("converted a Python-style literal (single quotes) to JSON")
        return value
    return None


def _number(value: Any, name: str, repairs: list[str], percent_ok: bool = False) -> float | None:
    """A finite number from a number or a numeric string; `"85%"` is 0.85 where `percent_ok`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        percent = text.endswith("%")
        if percent and not percent_ok:
            return None
        try:
            number = float(text[:-1] if percent else text)
        except ValueError:
            return None
        if not math.isfinite(number):
            return None
        if percent:
            number /= 100.0
            repairs.append(f"{name} {value!r} read as the fraction {number:g}")
        else:
            repairs.append(f"{name} given as a string")
        return number
    return None


def _category(value: Any, repairs: list[str]) -> str | None:
    if not isinstance(value, str):
        return None
    if value in CATEGORIES:
        return value
    key = re.sub(r"[\s\-/]+", "_", value.strip().lower())
    key = CATEGORY_ALIASES.get(key, key)
    if key in CATEGORIES:
        repairs.append(f"category {value!r} read as {key!r}")
        return key
    return None


def _normalise(obj: dict, repairs: list[str]) -> Parsed:
    for name in ("category", "magnitude", "confidence"):
        if name not in obj:
            return failed(f"missing field {name!r}")
    extra = sorted(set(obj) - set(Annotation.model_fields))
    if extra:
        repairs.append(f"ignored extra keys {extra}")
    category = _category(obj["category"], repairs)
    if category is None:
        return failed(f"unknown category {obj['category']!r}")

    magnitude = _number(obj["magnitude"], "magnitude", repairs)
    if magnitude is None:
        return failed(f"magnitude {obj['magnitude']!r} is not a number")
    # Outside the scale is a different scale, not a slip: refuse rather than clamp.
    if not MAGNITUDE_MIN <= round(magnitude) <= MAGNITUDE_MAX:
        return failed(f"magnitude {obj['magnitude']!r} is outside the scale {MAGNITUDE_MIN}..{MAGNITUDE_MAX}")
    if magnitude != round(magnitude):
        repairs.append(f"magnitude {magnitude:g} rounded")
    magnitude_int = int(round(magnitude))

    confidence = _number(obj["confidence"], "confidence", repairs, percent_ok=True)
    if confidence is None:
        return failed(f"confidence {obj['confidence']!r} is not a number")
    if not 0.0 <= confidence <= 1.0:
        return failed(f"confidence {obj['confidence']!r} is outside [0, 1]")

    rationale = obj.get("rationale", "")
    if rationale is None:
        rationale = ""
    if not isinstance(rationale, str):
        rationale = json.dumps(rationale, ensure_ascii=False)
        repairs.append("rationale was not a string")
    if "rationale" not in obj:
        repairs.append("missing rationale")
    if len(rationale) > RATIONALE_MAX_CHARS:
        repairs.append(f"rationale cut to {RATIONALE_MAX_CHARS} characters")
        rationale = rationale[:RATIONALE_MAX_CHARS]

    # The final word is the schema's own validator, so a repaired row is valid by construction.
    Annotation(category=category, magnitude=magnitude_int, confidence=confidence, rationale=rationale)
    return Parsed("repaired" if repairs else "ok", category, magnitude_int, float(confidence), rationale, repairs)


def parse_annotation(text: str | None) -> Parsed:
    """Validate or repair one teacher output; never raises."""
    if text is None or not text.strip():
        return failed("empty output")
    try:
        strict = json.loads(text)
        if isinstance(strict, dict):
            annotation = Annotation.model_validate_json(text, strict=True)
            if set(strict) == set(Annotation.model_fields):
                return Parsed("ok", annotation.category, annotation.magnitude, float(annotation.confidence),
                              annotation.rationale)
    except (json.JSONDecodeError, ValidationError, ValueError):
        pass
    repairs: list[str] = []
    unfenced = _FENCED.sub(" ", text)
    if unfenced != text:
        repairs.append("ignored text quoted between fence markers")
        text = unfenced
    try:
        obj = _load_object(text, repairs)
        if obj is None:
            return failed("no JSON object in the output")
        return _normalise(obj, repairs)
    except (ValidationError, ValueError, TypeError, OverflowError) as exc:  # defensive: never crash on text
        return failed(f"invalid annotation: {exc}")
