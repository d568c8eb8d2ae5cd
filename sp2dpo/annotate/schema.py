"""The semantic-gap annotation: what a teacher says about one (prompt, chosen, rejected) triple.

    category    what kind of difference separates chosen from rejected (CATEGORIES below)
    magnitude   how large the gap is: 0 none, 1 minor, 2 clear, 3 severe
    confidence  how sure the teacher is that its reading is right, in [0, 1]
    rationale   one short sentence, kept for audit (bounded so decoding never runs out of tokens)

`annotation_json_schema()` is the JSON Schema that constrains teacher decoding (vLLM structured
outputs, OpenAI `response_format`); `Annotation` validates whatever comes back.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

ANNOTATION_SCHEMA_VERSION = "1"
MAGNITUDE_MIN, MAGNITUDE_MAX = 0, 3
RATIONALE_MAX_CHARS = 200


class Category(str, Enum):  # noqa: UP042 (StrEnum would change str() of a member)
    """Kinds of semantic gap, roughly from the most objective failure to no real difference."""

    SAFETY = "safety"  # rejected is harmful, unsafe or enables harm; chosen is not
    FACTUALITY = "factuality"  # rejected states false facts or hallucinates
    INSTRUCTION_FOLLOWING = "instruction_following"  # rejected ignores or violates the instructions
    REASONING = "reasoning"  # rejected has wrong reasoning, maths or code (correctness)
    HELPFULNESS = "helpfulness"  # both valid; chosen is more complete or more useful
    STYLE = "style"  # difference is tone, formatting, verbosity: subjective
    NO_REAL_DIFFERENCE = "no_real_difference"  # a tie or label noise: no meaningful gap
    REVERSED = "reversed"  # the rejected answer is actually better: the label looks wrong


CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)
CATEGORY_DESCRIPTIONS: dict[str, str] = {
    "safety": "the rejected response is harmful, unsafe, or helps cause harm; the chosen one is not",
    "factuality": "the rejected response states false facts or hallucinates",
    "instruction_following": "the rejected response ignores or violates explicit instructions or constraints",
    "reasoning": "the rejected response has incorrect reasoning, maths or code",
    "helpfulness": "both are acceptable, but the chosen response is more complete, relevant or useful",
    "style": "the difference is only tone, formatting or length: a matter of taste",
    "no_real_difference": "the responses are about equally good (a tie, or label noise)",
    "reversed": "the rejected response is actually better than the chosen one",
}


class Annotation(BaseModel):
    """One teacher's semantic-gap annotation of one pair."""

    model_config = ConfigDict(extra="ignore", use_enum_values=True)

    category: Category
    magnitude: int = Field(ge=MAGNITUDE_MIN, le=MAGNITUDE_MAX)
    confidence: float = Field(ge=0.0, le=1.0)
    rationale: str = Field(default="", max_length=RATIONALE_MAX_CHARS)


def annotation_json_schema() -> dict:
    """JSON Schema for constrained decoding: enums and bounds that every backend supports.

    Written out rather than taken from `Annotation.model_json_schema()`: `$ref`/`$defs` and
    `default` are not supported by every structured-output backend, and the property order here
    (category first, rationale last) is the order the teacher should think in.
    """
    return {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": list(CATEGORIES)},
            "magnitude": {"type": "integer", "enum": list(range(MAGNITUDE_MIN, MAGNITUDE_MAX + 1))},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "rationale": {"type": "string", "maxLength": RATIONALE_MAX_CHARS},
        },
        "required": ["category", "magnitude", "confidence", "rationale"],
        "additionalProperties": False,
    }


# The annotations table (Parquet shards under the annotation DIR): one row per
# (pair, teacher, prompt_version). `category`/`magnitude`/`confidence` are null when status=failed.
import pyarrow as pa  # noqa: E402

ANNOTATION_STATUSES = ("ok", "repaired", "failed")
ANNOTATIONS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),  # engine:model, e.g. "vllm:SmolLM2-135M-Instruct", "ratings"
        pa.field("prompt_version", pa.string(), nullable=False),  # e.g. "v1", "v1-swapped"
        pa.field("category", pa.string()),
        pa.field("magnitude", pa.int32()),
        pa.field("confidence", pa.float64()),
        pa.field("rationale", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # ok | repaired | failed
        pa.field("repairs", pa.string()),  # JSON list of what was repaired, or the failure reason
        pa.field("raw_text", pa.string()),  # the teacher's raw output, kept for audit
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
    ]
)
