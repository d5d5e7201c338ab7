"""The preference stage's config (``mint-ray preferences``): one section per concern.

YAML keys are the field names; ``limits`` is :class:`InputLimitsConfig` (named apart
from the serving limits, which bound HTTP requests rather than cohort images).
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from mint_ray import storage
from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig
from mint_ray.preferences import validate
from mint_ray.tasks import MAX_NOTE_CHARS, TaskName

# Logical CPUs of the reader (one long task) and of the pair+write tasks. They differ
# from the decode tasks' so Ray Data never fuses decoding into the single reader.
READ_CPUS = 1.0
PAIRS_CPUS = 0.2


class TeacherConfig(StrictModel):
    """Which teacher and how its actor pool is sized."""

    uri: str = Field(description="a teacher directory (mint_teacher.json) or a bare HF CLIP/SigLIP one")
    device: str = "auto"
    labels: list[str] | None = Field(
        None, description="re-target a CLIP teacher; default: its own, or for a bare CLIP "
                          "directory the task's labels or the cohort's label catalog")
    prompt_template: str | None = Field(None, description="a bare CLIP directory's label prompt")
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0, ge=0)
    num_cpus_per_actor: float = Field(1, gt=0)
    batch_size: int = Field(64, ge=1)


class PairsConfig(StrictModel):
    """k chosen, q rejected (None: the task's answer count, the paper's 10 / 5) and options."""

    k: int | None = Field(None, ge=1)
    q: int | None = Field(None, ge=1)
    pairs_per_case: int = Field(1, ge=1, description="pair j rejects the j-th q-slice from the bottom")
    min_margin: float | None = Field(None, description="drop pairs the teacher separates by less")
    force_truth: bool = Field(False, description="put a missed ground truth in chosen (k-th place)")


class PromptConfig(StrictModel):
    """Overrides of the task's prompt (None keeps the task's wording)."""

    system_prompt: str | None = None
    instruction: str | None = Field(None, description="must contain {n} and {header}")

    @field_validator("instruction")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is not None and not ("{n}" in value and "{header}" in value):
            raise ValueError("the instruction must contain {n} (answer count) and {header}")
        return value


class InputLimitsConfig(StrictModel):
    """Rows over these are quarantined: images (bytes before reading, pixels before decoding,
    reads past the deadline) and notes (the task's limit, the one the server refuses over)."""

    max_image_bytes: int = Field(16 * 2**20, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_note_chars: int = Field(MAX_NOTE_CHARS, gt=0, description="longer notes are quarantined, never cut")
    image_read_timeout_s: float = Field(60, gt=0, description="one image read's deadline")


class Config(StrictModel):
    """``mint-ray preferences``: cohort + teacher -> preference pairs and a quarantine table."""

    task: TaskName
    cohort_uri: str
    teacher: TeacherConfig
    output_uri: str | None = Field(None, description="default: <storage.root>/preferences/<task>")
    image_root: str | None = Field(None, description=(
        "images must lie inside this folder (local or s3://); default: the cohort's own folder. "
        "Relative image_uri values are taken inside the cohort's folder either way"))
    splits: list[str] = Field(default_factory=lambda: list(validate.SPLITS), min_length=1)
    pairs: PairsConfig = PairsConfig()
    prompt: PromptConfig = PromptConfig()
    limits: InputLimitsConfig = InputLimitsConfig()
    decode_num_cpus: float = Field(0.5, gt=0, description="logical CPUs per fetch/decode/prepare task")
    io_threads: int = Field(16, ge=1, description="image fetches in flight per decode task")
    block_rows: int = Field(1024, ge=1, description="cohort rows per read block (one decode task)")
    block_bytes: int = Field(16 * 2**20, gt=0, description=(
        "teacher inputs (prepared on CPU) per block sent to the teacher, and Ray Data's block size "
        "target for the run (at least one teacher batch): blocks of large inputs hold fewer rows, "
        "so the actors share the work evenly"))
    rows_per_file: int = Field(10_000, ge=1)
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, splits: list[str]) -> list[str]:
        unknown = sorted(set(splits) - set(validate.SPLITS))
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}: choose from {list(validate.SPLITS)}")
        return splits

    @model_validator(mode="after")
    def _stages_stay_apart(self) -> Config:
        t = self.teacher
        # GPU actors differ from decode tasks by their GPU already.
        clashes = {READ_CPUS} | ({t.num_cpus_per_actor} if t.num_gpus_per_actor == 0 else set())
        if self.decode_num_cpus in clashes:
            raise ValueError(f"decode_num_cpus ({self.decode_num_cpus:g}) must differ from "
                             f"{' and '.join(f'{c:g}' for c in sorted(clashes))} (the reader's and CPU "
                             "actors' CPUs): equal resources let Ray Data fuse decoding into the "
                             "reader or the teacher actors, which then decode and score in turn "
                             "instead of overlapping")
        return self

    def output(self) -> str:
        return self.output_uri or storage.join(self.storage.root, "preferences", self.task)
