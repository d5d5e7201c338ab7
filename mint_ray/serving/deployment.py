"""The Serve deployment: one replica holds the model, follows its alias and batches.

Requests are batched with ``@serve.batch`` (size and wait from config, changed live
through ``user_config``). A request is checked completely before it joins a batch
(``prepare``: its text encodes, carries no control token and its prompt fits the
model), and a batch that fails anyway is run again one request at a time
(``generate_each``), so a request that breaks generation fails alone.

A replica that serves an alias polls the registry and, when the alias moves, takes
the new version as ``alias_swap`` says (:class:`~mint_ray.serving.loading.ModelSlot`):
loaded beside the old one and swapped in, or loaded after the old one is freed. A
batch keeps the model it started with either way, so no request is dropped. The HTTP
routes are built by :mod:`mint_ray.serving.routes` once the model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image
from ray import serve
from starlette.types import ASGIApp

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.serving.config import RequestBatchingConfig, ServeConfig
from mint_ray.serving.guard import read_api_key
from mint_ray.serving.inputs import (
    check_control_tokens,
    check_prompt_tokens,
    check_task,
    check_text,
    decode_base64,
    decode_image,
    prompt_for,
    prompt_tokens,
)
from mint_ray.serving.loading import (
    LoadedModel,
    ModelSlot,
    alias_version,
    load_model,
    parse_model_uri,
    pinned_version,
)
from mint_ray.serving.routes import create_api
from mint_ray.serving.schemas import RequestError

DEPLOYMENT_NAME = "MintStudent"
# Serve routes the "ray.serve" logger into the replica's log file.
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Job:
    """One validated request, ready for the batch."""

    messages: list[dict[str, Any]]
    image: Image.Image | None
    top_k: int


@dataclass(frozen=True)
class Answer:
    text: str
    model: LoadedModel


J = TypeVar("J")
R = TypeVar("R")


async def generate_each(run: Callable[[list[J]], Awaitable[list[R]]], jobs: list[J]) -> list[R | Exception]:
    """``run(jobs)``; if that fails, each job again on its own, so a job that breaks the
    batch gets its own error and the others their answers."""
    try:
        return list(await run(jobs))
    except Exception as err:
        if len(jobs) == 1:
            return [err]
        log.warning("a batch of %d failed (%s): answering its requests one by one", len(jobs), type(err).__name__)
    out: list[R | Exception] = []
    for job in jobs:
        try:
            out.extend(await run([job]))
        except Exception as err:  # this request's own failure
            out.append(err)
    return out


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class MintStudent:
    """A replica: the model, the alias watcher, the batcher and the HTTP routes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(config)
        # PIL's own guard for any decode path, at the configured limit.
        Image.MAX_IMAGE_PIXELS = self.cfg.limits.max_image_pixels
        self.api_key = read_api_key(self.cfg)
        if self.cfg.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self.ref = parse_model_uri(self.cfg.model_uri)
        version = await asyncio.to_thread(pinned_version, self.ref)
        self.slot = ModelSlot(await asyncio.to_thread(load_model, self.cfg, self.ref, version), self.cfg.alias_swap)
        self.alias_error: str | None = None
        self.alias_checked_at: float | None = None
        self._watcher: asyncio.Task | None = None
        if self.ref.alias and self.cfg.alias_poll_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_alias())
        log.info("serving %s (version %s, task %s)", self.ref.uri, self.model.version, self.model.task.name)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_api(self)

    @property
    def model(self) -> LoadedModel:
        """The model requests are checked against now (its weights may be away during a
        ``release_first`` swap; its tokenizer and metadata are not)."""
        return self.slot.model

    def check_health(self) -> None:
        """Serve replaces a replica whose swap failed and that could not reload its old version."""
        if not self.slot.healthy:
            raise RuntimeError(f"no model loaded after a failed alias move: {self.alias_error}")

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop polling the alias."""
        if getattr(self, "_watcher", None) is not None:
            self._watcher.cancel()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config`` carries the batching settings; Serve calls this on start and on
        every change, without restarting the replica."""
        batching = RequestBatchingConfig.model_validate(user_config or {})
        self._generate.set_max_batch_size(batching.max_batch_size)
        self._generate.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @property
    def max_new_tokens(self) -> int:
        from mint_ray.generation import SAMPLING_TEXT, SAMPLING_VISION

        default = SAMPLING_TEXT if self.model.task.modality == "text" else SAMPLING_VISION
        return self.cfg.max_new_tokens or int(default["max_new_tokens"])

    def _load_version(self, version: str | None) -> LoadedModel:
        """``version`` of the served model, refused if it does another task."""
        served = self.model
        new = load_model(self.cfg, self.ref, version)
        if new.task.name != served.task.name:
            raise MintError(f"version {version} is a {new.task.name} model; this deployment serves "
                            f"{served.task.name}: keeping version {served.version}")
        return new

    async def _watch_alias(self) -> None:
        """Follow the alias: swap in the version it points at (``alias_swap``: how)."""
        while True:
            await asyncio.sleep(self.cfg.alias_poll_s)
            try:
                version = await asyncio.to_thread(alias_version, self.ref)
                self.alias_checked_at, self.alias_error = time.time(), None
                if version == self.model.version:
                    continue
                log.info("alias %s moved to version %s: loading it (%s)", self.ref.uri, version,
                         self.cfg.alias_swap)
                new = await self.slot.replace(self._load_version, version)
                log.info("now serving %s version %s", self.ref.name, new.version)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep serving the loaded version
                self.alias_error = storage.redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
                log.warning("alias check of %s failed: %s", self.ref.uri, self.alias_error)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced from config by reconfigure()
    async def _generate(self, jobs: list[Job]) -> list[Answer | Exception]:
        """One answer, or that request's own error, per job (never one error for all)."""
        # One model for the whole batch, even if the alias moves now.
        async with self.slot.borrow() as model:

            async def run(batch: list[Job]) -> list[Answer]:
                images = [j.image for j in batch] if model.task.modality == "image" else None
                texts = await asyncio.to_thread(model.generator.generate, [j.messages for j in batch], images,
                                                max_new_tokens=self.max_new_tokens)
                return [Answer(text, model) for text in texts]

            return await generate_each(run, jobs)

    async def prepare(self, task_name: str, note: str | None, image: bytes | str | None,
                      top_k: int | None) -> Job:
        """Validate one request against the loaded model and the limits."""
        task = check_task(task_name, self.model.task)
        limits = self.cfg.limits
        k = top_k or task.n_answers
        if k > limits.max_top_k:
            raise RequestError(422, "invalid_field", f"top_k is at most {limits.max_top_k}", "top_k")
        if task.modality == "text":
            if image is not None:
                raise RequestError(422, "wrong_input", f"task {task.name} reads a clinical note, not an image",
                                   "image")
            if note is None or not note.strip():
                raise RequestError(422, "missing_note", f"task {task.name} needs a non-empty 'note'", "note")
            if len(note) > limits.max_note_chars:
                raise RequestError(422, "note_too_long", f"note is {len(note)} characters, over the limit of "
                                   f"{limits.max_note_chars}", "note")
            check_text(note, "note")
            check_control_tokens(note, self.model.control_tokens, "note")
            job = Job(prompt_for(task, note, k), None, k)
        else:
            if image is None:
                raise RequestError(422, "missing_image", f"task {task.name} needs an 'image'", "image")
            raw = decode_base64(image, limits) if isinstance(image, str) else image
            pil = await asyncio.to_thread(decode_image, raw, limits)
            job = Job(prompt_for(task, None, k), pil, k)
        limit = self.model.prompt_limit(self.max_new_tokens, limits.max_prompt_tokens)
        if limit is not None:
            # The tokens, not the characters, are what the model pays for (memory grows
            # with their square in a padded batch): counted before the batch.
            check_prompt_tokens(await asyncio.to_thread(prompt_tokens, self.model.generator.tokenizer,
                                                        job.messages), limit)
        return job

    async def answer(self, job: Job) -> Answer:
        result = await self._generate(job)
        if isinstance(result, Exception):
            raise result
        return result
