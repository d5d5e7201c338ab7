"""``mint-ray teacher train``'s config: which teacher, on which cohort, how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mint_ray import storage
from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig
from mint_ray.teachers.clip import ClipSettings
from mint_ray.teachers.fusion import FusionSettings
from mint_ray.text_baseline import DEFAULT_C


class KnowledgeCheck(StrictModel):
    """Whether the teacher knows more than the note: its top-1 on the held-out split minus
    a text-only linear classifier's, both trained on the train split."""

    enabled: bool = Field(True, description="fit the text-only ceiling and compare (needs notes)")
    min_margin: float = Field(0.05, ge=-1, le=1, description="least teacher - text-only top-1")
    on_fail: Literal["error", "warn"] = Field(
        "warn", description="error: refuse to save a teacher below the margin; warn: save and say so")
    text_c: float = Field(DEFAULT_C, gt=0, description="the text classifier's inverse regularisation")


class Config(StrictModel):
    """``mint-ray teacher train``: which teacher, on which cohort, how."""

    task: str
    kind: Literal["fusion", "clip"]
    cohort_uri: str | None = Field(None, description="default <storage.root>/cohorts/<task>")
    output_uri: str | None = Field(None,
                                   description="default <storage.root>/teachers/<task>-<kind>")
    name: str | None = Field(None, description="the teacher's name; default <task>-<kind>")
    fusion: FusionSettings = Field(default_factory=FusionSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0
    eval_split: Literal["validation", "test"] = "validation"
    eval_every: int = Field(1, ge=1, description="held-out evaluation every n epochs (and the last)")
    knowledge_check: KnowledgeCheck = Field(default_factory=KnowledgeCheck)
    top_k: int | None = Field(None, ge=1, description="default: the task's answer count")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = Field(False, description="one GPU per worker unless resources_per_worker "
                                            "names another count; NCCL instead of gloo")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def cohort(self) -> str:
        return storage.absolute(self.cohort_uri or storage.join(self.storage.root, "cohorts", self.task))

    def output(self) -> str:
        return storage.absolute(self.output_uri or storage.join(self.storage.root, "teachers",
                                                         f"{self.task}-{self.kind}"))

    def teacher_name(self) -> str:
        return self.name or f"{self.task}-{self.kind}"
