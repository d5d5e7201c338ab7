"""How a replica takes the version an alias moved to (``alias_swap``), on two tiny students."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from mint_ray.generation import GeneratorConfig
from mint_ray.serving.config import ServeConfig
from mint_ray.serving.loading import LoadedModel, ModelSlot, load_model, parse_model_uri
from mint_ray.tasks import RARE_DISEASE
from tests.tinymodels import make_student_dir

PROMPT = RARE_DISEASE.prompt_messages(note="Sex male Age 3 years. Seizures.")


class Versions:
    """Loads version "1" or "2" (two tiny students) and records what was loaded when."""

    def __init__(self, root: Path) -> None:
        self.folders = {v: make_student_dir(root / v, "rare_disease", seed=int(v)) for v in ("1", "2")}
        self.cfg = ServeConfig(model_uri=str(self.folders["1"]), generator=GeneratorConfig(device="cpu"))
        self.loaded: list[LoadedModel] = []
        # Per load: the version, and whether every earlier model still held its weights.
        self.events: list[tuple[str | None, bool]] = []
        self.broken: set[str] = set()

    def load(self, version: str | None) -> LoadedModel:
        assert version is not None
        self.events.append((version, all(m.generator.model is not None for m in self.loaded)))
        if version in self.broken:
            raise OSError(f"version {version} cannot be read")
        model = load_model(self.cfg, parse_model_uri(str(self.folders[version])), None)
        self.loaded.append(dataclasses.replace(model, version=version))
        return self.loaded[-1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("versions")


def test_load_beside_loads_while_the_old_version_answers(root: Path) -> None:
    versions = Versions(root)

    async def scenario() -> None:
        slot = ModelSlot(versions.load("1"), "load_beside")
        async with slot.borrow() as running:  # a batch in flight on version 1
            new = await slot.replace(versions.load, "2")
            assert (new.version, slot.model.version) == ("2", "2")
            # The batch keeps its model, still loaded, and finishes on it.
            assert running.version == "1" and running.generator.generate([PROMPT], max_new_tokens=2)
        async with slot.borrow() as model:
            assert model.version == "2" and model.generator.generate([PROMPT], max_new_tokens=2)

    asyncio.run(scenario())
    assert versions.events == [("1", True), ("2", True)]  # version 2 loaded beside a loaded 1


def test_release_first_frees_the_old_version_before_loading_and_holds_requests(root: Path) -> None:
    versions = Versions(root)

    async def scenario() -> None:
        slot = ModelSlot(versions.load("1"), "release_first")
        batch_done = asyncio.Event()

        async def batch_on_version_1() -> str | None:
            async with slot.borrow() as model:
                await batch_done.wait()
                assert model.generator.generate([PROMPT], max_new_tokens=2)
                return model.version

        async def request_during_the_swap() -> str | None:
            async with slot.borrow() as model:
                assert model.generator.generate([PROMPT], max_new_tokens=2)
                return model.version

        running = asyncio.create_task(batch_on_version_1())
        await asyncio.sleep(0.05)
        swap = asyncio.create_task(slot.replace(versions.load, "2"))
        await asyncio.sleep(0.2)
        assert versions.events == [("1", True)]  # nothing loads while a batch runs on version 1
        waiting = asyncio.create_task(request_during_the_swap())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        batch_done.set()
        assert await running == "1"
        assert (await swap).version == "2"
        assert await waiting == "2"  # held during the swap, answered by the new version

    asyncio.run(scenario())
    assert versions.events == [("1", True), ("2", False)]  # version 1 was freed first
    assert versions.loaded[0].generator.model is None


def test_release_first_reloads_the_old_version_when_the_new_one_fails(root: Path) -> None:
    versions = Versions(root)
    versions.broken.add("2")

    async def scenario() -> None:
        slot = ModelSlot(versions.load("1"), "release_first")
        with pytest.raises(OSError, match="version 2"):
            await slot.replace(versions.load, "2")
        assert slot.healthy and slot.model.version == "1"
        async with slot.borrow() as model:
            assert model.generator.generate([PROMPT], max_new_tokens=2)
        assert [v for v, _ in versions.events] == ["1", "2", "1"]

        versions.broken.add("1")
        with pytest.raises(OSError):
            await slot.replace(versions.load, "2")
        assert not slot.healthy  # Serve's health check replaces the replica

    asyncio.run(scenario())
