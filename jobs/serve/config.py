"""The typed configuration of the serving application, shared by ``maskray serve``, ``serve run`` and YAML.

``ServeConfig`` is what the application builder takes: ``serve run jobs.serve.app:build_app model=tiny-meissonic
max_batch_size=8`` passes flat ``key=value`` strings, a Serve config file passes the same keys under
``applications[].args`` (nested mappings allowed), and ``maskray serve`` builds it from its flags. The
deployment options here (replicas, queue bounds, GPUs) are the builder's defaults; a Serve config file's
``deployments:`` section overrides them as Serve always does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.scoring.registry import ScorerConfig
from mgt.config import ModelConfig


class ServeConfig(BaseModel):
    """What the endpoint serves and how it batches, queues and sheds load."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to serve: a ModelConfig "
                               "mapping, or just its `model` name (e.g. tiny-meissonic, MeissonFlow/Meissonic).")
    served_model_name: str | None = Field(None, description="The id clients pass as `model` and GET /v1/models "
                                          "lists. Unset: the model name.")
    scorer: ScorerConfig | None = Field(None, description="Score every image (e.g. HPS v2.1) and return the score "
                                        "in the response: a ScorerConfig mapping, a JSON object string, or a "
                                        "scorer name. Unset: no scorer deployment.")
    max_batch_size: int = Field(8, ge=1, description="Most images one generate call runs (@serve.batch); 1 turns "
                                "batching off.")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits for more images after its "
                                        "first one arrives, in seconds.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one generator replica holds at once "
                                      "(their images share batches).")
    max_queued_requests: int = Field(32, ge=-1, description="Requests each caller (ingress replica) queues for "
                                     "the generator beyond max_ongoing_requests before new ones get a 429/503; -1 "
                                     "is unbounded. Serve counts requests still being routed as queued, so leave "
                                     "headroom for simultaneous arrivals.")
    backpressure_status: Literal[429, 503] = Field(429, description="HTTP status of a request turned away because "
                                                   "the queue is full.")
    retry_after_s: int = Field(5, ge=0, description="Retry-After header, in seconds, sent with a turned-away "
                               "request.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unanswered after this many seconds "
                                     "gets a 504 and its generation is cancelled when no other request shares it.")
    num_gpus: float = Field(0, ge=0, description="GPUs per generator replica (1 on a GPU node; 0 runs on CPU).")
    num_cpus: float = Field(1, gt=0, description="CPUs per generator replica (torch uses this many threads).")
    scorer_num_gpus: float = Field(0, ge=0, description="GPUs per scorer replica (fractions share one GPU).")
    min_replicas: int = Field(1, ge=0, description="Fewest generator replicas (0 allows scale-to-zero, at the "
                              "price of a cold start of the model).")
    max_replicas: int = Field(1, ge=1, description="Most generator replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(4, gt=0, description="Requests per generator replica the autoscaler "
                                           "aims for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds the autoscaler sees more load than "
                                   "target_ongoing_requests per replica before it adds generator replicas "
                                   "(Serve's default).")
    downscale_delay_s: float = Field(600.0, ge=0, description="Seconds the autoscaler sees less load before it "
                                     "removes generator replicas (Serve's default); a removed replica first "
                                     "finishes its requests (graceful_shutdown_timeout_s).")
    look_back_period_s: float = Field(30.0, gt=0, description="Seconds of load the autoscaler averages over "
                                      "(Serve's default).")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="Seconds a generator replica being "
                                               "removed has to finish the requests it holds before it is killed "
                                               "(Serve's default); keep it above the slowest request.")
    startup_wait_s: float = Field(10.0, gt=0, description="While no generator replica has loaded the model yet "
                                  "(first start, a GPU node joining), how long a request waits for one before it "
                                  "gets a 503 with Retry-After.")
    api_key_env: str = Field("MASKRAY_API_KEY", description="Environment variable of the replicas holding the "
                             "bearer token clients must send (in Kubernetes: from the Secret the manifests mount).")
    allow_unauthenticated: bool = Field(False, description="Serve without a bearer token when api_key_env is unset "
                                        "or empty (logged as a warning at start). Off, the endpoint refuses to "
                                        "start without a key; `maskray serve` on a loopback --host needs no key.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body but an edit's, in bytes; a "
                                   "longer one gets a 413 before it is read or parsed (a valid request is a few kB).")
    max_edit_request_bytes: int = Field(16 << 20, ge=1024, description="Largest body of POST /v1/images/edits, "
                                        "in bytes (it carries the image and mask files: a 1024x1024 PNG is about "
                                        "1-3 MB); a longer one gets a 413 before it is read or parsed.")
    max_pixel_steps: int = Field(4 * 1024 * 1024 * 64, ge=1, description="Compute budget of one request: n x "
                                 "width x height x model calls (NFE: one per step that runs, an edit's last "
                                 "int(steps x strength); Masked Z-Sampling adds two per zigzag step, 3T-2 in all); "
                                 "a costlier request gets a 422. The default allows 4 images of 1024x1024 at 64 "
                                 "vanilla steps (Meissonic's defaults).")

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_name(cls, value):
        return {"model": value} if isinstance(value, str) else value

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer_from_spec(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if not text or text == "none":
                return None
            return json.loads(text) if text.startswith("{") else {"name": text}
        return value

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}); "
                             f"raise max_replicas to at least {self.min_replicas} or lower min_replicas")
        return self

    def api_key(self, environ: Mapping[str, str]) -> str | None:
        """The bearer token clients must send, read from ``environ[api_key_env]``; None means no auth.

        Raises:
            ValueError: the variable is unset or empty and ``allow_unauthenticated`` is off, so a missing key
                never turns auth off silently.
        """
        key = environ.get(self.api_key_env) or None
        if key is None and not self.allow_unauthenticated:
            raise ValueError(f"no API key: the environment variable {self.api_key_env} is unset or empty; set it to "
                             "the bearer token clients must send (in Kubernetes, from the Secret the manifests "
                             "mount), or set allow_unauthenticated (--allow-unauthenticated) to serve without auth")
        return key

    @property
    def model_id(self) -> str:
        """The id clients use for this model."""
        return self.served_model_name or self.model.model
