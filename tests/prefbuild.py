"""What the preference-stage tests build: a local Ray, synth cohorts, tiny teachers of
both kinds, encoded images and the stage's config. Teachers are untrained (built from
configs): these tests check the plumbing, not the ranking."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from mint_ray import storage
from mint_ray.config import build_config
from mint_ray.data import synth
from mint_ray.preferences.config import Config
from mint_ray.teachers import save_teacher_dir
from mint_ray.teachers.clip import ClipSettings, build_tiny_clip
from mint_ray.teachers.fusion import FusionSettings, FusionTeacher
from mint_ray.tokenizer import train_tokenizer


def local_ray() -> Iterator[None]:
    """One local Ray for a test module (``address="local"``: never join another user's);
    use as a module fixture's body."""
    import ray

    from mint_ray.ray_cluster import worker_env

    ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": worker_env()})
    yield
    ray.shutdown()


def synth_cohort(root: str, task: str, n: int, name: str | None = None) -> str:
    """A synth cohort of ``n`` cases (30 diseases, 32-pixel images) at ``<root>/cohorts/<name or task>``."""
    uri = storage.join(root, "cohorts", name or task)
    synth.run(build_config(synth.Config, {
        "task": task, "output_uri": uri, "sizes": {"n_samples": n, "n_diseases": 30}, "image_size": 32,
        "tracking": {"enabled": False}}))
    return uri


def tiny_teacher(root: str, task: str, labels: list[str], notes: list[str]) -> str:
    """A fusion teacher for rare_disease, a CLIP teacher for tissue_type, saved under ``root``."""
    uri = storage.join(root, "teachers", task)
    if task == "rare_disease":
        tokenizer = train_tokenizer(notes, vocab_size=300)
        teacher: Any = FusionTeacher.build(
            FusionSettings(vocab_size=300, text_dim=16, text_layers=1, image_size=32, cnn_channels=[8],
                           hidden=16), tokenizer, name="rd-test", task=task, labels=labels)
    else:
        teacher = build_tiny_clip(ClipSettings(vocab_size=300, hidden_size=32, intermediate_size=64,
                                               layers=1, projection_dim=32, image_size=32, patch_size=8),
                                  name="tt-test", task=task, labels=labels)
    save_teacher_dir(teacher, uri)
    return uri


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(colour: tuple[int, int, int], size: int = 32, height: int | None = None) -> bytes:
    """A noisy PNG of one colour, ``size`` wide and ``height`` (default ``size``) high."""
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.normal(0, 10, (height or size, size, 3)), 0, 255).astype(np.uint8)
    return encode(pixels)


def prefs_config(**values: Any) -> Config:
    return build_config(Config, {"tracking": {"enabled": False}, **values})
