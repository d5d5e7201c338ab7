"""Batch generation with Ray Data: a student answers every test prompt in an actor pool.

The driver turns the test cases into rows (sample id, chat messages as JSON,
image URI); ``map_batches`` sends batches to a pool of ``GenerationActor``s, each
holding one ``Generator`` (``mint_ray.generation``: the one generation path,
shared with serving) on its GPU or CPU threads; images are read from storage
inside the actor. The test split is small, so the answers are collected on the
driver.

Every actor resolves the model itself (``local_model_dir``): on a cluster the
driver's disk is not the workers', so each node fetches its own copy once
(``models:/``, ``s3://``) into the node-local model cache (:mod:`mint_ray.model_folders`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from mint_ray import model_folders, registry, storage
from mint_ray.config import StrictModel
from mint_ray.errors import MintError
from mint_ray.generation import SAMPLING_TEXT, SAMPLING_VISION, GeneratorConfig
from mint_ray.model_folders import METADATA_FILE, write_metadata
from mint_ray.tasks import Task, get_task


class GenerationConfig(StrictModel):
    """How answers are generated. Greedy is reproducible; ``paper`` is the authors'
    sampling (text T=0.8, top_p 0.8, top_k 10; vision T=0.7, top_p 0.6, top_k 10)."""

    decoding: Literal["greedy", "paper"] = "greedy"
    max_new_tokens: int | None = Field(None, gt=0, description="default: the paper's 512 (text) / 100 (vision)")
    seed: int = Field(0, description="torch seed of each actor (sampling only)")
    batch_size: int = Field(8, gt=0)
    actors: int = Field(1, gt=0, description="actor pool size (one model copy each)")
    num_gpus_per_actor: float = Field(0, ge=0)
    # Fractional by default: an actor pool taking every CPU starves Ray Data's
    # read tasks on small hosts and the pipeline stalls.
    num_cpus_per_actor: float = Field(0.5, gt=0)
    # The backend, device and dtype each actor loads the student with.
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)


def decoding_kwargs(cfg: GenerationConfig, task: Task) -> dict[str, Any]:
    """``generate()`` keyword arguments for ``cfg`` on ``task`` (max_new_tokens included)."""
    paper = SAMPLING_VISION if task.modality == "image" else SAMPLING_TEXT
    kwargs = dict(paper) if cfg.decoding == "paper" else {"do_sample": False}
    kwargs["max_new_tokens"] = cfg.max_new_tokens or paper["max_new_tokens"]
    return kwargs


@dataclass(frozen=True)
class Request:
    """One prompt to answer: chat messages (TRL format) and, for the vision student, an image."""

    sample_id: str
    messages: list[dict[str, Any]]
    image_uri: str | None = None


# ---------------------------------------------------------------- model directories


def _as_base_checkpoint(path: Path, uri: str, task: Task) -> Path:
    """A plain Hugging Face checkpoint (no ``mint_model.json``: the base model) as a
    student directory: links to its files plus the metadata the loader needs."""
    if not (path / "config.json").is_file():
        raise MintError(f"model {uri!r} is neither a mint-ray model ({METADATA_FILE}) nor a Hugging "
                        "Face checkpoint (config.json): check the URI")
    metadata = {"task": task.name, "kind": "mllama" if task.modality == "image" else "causal_lm",
                "objective": "none", "base_model": uri, "merged": True}

    def link(tmp: Path) -> None:
        for child in path.iterdir():
            (tmp / child.name).symlink_to(child.resolve())
        write_metadata(tmp, metadata)

    key = model_folders.cache_key(str(path.resolve()), json.dumps(metadata, sort_keys=True))
    return model_folders.cached("base-as-student", key, link)


def local_model_dir(uri: str, task: Task, tracking_uri: str | None = None) -> Path:
    """A local student directory for ``uri``: a local folder, ``s3://`` folder,
    ``models:/name/version`` (or ``@alias``), or a bare base checkpoint (which is
    then treated as a student of ``task``). Remote ones are fetched once per node."""
    if tracking_uri and uri.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    path = registry.local_model_dir(uri)
    return path if (path / METADATA_FILE).is_file() else _as_base_checkpoint(path, uri, task)


# ---------------------------------------------------------------- generation


class GenerationActor:
    """Holds one loaded student; answers a batch of rows (``sample_id``, ``messages``, ``image_uri``)."""

    def __init__(self, model_uri: str, task_name: str, decoding: dict[str, Any], seed: int,
                 tracking_uri: str | None, generator: dict[str, Any]) -> None:
        import torch

        from mint_ray.generation import load_generator

        self._generator = load_generator(local_model_dir(model_uri, get_task(task_name), tracking_uri),
                                         GeneratorConfig.model_validate(generator))
        self._decoding = decoding
        torch.manual_seed(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        messages = [json.loads(m) for m in batch["messages"]]
        images = ([storage.read_bytes(str(u)) for u in batch["image_uri"]]
                  if self._generator.processor is not None else None)
        answers = self._generator.generate(messages, images, **self._decoding)
        return {"sample_id": batch["sample_id"], "generation": np.array(answers, dtype=object)}


def generate(model_uri: str, task: Task, requests: Sequence[Request], cfg: GenerationConfig,
             tracking_uri: str | None = None) -> dict[str, str]:
    """Answer every request with the model at ``model_uri`` in a Ray Data actor pool.

    Returns ``{sample_id: generated text}``. Ray must be initialised. With
    ``decoding: paper`` each actor seeds torch once, so samples depend on how
    the rows were batched (fixed batch size and pool size give the same batches
    only up to Ray's scheduling).
    """
    import ray.data

    if not requests:
        return {}
    rows = [{"sample_id": r.sample_id, "messages": json.dumps(r.messages), "image_uri": r.image_uri}
            for r in requests]
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / cfg.batch_size))
    answered = ds.map_batches(
        GenerationActor,
        fn_constructor_kwargs={"model_uri": model_uri, "task_name": task.name,
                               "decoding": decoding_kwargs(cfg, task), "seed": cfg.seed,
                               "tracking_uri": tracking_uri, "generator": cfg.generator.model_dump()},
        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=cfg.num_gpus_per_actor, num_cpus=cfg.num_cpus_per_actor).take_all()
    out = {str(row["sample_id"]): str(row["generation"]) for row in answered}
    missing = {r.sample_id for r in requests} - set(out)
    if missing:
        raise MintError(f"generation returned no answer for {len(missing)} case(s) "
                        f"(e.g. {sorted(missing)[:3]}): see the actor logs above")
    return out
