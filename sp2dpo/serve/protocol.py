"""The OpenAI wire format: request schemas, validation into sampling options, error bodies.

Unknown request fields are tolerated (clients send many we do not use); known fields are checked
strictly — a string where a number belongs is a 400, not a silent coercion. Every refusal is an
`APIError` that becomes `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class APIError(Exception):
    """A request refused with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


@dataclass
class SamplingOptions:
    """What the engines need to know about one generation, validated."""

    max_tokens: int | None  # None = engine default, capped by the context left
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Number of alternatives per position; None = no log-probs at all, 0 = the sampled token only.
    top_logprobs: int | None = None


def parse_request(raw: bytes, kind: Literal["chat", "completion"]) -> ChatCompletionRequest | CompletionRequest:
    """Bytes of a POST body → a validated request, or a 400 that names the offending field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"invalid field {param!r}: {first['msg']}", param=param) from None


def sampling_options(req: ChatCompletionRequest | CompletionRequest) -> SamplingOptions:
    """Cross-field checks the schema cannot express; returns the engine-facing options."""
    if req.n != 1:
        raise bad_request("only n=1 is supported", param="n")
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise bad_request(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings", param="stop")
    top: int | None = None
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
    else:
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad_request(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}", param="logprobs")
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        top = req.logprobs
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options needs stream=true", param="stream_options")
    return SamplingOptions(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                           seed=req.seed, stop=stop, top_logprobs=top)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template wants them: text parts joined, other parts refused."""
    messages = []
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}]: only text content parts are supported",
                                      param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        messages.append({"role": message.role, "content": content or ""})
    return messages
