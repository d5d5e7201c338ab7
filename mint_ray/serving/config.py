"""What a served application and ``mint-ray serve`` are configured with.

``ServeConfig`` is an application's ``args`` (``serving/config.yaml``); the YAML
keys are the field names. Unknown keys are an error, as in every stage.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mint_ray.config import RayConfig, StrictModel
from mint_ray.generation import GeneratorConfig
from mint_ray.images import ALLOWED_FORMATS, ImageLimits
from mint_ray.tasks import MAX_NOTE_CHARS, TASKS

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RequestLimitsConfig(StrictModel):
    """What one request may carry, and how long its body may take to arrive. Bigger
    or slower requests are refused with a 4xx, never truncated.

    The prompt is limited in tokens, the unit the model pays in: a note within
    ``max_note_chars`` can still be 4 tokens a character (emoji, rare scripts). A
    prompt over ``max_prompt_tokens`` (None: the model's context length less the
    answer's ``max_new_tokens``) is refused (413 ``prompt_too_long``, naming the
    limit). Training cut over-long notes from their end (``prompt_overflow:
    cut_note``); the server does not: a shortened note is a different clinical
    question, so the client decides what to leave out.
    """

    max_body_bytes: int = Field(8 * 2**20, gt=0)
    max_note_chars: int = Field(MAX_NOTE_CHARS, gt=0)  # the preference build quarantines longer notes
    max_prompt_tokens: int | None = Field(None, gt=0)
    # A body must arrive in time or the request gets a 408, because a replica's
    # request slots (max_ongoing_requests) are held while a body is read: its first
    # part within body_start_timeout_s (this includes Ray's hop from the proxy to the
    # replica, seconds on a busy node), then min_body_bytes_per_s on average from that
    # part on after body_grace_s (a trickling client holds a slot for about the
    # grace), all of it within body_timeout_s.
    body_timeout_s: float = Field(30, gt=0)
    body_start_timeout_s: float = Field(10, gt=0)
    body_grace_s: float = Field(2, ge=0)
    min_body_bytes_per_s: int = Field(16 * 1024, ge=0)
    max_image_bytes: int = Field(ImageLimits.max_bytes, gt=0)
    # Checked on the header before any pixel is decoded (decompression bombs).
    max_image_pixels: int = Field(ImageLimits.max_pixels, gt=0)
    image_formats: list[str] = Field(default_factory=lambda: list(ALLOWED_FORMATS), min_length=1)
    max_top_k: int = Field(20, gt=0)

    @field_validator("image_formats")
    @classmethod
    def _upper(cls, formats: list[str]) -> list[str]:
        return [f.upper() for f in formats]

    def image_limits(self) -> ImageLimits:
        """The limits :func:`mint_ray.images.open_rgb` decodes a request's image with."""
        return ImageLimits(self.max_image_bytes, self.max_image_pixels, tuple(self.image_formats))


class RequestBatchingConfig(StrictModel):
    """``@serve.batch`` settings; ``max_batch_size: 1`` turns batching off.

    ``batch_wait_timeout_s`` is how long a batch waits to fill after its first request:
    added latency at low load, fuller (cheaper per answer) batches under load.
    """

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class DeploymentConfig(StrictModel):
    """Replicas and their resources. ``autoscaling`` replaces ``num_replicas`` when set."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    # Serve's default (5) would cap a batch at 5 requests per replica.
    max_ongoing_requests: int = Field(32, ge=1)
    # -1: unbounded; a bound turns overload into 503s instead of growing latency.
    max_queued_requests: int = Field(-1, ge=-1)
    # How long a stopping replica (serve.delete, a rolling update) waits for its
    # requests in flight before it is killed.
    graceful_shutdown_timeout_s: float = Field(20, ge=0)


class ServeConfig(StrictModel):
    """One Serve application: the ``args`` of ``mint_ray.serving.app:build_app``."""

    model_uri: str = Field(min_length=1)
    # When set, the model's mint_model.json must name this task (a guard against
    # serving the wrong model under a route).
    task: str | None = None
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI
    # How often a replica serving an alias asks the registry where it points; 0: never.
    alias_poll_s: float = Field(30, ge=0)
    # How a replica takes the version the alias moved to (loading.ModelSlot).
    # load_beside (default): the new version loads while the old one keeps answering, so
    #   a move costs no pause; the replica needs room for both (two copies of the 1B text
    #   student, or of the 11B in bf16 on an 80 GB GPU).
    # release_first: requests wait while the old version is freed and the new one loads
    #   (none is dropped); for a replica without room for two copies.
    alias_swap: Literal["load_beside", "release_first"] = "load_beside"
    max_new_tokens: int | None = Field(None, gt=0)  # None: the task's paper setting
    # The NAME of the environment variable holding the key (never the key itself).
    api_key_env: str | None = None
    cors_origins: list[str] = Field(default_factory=list)  # empty: no CORS headers
    # A dataset whose manifest meta has ``label_catalog`` (or synth's ``labels``):
    # [{"name", "id"}]. None: the tissue ids, or the model's lineage (its preference
    # data's cohort) when that is readable.
    label_catalog_uri: str | None = None
    limits: RequestLimitsConfig = Field(default_factory=RequestLimitsConfig)
    batching: RequestBatchingConfig = Field(default_factory=RequestBatchingConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    # The backend, device and dtype a replica loads the student with.
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose one of {', '.join(sorted(TASKS))}")
        return task

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.match(name):
            raise ValueError("api_key_env is the name of an environment variable (e.g. MINT_API_KEY), "
                             "not the key itself")
        return name


class HttpConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class Config(StrictModel):
    """``mint-ray serve``: one application on a local (or attached) Ray cluster."""

    app: ServeConfig
    http: HttpConfig = Field(default_factory=HttpConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    name: str = "mint"
    route_prefix: str = "/"
    # Block until Ctrl-C or SIGTERM, then delete this application (its replicas finish
    # the requests in flight) and exit 0; other applications on the cluster keep
    # running. False returns once the application is up (with ray.address, it keeps running).
    wait: bool = True

    @model_validator(mode="after")
    def _prefix(self) -> Config:
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/' (got {self.route_prefix!r})")
        return self
