"""Which model a ``model_uri`` names, and loading it: the student, its task (worded
as its metadata records it) and the label ids it can report.

A registered model is loaded at an exact version (an alias is resolved first);
its folder goes to the node-local model cache (:mod:`mint_ray.model_folders`).
A replica holds its model in a ``ModelSlot``, which takes a new version as
``ServeConfig.alias_swap`` says.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from mint_ray.errors import MintError
from mint_ray.generation import Generator, load_generator
from mint_ray.registry import alias_version as registry_alias_version
from mint_ray.registry import local_model_dir, parse_models_uri
from mint_ray.serving.config import ServeConfig
from mint_ray.serving.inputs import control_token_pattern
from mint_ray.serving.labels import LabelIds, label_catalog
from mint_ray.serving.schemas import ModelInfo
from mint_ray.tasks import TASKS, Task, get_task


@dataclass(frozen=True)
class ModelRef:
    """What ``model_uri`` names: a registered model by alias or version, or a directory."""

    uri: str
    name: str
    alias: str | None
    version: str | None

    @property
    def registered(self) -> bool:
        return self.uri.startswith("models:/")


def parse_model_uri(uri: str) -> ModelRef:
    parsed = parse_models_uri(uri)
    if parsed is not None:
        name, version, alias = parsed
        return ModelRef(uri, name, alias=alias, version=version)
    return ModelRef(uri, uri.rstrip("/").rsplit("/", 1)[-1], alias=None, version=None)


def alias_version(ref: ModelRef) -> str:
    """The version ``ref``'s alias points at now."""
    return registry_alias_version(ref.name, str(ref.alias))


def pinned_version(ref: ModelRef) -> str | None:
    """The version to load now: the alias's target, the pinned version, or None (a directory)."""
    if ref.alias:
        return alias_version(ref)
    return ref.version


def served_task(metadata: dict[str, Any]) -> Task:
    """The model's task worded as its training recorded it (``mint_model.json``'s ``prompt``:
    the preference stage's system prompt, instruction, answer count and candidates), so a
    served model is asked as it was taught; a model without the record gets the defaults."""
    return get_task(metadata["task"]).with_prompt_record(metadata.get("prompt"))


@dataclass
class LoadedModel:
    """A loaded student and where it came from; replaced whole on an alias move."""

    generator: Generator
    ref: ModelRef
    version: str | None
    task: Task  # worded as the model's metadata records (served_task)
    metadata: dict[str, Any]
    ids: LabelIds
    loaded_at: float = field(default_factory=time.time)
    # The positions the model has (prompt and answer together); None: not recorded.
    context_tokens: int | None = None
    # The tokenizer's special tokens, which a note may not carry (inputs.check_control_tokens).
    control_tokens: re.Pattern[str] | None = None

    def prompt_limit(self, max_new_tokens: int, configured: int | None) -> int | None:
        """The most prompt tokens a request may have: the context less the answer, and at
        most ``limits.max_prompt_tokens``."""
        room = None if self.context_tokens is None else self.context_tokens - max_new_tokens
        limits = [n for n in (configured, room) if n is not None]
        return max(min(limits), 0) if limits else None

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.ref.name, version=self.version, alias=self.ref.alias, uri=self.ref.uri)

    def names(self) -> set[str]:
        """What an OpenAI client may put in ``model``."""
        out = {self.ref.name, self.ref.uri}
        if self.version:
            out.add(f"{self.ref.name}/{self.version}")
        if self.ref.alias:
            out.add(f"{self.ref.name}@{self.ref.alias}")
        return out

    def describe(self) -> dict[str, Any]:
        source = f"models:/{self.ref.name}/{self.version}" if self.version else self.ref.uri
        return {"id": self.ref.name, "object": "model", "created": int(self.loaded_at), "owned_by": "mint-ray",
                "name": self.ref.name, "version": self.version, "alias": self.ref.alias, "task": self.task.name,
                "kind": self.metadata.get("kind"), "objective": self.metadata.get("objective"),
                "base_model": self.metadata.get("base_model"), "model_uri": self.ref.uri, "source": source,
                "label_ids": len(self.ids)}


def load_model(cfg: ServeConfig, ref: ModelRef, version: str | None) -> LoadedModel:
    """Load the student (registered models: exactly ``version``) from the node-local model
    cache, fetching it there first if this node has no copy yet."""
    uri = f"models:/{ref.name}/{version}" if ref.registered and version else ref.uri
    generator = load_generator(local_model_dir(uri), cfg.generator)
    if generator.task not in TASKS:
        raise MintError(f"{uri}: mint_model.json names task {generator.task!r}; "
                        f"a served model must do one of {', '.join(sorted(TASKS))}")
    if cfg.task and generator.task != cfg.task:
        raise MintError(f"{uri} is a {generator.task} model but the application is configured for "
                        f"task {cfg.task!r}: fix model_uri or task")
    task = served_task(generator.metadata)
    ids = LabelIds(label_catalog(task, generator.metadata, cfg.label_catalog_uri))
    tokenizer = generator.tokenizer
    specials = [*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())]
    return LoadedModel(generator, ref, version, task, generator.metadata, ids,
                       context_tokens=generator.context_tokens,
                       control_tokens=control_token_pattern(specials))


class ModelSlot:
    """The replica's model: batches borrow it, an alias move replaces it (``alias_swap``).

    ``load_beside``: the new version loads while the old one answers; the swap is one
    assignment, batches in flight finish on the model they borrowed, and the old model
    goes with the last of them. ``release_first``: new batches wait, those in flight
    finish, the old weights are freed, then the new version loads; if it cannot be
    loaded the old version is loaded again (``healthy`` turns False only when that
    fails too, and Serve then replaces the replica).
    """

    def __init__(self, model: LoadedModel, swap: str) -> None:
        self.model, self.swap, self.healthy = model, swap, True
        self._state = asyncio.Condition()
        self._borrowed = 0
        self._replacing = False

    @asynccontextmanager
    async def borrow(self) -> AsyncIterator[LoadedModel]:
        """The current model, kept for the whole block even if a new version comes in."""
        async with self._state:
            await self._state.wait_for(lambda: not self._replacing)
            self._borrowed += 1
            model = self.model
        try:
            yield model
        finally:
            async with self._state:
                self._borrowed -= 1
                self._state.notify_all()

    async def replace(self, load: Callable[[str | None], LoadedModel], version: str | None) -> LoadedModel:
        """Swap in ``load(version)``; its errors are raised, the slot keeps a working model."""
        if self.swap == "load_beside":
            self.model = await asyncio.to_thread(load, version)
            return self.model
        async with self._state:
            self._replacing = True
            await self._state.wait_for(lambda: self._borrowed == 0)
        old = self.model
        try:
            await asyncio.to_thread(old.generator.close)
            try:
                self.model = await asyncio.to_thread(load, version)
            except Exception:
                self.model = await asyncio.to_thread(load, old.version)
                raise
            return self.model
        except Exception:
            self.healthy = self.model is not old
            raise
        finally:
            async with self._state:
                self._replacing = False
                self._state.notify_all()
