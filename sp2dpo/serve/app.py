"""The Ray Serve application: one FastAPI ingress, one deployment per served model.

    client ──HTTP──▶ proxy ──▶ OpenAIIngress (auth, size limit, validation, routing by `model`)
                                   └─handle─▶ ModelDeployment[id] (engine + OpenAI layer), scaled per model

The ingress refuses what it can without a model (401, 413, malformed JSON, wrong types, unknown
model → 404, too many prompts → 400); the model replica refuses what needs its tokenizer (prompt
over the context → 400). A /v1/completions request with several prompts reaches the replicas as
one request per prompt, so each prompt counts against a replica's `max_ongoing_requests`.
/health says only that the app is up; what it serves is behind the key (/v1/models).
A replica answers every request with a status and a body instead of raising, so a bad request
never looks like a replica failure and never costs a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from sp2dpo.serve.config import ModelConfig, ServeConfig
from sp2dpo.serve.protocol import APIError, error_body, parse_request

log = logging.getLogger("ray.serve")


def key_digest(api_key: str | None) -> str | None:
    """Replicas keep only the key's SHA-256, so the key itself never lands in Serve's state."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _relay(stream: Any) -> AsyncIterator[str]:
    """A replica's SSE lines; when the replica dies mid-stream, an OpenAI error event ends the
    stream cleanly (the client raises it and may retry) instead of a cut connection."""
    try:
        async for line in stream:
            yield line
    except Exception as exc:
        log.warning("stream lost its model replica: %s", type(exc).__name__)
        yield _sse(error_body("the model replica serving this stream failed; retry the request",
                              "server_error", None, "replica_failed"))
        yield "data: [DONE]\n\n"


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, max_constructor_retry_count=3)
class ModelDeployment:
    """One model: an engine plus the OpenAI layer. Returns (status, body); streams SSE lines."""

    def __init__(self, model: dict[str, Any]):
        from sp2dpo.serve.engines import build_engine
        from sp2dpo.serve.openai_layer import OpenAIModel

        cfg = ModelConfig.model_validate(model)
        self.engine = build_engine(cfg)
        self.model = OpenAIModel(cfg.id, self.engine, cfg.default_max_tokens, cfg.stream_interval)
        self.prompts_now = self.prompts_peak = 0

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError("the generation engine stopped")

    def load(self) -> dict[str, int]:
        """Prompts this replica is generating now, the most it has held at once, and its process."""
        import os

        return {"prompts_now": self.prompts_now, "prompts_peak": self.prompts_peak, "pid": os.getpid()}

    def _count(self, request: Any, delta: int) -> None:
        prompt = getattr(request, "prompt", None)
        n = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else 1
        self.prompts_now += delta * n
        self.prompts_peak = max(self.prompts_peak, self.prompts_now)

    async def respond(self, request: Any) -> tuple[int, dict[str, Any]]:
        self._count(request, +1)
        try:
            return 200, await self.model.respond(request)
        except APIError as exc:
            return exc.status, exc.body()
        except Exception as exc:
            log.exception("request failed")
            return 500, error_body(f"internal error: {type(exc).__name__}", "server_error")
        finally:
            self._count(request, -1)

    async def respond_stream(self, request: Any) -> AsyncIterator[Any]:
        """First item: (status, error body or None); then SSE lines, ending with `data: [DONE]`."""
        self._count(request, +1)
        try:
            async for item in self._stream(request):
                yield item
        finally:
            self._count(request, -1)

    async def _stream(self, request: Any) -> AsyncIterator[Any]:
        chunks = self.model.respond_stream(request)
        try:
            first = await chunks.__anext__()
        except APIError as exc:
            yield exc.status, exc.body()
            return
        except Exception as exc:
            log.exception("request failed")
            yield 500, error_body(f"internal error: {type(exc).__name__}", "server_error")
            return
        yield 200, None
        yield _sse(first)
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except Exception as exc:  # headers are sent: the error travels as an SSE event
            log.exception("stream failed")
            yield _sse(error_body(f"internal error: {type(exc).__name__}", "server_error"))
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"


api = FastAPI(title="sp2dpo OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code), status_code=exc.status_code)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A model replica that died or timed out: still an OpenAI-shaped body, never a bare 500 page.
    log.exception("unhandled error")
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, models: dict[str, Any], api_key_sha256: str | None, max_request_bytes: int,
                 max_prompts_per_request: int = 16):
        self.models = models
        self.api_key_sha256 = api_key_sha256
        self.max_request_bytes = max_request_bytes
        self.max_prompts_per_request = max_prompts_per_request
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.api_key_sha256):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"request body exceeds {self.max_request_bytes} bytes", code="request_too_large")
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():  # chunked bodies carry no length: count as we read
            body += part
            if len(body) > self.max_request_bytes:
                raise too_big
        return bytes(body)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [
            {"id": mid, "object": "model", "created": self.created, "owned_by": "sp2dpo"} for mid in self.models]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._generate(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Any:
        self._authorize(request)
        req = parse_request(await self._body(request), kind)  # type: ignore[arg-type]
        handle = self.models.get(req.model)
        if handle is None:
            raise APIError(404, f"The model '{req.model}' does not exist; served: {sorted(self.models)}",
                           param="model", code="model_not_found")
        prompts = getattr(req, "prompt", None)
        if isinstance(prompts, list) and prompts and isinstance(prompts[0], str):
            if len(prompts) > self.max_prompts_per_request:
                raise APIError(400, f"{len(prompts)} prompts in one request; at most {self.max_prompts_per_request} "
                               "(the server's max_prompts_per_request)", param="prompt")
            if not req.stream and len(prompts) > 1:
                return await self._completions_per_prompt(handle, req)
        if not req.stream:
            status, body = await handle.respond.remote(req)
            return JSONResponse(body, status_code=status)
        stream = handle.options(stream=True).respond_stream.remote(req)
        status, error = await stream.__anext__()
        if error is not None:
            stream.cancel()
            return JSONResponse(error, status_code=status)
        return StreamingResponse(_relay(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


    async def _completions_per_prompt(self, handle: Any, req: Any) -> JSONResponse:
        """One replica request per prompt, answered as one response (the first refusal wins)."""
        results = await asyncio.gather(*(handle.respond.remote(req.model_copy(update={"prompt": p}))
                                         for p in req.prompt))
        for status, body in results:
            if status != 200:
                return JSONResponse(body, status_code=status)
        bodies = [body for _, body in results]
        choices = [{**body["choices"][0], "index": i} for i, body in enumerate(bodies)]
        usage = {k: sum(body["usage"][k] for body in bodies) for k in bodies[0]["usage"]}
        return JSONResponse({**bodies[0], "choices": choices, "usage": usage})


def deployment_name(model_id: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "_", model_id)


def deployment_options(m: ModelConfig) -> dict[str, Any]:
    """Ray Serve options of one model's deployment: replicas or autoscaling, resources."""
    options: dict[str, Any] = {
        "name": deployment_name(m.id),
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        "max_ongoing_requests": m.max_ongoing_requests,
    }
    if m.autoscaling is not None:
        options["autoscaling_config"] = m.autoscaling.model_dump()
    else:
        options["num_replicas"] = m.num_replicas
    return options


def build_app(cfg: ServeConfig, api_key: str | None = None) -> Any:
    """The bound application: `serve.run(build_app(cfg, key), ...)`."""
    handles = {m.id: ModelDeployment.options(**deployment_options(m)).bind(m.model_dump()) for m in cfg.models}
    return OpenAIIngress.options(num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": 0}).bind(
        handles, key_digest(api_key), cfg.max_request_bytes, cfg.max_prompts_per_request)
