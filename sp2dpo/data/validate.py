"""Row validation: one input record → one pairs-table row, or a RowError saying why not.

Pure and per row: the readers (sp2dpo/data/readers.py) call `normalize_record` on every record
they find, and a RowError becomes that row's quarantine reason.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sp2dpo.data.schema import pair_id_of

SCORE_FIELDS = ("score_chosen", "score_rejected")
TEXT_FIELDS = ("prompt", "chosen", "rejected")


class RowError(ValueError):
    """A row that cannot become a pair; `code` groups reasons for the summary."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


# ----------------------------------------------------------------------------- row validation


def _messages(field: str, value: list) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError("wrong_type", f"field {field!r}: message {i} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise RowError("bad_message", f"field {field!r}: message {i} has no role")
        if content is None:
            raise RowError("bad_message", f"field {field!r}: message {i} ({role}) has no content")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise RowError("wrong_type", f"field {field!r}: message {i} content is {kind}, not a string")
        if not content.strip():
            raise RowError("empty", f"field {field!r}: message {i} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    if not messages:
        raise RowError("empty", f"field {field!r} is an empty message list")
    return messages


def _text_or_messages(record: dict, field: str) -> str | list[dict[str, str]]:
    if field not in record:
        raise RowError("missing", f"missing field {field!r}")
    value = record[field]
    if value is None:
        raise RowError("null", f"field {field!r} is null")
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty", f"field {field!r} is empty or whitespace-only")
        return value
    if isinstance(value, list):
        return _messages(field, value)
    raise RowError("wrong_type", f"field {field!r} is {type(value).__name__}, expected a string or a list of messages")


def _completion(field: str, value: str | list[dict[str, str]], prompt: list[dict[str, str]]) -> str:
    """The assistant text of a completion given as a string or as messages (which may repeat the
    prompt, as in HF ultrafeedback_binarized where `chosen` is the whole conversation)."""
    if isinstance(value, str):
        return value
    if value[: len(prompt)] == prompt:
        value = value[len(prompt):]
    if len(value) != 1 or value[0]["role"] != "assistant":
        roles = [m["role"] for m in value]
        raise RowError("bad_message", f"field {field!r}: expected one assistant message after the prompt, got {roles}")
    return value[0]["content"]


def _score(record: dict, field: str) -> float | None:
    value = record.get(field)
    if value is None and isinstance(record.get("metadata"), dict):
        value = record["metadata"].get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("wrong_type", f"field {field!r} is {type(value).__name__}, expected a number")
    if not math.isfinite(value):
        raise RowError("wrong_type", f"field {field!r} is {value}, expected a finite number")
    return float(value)


def normalize_record(record: Any, source: str) -> dict[str, Any]:
    """One input row → one pairs-table row, or RowError with a human-readable reason."""
    if not isinstance(record, dict):
        raise RowError("not_object", f"row is a JSON {type(record).__name__}, not an object")
    chosen_raw = _text_or_messages(record, "chosen")
    rejected_raw = _text_or_messages(record, "rejected")
    if "prompt" not in record and isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        # TRL's implicit-prompt layout: the shared prefix of both conversations is the prompt.
        shared = 0
        while shared < min(len(chosen_raw), len(rejected_raw)) - 1 and chosen_raw[shared] == rejected_raw[shared]:
            shared += 1
        if shared == 0:
            raise RowError("missing", "missing field 'prompt' and chosen/rejected share no prompt messages")
        prompt_raw: str | list = chosen_raw[:shared]
    else:
        prompt_raw = _text_or_messages(record, "prompt")

    prompt_messages = [{"role": "user", "content": prompt_raw}] if isinstance(prompt_raw, str) else prompt_raw
    user_turns = [m["content"] for m in prompt_messages if m["role"] == "user"]
    if not user_turns:
        raise RowError("bad_message", "field 'prompt' has no user message")
    chosen = _completion("chosen", chosen_raw, prompt_messages)
    rejected = _completion("rejected", rejected_raw, prompt_messages)
    if chosen.strip() == rejected.strip():
        raise RowError("identical", "chosen and rejected are identical")

    # A single user turn is stored as plain text, so string and conversational inputs of the same
    # pair get the same id; longer prompts keep their full message list.
    single_turn = len(prompt_messages) == 1
    prompt_key: str | list = user_turns[-1] if single_turn else prompt_messages
    meta = {k: v for k, v in record.items() if k not in TEXT_FIELDS + SCORE_FIELDS}
    return {
        "pair_id": pair_id_of(prompt_key, chosen, rejected),
        "prompt": user_turns[-1],
        "chosen": chosen,
        "rejected": rejected,
        "prompt_messages": None if single_turn else json.dumps(prompt_messages, ensure_ascii=False),
        "source": source,
        "score_chosen": _score(record, "score_chosen"),
        "score_rejected": _score(record, "score_rejected"),
        "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None,
    }
