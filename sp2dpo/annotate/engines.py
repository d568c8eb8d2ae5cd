"""LLM teacher engines behind one interface: messages in, text (and token counts) out.

    engine = build_teacher_engine(config)              # vllm | openai | transformers
    rows = LLMTeacher(engine, config).annotate(pairs)   # annotation rows, one per pair

An engine turns a list of chat conversations into `Generation`s and never raises for one bad
request: a request that fails for good comes back with `error` set, and becomes a failed row
(with the reason) instead of crashing a 60k-pair run. The same engine object runs inside a Ray Data
actor (sp2dpo/annotate/run.py) or in a plain loop (the benchmark's baseline).

`generate` is safe to call from several threads at once: a Ray Data actor works on
`pool.max_concurrent_batches` batches together, so the engine never drains between batches. The
vLLM engine then feeds every batch into one engine loop (continuous batching across batches, as
`ray.data.llm` does with its async engine), the OpenAI engine shares one event loop, connection
pool and `openai.concurrency` bound, and the transformers engine runs one batch at a time.

One file per engine: `vllm_teacher.py`, `openai_teacher.py`, `transformers_teacher.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.annotate.parse import failed, parse_annotation
from sp2dpo.annotate.prompts import build_messages, map_back
from sp2dpo.annotate.schema import annotation_json_schema


@dataclass
class Generation:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when no text could be obtained (after retries)
    finish_reason: str | None = None


class TeacherEngine(Protocol):
    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]: ...

    def close(self) -> None: ...


def teacher_schema(rationale_max_chars: int) -> dict:
    """The annotation JSON Schema with the rationale bounded for decoding."""
    schema = annotation_json_schema()
    schema["properties"]["rationale"]["maxLength"] = rationale_max_chars
    return schema


def build_teacher_engine(config: AnnotateConfig) -> TeacherEngine:
    """The engine `config.teacher` names; each engine's module (and its heavy imports) loads only when chosen."""
    if config.teacher == "vllm":
        from sp2dpo.annotate.vllm_teacher import VLLMTeacherEngine

        return VLLMTeacherEngine(config)
    if config.teacher == "transformers":
        from sp2dpo.annotate.transformers_teacher import TransformersTeacherEngine

        return TransformersTeacherEngine(config)
    if config.teacher == "openai":
        from sp2dpo.annotate.openai_teacher import OpenAITeacherEngine

        return OpenAITeacherEngine(config)
    raise ValueError(f"{config.teacher!r} is not an LLM teacher")


class LLMTeacher:
    """Pairs → prompts → engine → parsed annotation rows (ANNOTATIONS_SCHEMA dicts)."""

    def __init__(self, engine: TeacherEngine, config: AnnotateConfig):
        self.engine = engine
        self.name = config.resolved_teacher_name
        self.version = config.resolved_prompt_version
        self.rationale_chars = config.generation.rationale_max_chars

    def annotate(self, pairs: list[dict]) -> list[dict]:
        conversations = [build_messages(p, self.version, self.rationale_chars) for p in pairs]
        generations = self.engine.generate(conversations)
        rows = []
        for pair, g in zip(pairs, generations):
            parsed = failed(g.error) if g.error else parse_annotation(g.text)
            if parsed.status == "failed" and g.finish_reason == "length":
                parsed.repairs.append("hit max_tokens")
            row = parsed.as_row()
            row["rationale"] = map_back(row["rationale"], self.version)
            row.update(pair_id=pair["pair_id"], teacher=self.name, prompt_version=self.version, raw_text=g.text,
                       prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens)
            rows.append(row)
        return rows

