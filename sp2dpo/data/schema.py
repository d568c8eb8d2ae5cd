"""Fixed Parquet schemas of the tables the data stage writes (see DESIGN.md), and the pair id."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

PAIRS_SCHEMA = pa.schema(
    [
        # sha256 (first 32 hex chars) of the canonical JSON of prompt + chosen + rejected.
        pa.field("pair_id", pa.string(), nullable=False),
        # Plain text of the final user turn; the full conversation is in prompt_messages.
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        # JSON list of {role, content} for conversational inputs with more than one prompt message
        # (system prompt, earlier turns); null when the prompt is a single user turn.
        pa.field("prompt_messages", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("score_chosen", pa.float64()),
        pa.field("score_rejected", pa.float64()),
        # Every other input field, JSON-encoded, so nothing in the input is lost.
        pa.field("meta", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # input file
        pa.field("location", pa.string(), nullable=False),  # "line 17", "row 17"
        pa.field("raw", pa.string(), nullable=False),  # the raw line/row (bad bytes escaped)
        pa.field("reason", pa.string(), nullable=False),  # human-readable
    ]
)


def pair_id_of(prompt: str | list[dict[str, str]], chosen: str, rejected: str) -> str:
    """Stable content hash: the same triple gets the same id on any machine, any run."""
    canonical = json.dumps(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
