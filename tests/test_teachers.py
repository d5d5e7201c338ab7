"""Teachers: the fusion classifier and the tiny CLIP trained through the real stage
``run()`` on Ray (2 workers, DDP on gloo), saved, reloaded (locally and from S3),
and the one-line errors for bad input."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mint_ray import storage
from mint_ray.config import build_config
from mint_ray.errors import ConfigError, MintError
from mint_ray.model_folders import publish_dir
from mint_ray.tasks import TISSUE_TYPES
from mint_ray.teachers import (
    Case,
    Preprocessor,
    Teacher,
    load_preprocessor,
    load_teacher,
    save_teacher_dir,
    score_all,
    top_k_accuracy,
)
from mint_ray.teachers.clip import ClipSettings, build_tiny_clip, contrastive_loss
from mint_ray.teachers.cohort import read_cases, shard_positions
from mint_ray.teachers.config import Config
from mint_ray.teachers.fusion import FusionSettings, FusionTeacher
from mint_ray.teachers.knowledge import TEXT_CEILING_FILE, TEXT_CEILING_SCHEMA
from mint_ray.teachers.loader import read_spec
from mint_ray.teachers.protocol import SPEC_FILE
from mint_ray.teachers.train import _user_error, run
from mint_ray.tokenizer import train_tokenizer

# Rare disease: label i = (colour i // 2) x (word group i % 2), so top-1 needs both
# the image and the note; one modality alone narrows it to 2 or 4 labels.
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40),
           (200, 60, 220), (40, 210, 210)]
WORDS = [["Seizures", "Hypotonia", "Macrocephaly"], ["Cleft palate", "Short stature", "Hearing loss"]]
NOISE_WORDS = ["Fever", "Cough", "Myopia", "Eczema", "Anemia", "Obesity"]
DISEASES = [f"Disease {chr(ord('A') + i)}" for i in range(8)]
TISSUES = list(TISSUE_TYPES[:6])


def _png(colour: tuple[int, int, int], square: bool, rng: np.random.Generator,
         size: int = 32) -> bytes:
    """A noisy tile with a coloured disc or square somewhere near the middle."""
    img = rng.integers(90, 150, (size, size, 3)).astype(np.float64)
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    r = size // 4
    yy, xx = np.mgrid[:size, :size]
    mask = (np.maximum(abs(yy - cy), abs(xx - cx)) <= r) if square else \
        ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    img[mask] = np.clip(np.array(colour) + rng.normal(0, 15, (int(mask.sum()), 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build_cohort(root: str, task: str, per_label: dict[str, int], seed: int = 0) -> str:
    """A small cohort in the synth schema with learnable signal; returns its URI.

    ``per_label`` maps split -> cases per label. Rare disease: colour + words,
    ~10% without image and ~5% without note. Tissue: image only, colour per label.
    """
    rng = np.random.default_rng(seed)
    uri = storage.join(root, f"cohort-{task}")
    labels = DISEASES if task == "rare_disease" else TISSUES
    rows: dict[str, list[Any]] = {c: [] for c in
                                  ("sample_id", "task", "split", "note", "image_uri", "label", "meta")}
    for split, n in per_label.items():
        for li, label in enumerate(labels):
            for j in range(n):
                sid = f"{task}-{split}-{li}-{j}"
                if task == "rare_disease":
                    colour, square = COLOURS[li // 2], bool(rng.integers(2))
                    terms = [*rng.choice(WORDS[li % 2], 2, replace=False),
                             *rng.choice(NOISE_WORDS, 2, replace=False)]
                    rng.shuffle(terms)
                    sex = "female" if rng.integers(2) else "male"
                    note: str | None = (f"Sex {sex} Age {int(rng.integers(1, 15))} years "
                                        f"Ethnicity European " + " ".join(terms))
                    has_image, has_note = rng.random() > 0.1, rng.random() > 0.05
                    if not has_image:
                        has_note = True
                    note = note if has_note else None
                else:
                    colour, square, note, has_image = COLOURS[li], li % 2 == 0, None, True
                image_uri = None
                if has_image:
                    image_uri = storage.join(root, "images", task, f"{sid}.png")
                    storage.write_bytes(image_uri, _png(colour, square, rng))
                for key, value in (("sample_id", sid), ("task", task), ("split", split),
                                   ("note", note), ("image_uri", image_uri), ("label", label),
                                   ("meta", json.dumps({"synthetic": True}))):
                    rows[key].append(value)
    catalog = [{"name": label, "id": f"TEST:{i}"} for i, label in enumerate(labels)]
    storage.write_dataset(uri, pa.table(rows, schema=pa.schema(
        [(c, pa.string()) for c in rows])), overwrite=True, meta={"label_catalog": catalog})
    return uri


def _config(**values: Any) -> Config:
    return build_config(Config, values)


@pytest.fixture(scope="module", autouse=True)
def _ray_session() -> Any:
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def fusion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("fusion"))
    cohort = build_cohort(root, "rare_disease", {"train": 24, "validation": 8})
    cfg = _config(task="rare_disease", kind="fusion", cohort_uri=cohort, epochs=12,
                  batch_size=16, lr=3e-3, top_k=3, storage={"root": root},
                  fusion={"vocab_size": 300, "text_dim": 32, "image_size": 32,
                          "cnn_channels": [8, 16, 32], "image_dim": 32, "hidden": 64})
    return {"root": root, "cohort": cohort, "cfg": cfg, "summary": run(cfg)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("clip"))
    cohort = build_cohort(root, "tissue_type", {"train": 30, "validation": 10}, seed=1)
    cfg = _config(task="tissue_type", kind="clip", cohort_uri=cohort, epochs=12, batch_size=16,
                  lr=2e-3, top_k=2, storage={"root": root}, tracking={"enabled": False},
                  clip={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                        "projection_dim": 32, "image_size": 32, "patch_size": 8})
    return {"root": root, "cohort": cohort, "cfg": cfg, "summary": run(cfg)}


# ---------------------------------------------------------------- pure pieces


def test_top_k_accuracy() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    truth = np.array([1, 1, 0])
    assert top_k_accuracy(scores, truth, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, truth, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, truth, 10) == 1.0


def test_contrastive_loss_prefers_matching_captions() -> None:
    targets = torch.tensor([0, 0, 1])
    good = torch.tensor([[5.0, -5.0], [5.0, -5.0], [-5.0, 5.0]])
    assert contrastive_loss(good, targets) < 0.2 < 5 < contrastive_loss(-good, targets)
    # Two images share caption 0: the text side's best loss is its target's
    # entropy, log 2 (averaged over 2 captions, then over the 2 sides).
    assert contrastive_loss(good * 100, targets) == pytest.approx(np.log(2) / 4, abs=1e-3)


def test_shards_are_equal_and_cover_every_row() -> None:
    shards = [shard_positions(5, rank, 2) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 0]]
    assert sorted(set(shards[0]) | set(shards[1])) == list(range(5))
    assert shard_positions(4, 0, 1) == [0, 1, 2, 3]


def test_worker_mint_error_surfaces_as_one_line() -> None:
    from ray.train import WorkerGroupError

    failed = WorkerGroupError("rank 1 failed", {1: MintError("sample x: image cannot be decoded")})
    assert str(_user_error(failed)) == "sample x: image cannot be decoded"
    assert _user_error(WorkerGroupError("oom", {0: MemoryError()})) is None


def test_fusion_teacher_without_notes_scores_images() -> None:
    # tissue_type cohorts have no notes: the tokenizer then holds only bytes and specials.
    teacher = FusionTeacher.build(FusionSettings(vocab_size=300), train_tokenizer([], 300),
                                  name="t", task="tissue_type", labels=TISSUES)
    assert isinstance(teacher, Teacher)
    scores = teacher.score([Case(image=np.zeros((50, 40, 3), np.uint8)), Case(note="  ")])
    assert scores.shape == (2, len(TISSUES)) and np.isfinite(scores).all()
    np.testing.assert_allclose(np.exp(scores).sum(axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- prepare on CPU, score on the model


def _mixed_cases(rng: np.random.Generator) -> list[Case]:
    """Notes of every length (none, blank, truncated) and images of several sizes (or none)."""
    notes = [None, "  ", "Seizures", "Hypotonia Macrocephaly Short stature " * 30, "Cleft palate Ptosis"]
    shapes = [(32, 32), (50, 40), (3, 40), None, (17, 90)]
    return [Case(note=note, image=None if shape is None else rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
            for note, shape in zip(notes, shapes, strict=True)]


def _fusion_scores_before(teacher: FusionTeacher, cases: list[Case]) -> np.ndarray:
    """The fusion teacher's score() before the CPU step was split off (padding to the batch)."""
    from mint_ray.images import resize

    notes = [c.note.strip() if c.note and c.note.strip() else "" for c in cases]
    ids = teacher.tokenizer(notes, add_special_tokens=False, truncation=True,
                            max_length=teacher.settings.max_text_tokens)["input_ids"]
    width = max(1, *(len(x) for x in ids))
    input_ids = torch.full((len(cases), width), teacher.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(cases), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    mask[:, 0] = 1
    size = teacher.settings.image_size
    images = np.zeros((len(cases), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(cases):
        if c.image is not None:
            images[i] = resize(c.image, size)
    with torch.inference_mode():
        logits = teacher.model(input_ids, mask, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                               torch.tensor([bool(n) for n in notes]),
                               torch.tensor([c.image is not None for c in cases]))
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def _clip_scores_before(teacher: Any, cases: list[Case]) -> np.ndarray:
    """The CLIP teacher's score() before the CPU step was split off."""
    with torch.inference_mode():
        pixels = teacher.processor.image_processor(images=[c.image for c in cases],
                                                   return_tensors="pt")["pixel_values"]
        image = torch.nn.functional.normalize(
            teacher.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        return (image @ teacher._label_embeddings().T * teacher.model.logit_scale.exp().float()).numpy()


def _check_prepared_path(teacher: Any, cases: list[Case], before: Callable[[Any, list[Case]], np.ndarray],
                         folder: Path) -> None:
    """score(), score_prepared() on a slice of prepare()'s rows, and the CPU side loaded
    from the folder without weights all give the scores the teacher gave before."""
    np.testing.assert_array_equal(teacher.score(cases), before(teacher, cases))
    prepared = teacher.prepare(cases)
    np.testing.assert_array_equal(teacher.score_prepared({k: v[1:3] for k, v in prepared.items()}),
                                  before(teacher, cases[1:3]))
    save_teacher_dir(teacher, str(folder))
    cpu_side = load_preprocessor(str(folder))
    assert isinstance(cpu_side, Preprocessor) and cpu_side.kind == teacher.kind
    again = cpu_side.prepare(cases)
    assert all(np.array_equal(again[k], v) and again[k].dtype == v.dtype for k, v in prepared.items())
    empty = cpu_side.prepare([])
    assert {k: (v.shape[1:], v.dtype) for k, v in empty.items()} == \
        {k: (v.shape[1:], v.dtype) for k, v in prepared.items()}
    assert teacher.score_prepared(empty).shape == (0, len(teacher.labels))


def test_fusion_prepared_path_scores_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cases = _mixed_cases(np.random.default_rng(0))
    teacher = FusionTeacher.build(FusionSettings(vocab_size=300, text_dim=16, text_layers=1, max_text_tokens=16,
                                                 image_size=16, cnn_channels=[8], hidden=16),
                                  train_tokenizer([c.note or "" for c in cases], 300),
                                  name="t", task="rare_disease", labels=DISEASES)
    teacher.model.eval()
    _check_prepared_path(teacher, cases, _fusion_scores_before, tmp_path / "fusion")
    assert teacher.prepare(cases)["input_ids"].shape == (5, 16)  # padded to max_text_tokens on the CPU side


def test_clip_prepared_path_scores_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cases = [c for c in _mixed_cases(np.random.default_rng(1)) if c.image is not None]
    teacher = build_tiny_clip(ClipSettings(vocab_size=300, hidden_size=32, intermediate_size=64, layers=1,
                                           projection_dim=32, image_size=32, patch_size=8),
                              name="t", task="tissue_type", labels=TISSUES)
    # The 3-pixel-high image first would make the processor guess channels-first; the
    # reference scores the others, the prepared path (channels_last said) takes all.
    ordinary = [c for c in cases if c.image.shape[0] != 3]  # type: ignore[union-attr]
    _check_prepared_path(teacher, ordinary, _clip_scores_before, tmp_path / "clip")
    thin = teacher.prepare([cases[2]])["pixel_values"]
    assert cases[2].image.shape[0] == 3 and thin.shape == (1, 3, 32, 32)  # type: ignore[union-attr]
    with pytest.raises(MintError, match="has none"):
        teacher.prepare([Case(note="no image")])


# ---------------------------------------------------------------- fusion teacher


def test_fusion_teacher_beats_chance_by_far(fusion: dict[str, Any]) -> None:
    s = fusion["summary"]
    assert s["labels"] == 8 and s["k"] == 3 and s["eval_rows"] == 64
    assert s["top1"] > 3 * s["chance_top1"], s
    assert s["topk"] > 2 * s["chance_topk"], s
    assert len(s["version"]) == 16 and s["name"] == "rare_disease-fusion"


def test_fusion_teacher_reloads_with_same_scores(fusion: dict[str, Any], tmp_path: Path) -> None:
    s = fusion["summary"]
    teacher = load_teacher(s["teacher_uri"], device="cpu")
    assert (teacher.kind, teacher.version, teacher.task) == ("fusion", s["version"], "rare_disease")
    assert teacher.labels == tuple(DISEASES)
    cases, truth = read_cases(fusion["cohort"], "rare_disease", "validation", teacher.labels,
                              need_image=False)
    scores = score_all(teacher, cases, batch_size=16)
    # The training job's rank 0 scored the same cases through the same path.
    assert top_k_accuracy(scores, truth, 1) == pytest.approx(s["top1"])
    copy = storage.join(str(tmp_path), "copy")
    assert save_teacher_dir(teacher, copy).version == s["version"]
    again = load_teacher(copy, device="cpu")
    np.testing.assert_array_equal(score_all(again, cases), scores)
    # Missing modalities fall back to the learned "missing" vectors, never crash.
    partial = teacher.score([Case(), Case(note="Seizures Hypotonia"), Case(image=cases[0].image)])
    assert partial.shape == (3, 8) and np.isfinite(partial).all()


def test_fusion_run_is_tracked_with_lineage(fusion: dict[str, Any]) -> None:
    import mlflow

    s = fusion["summary"]
    mlflow.set_tracking_uri(f"sqlite:///{Path(fusion['root']) / 'mlflow.db'}")
    mlflow_run = mlflow.get_run(s["mlflow_run_id"])
    tags, metrics = mlflow_run.data.tags, mlflow_run.data.metrics
    assert tags["teacher.version"] == s["version"] and tags["teacher.name"] == s["name"]
    assert tags["cohort.uri"] == fusion["cohort"]
    assert tags["cohort.content_hash"] == storage.read_manifest(fusion["cohort"]).content_hash
    assert metrics["heldout_top1"] == pytest.approx(s["top1"])
    assert "note" not in json.dumps(mlflow_run.data.params).lower()


def test_knowledge_check_compares_the_teacher_with_a_text_only_ceiling(fusion: dict[str, Any]) -> None:
    import mlflow

    s = fusion["summary"]
    knowledge = s["knowledge"]
    assert read_spec(s["teacher_uri"]).metrics["knowledge"] == knowledge  # the folder's metadata
    teacher, text = knowledge["teacher"]["validation"], knowledge["text_only"]["validation"]
    assert teacher["top1"] == pytest.approx(s["top1"])
    # The note names the word group (4 of 8 labels), the image the colour (2 of 8): the
    # teacher with both beats the note alone by far, and its note-only score is text-bound.
    assert text["top1"] < 0.5 and teacher["note_top1"] < 0.5 < teacher["top1"]
    assert knowledge["margin"] == pytest.approx(teacher["top1"] - text["top1"]) and knowledge["passed"]
    assert "test" not in knowledge["teacher"]  # the cohort has no test split
    ceiling = pq.read_table(Path(s["teacher_uri"]) / TEXT_CEILING_FILE)
    assert ceiling.schema.equals(TEXT_CEILING_SCHEMA) and ceiling.num_rows == 64
    ranked = ceiling["ranked_labels"].to_pylist()
    assert all(len(set(r)) == 3 and set(r) <= set(DISEASES) for r in ranked)  # the top k = 3
    hits = np.mean([r[0] == label for r, label in zip(ranked, ceiling["label"].to_pylist(), strict=True)])
    assert hits == pytest.approx(text["top1"])
    mlflow.set_tracking_uri(f"sqlite:///{Path(fusion['root']) / 'mlflow.db'}")
    metrics = mlflow.get_run(s["mlflow_run_id"]).data.metrics
    assert metrics["knowledge_margin"] == pytest.approx(knowledge["margin"])
    assert metrics["text_top1_validation"] == pytest.approx(text["top1"])
    assert metrics["teacher_image_top1_validation"] == pytest.approx(teacher["image_top1"])


def test_teacher_without_the_margin_is_refused_and_not_saved(fusion: dict[str, Any], tmp_path: Path) -> None:
    out = str(tmp_path / "refused")
    # No teacher can beat the note by a whole 1.0 of top-1.
    cfg = fusion["cfg"].model_copy(update={
        "output_uri": out, "epochs": 1, "tracking": fusion["cfg"].tracking.model_copy(update={"enabled": False}),
        "knowledge_check": fusion["cfg"].knowledge_check.model_copy(update={"min_margin": 1.0,
                                                                            "on_fail": "error"})})
    with pytest.raises(MintError, match=r"knowledge available to transfer on validation: teacher top-1 "
                                        r"0\.\d{3} - text-only top-1 0\.\d{3}.*Nothing was saved"):
        run(cfg)
    assert not storage.exists(storage.join(out, SPEC_FILE))


def test_existing_teacher_is_not_replaced_without_overwrite(fusion: dict[str, Any]) -> None:
    with pytest.raises(MintError, match="already holds a teacher"):
        run(fusion["cfg"])


# ---------------------------------------------------------------- CLIP teacher


def test_tiny_clip_zero_shot_beats_chance_by_far(clip: dict[str, Any]) -> None:
    s = clip["summary"]
    assert s["labels"] == 6 and s["eval_rows"] == 60
    assert s["knowledge"]["skipped"] == "no notes in the train split"
    assert s["top1"] > 3 * s["chance_top1"], s
    teacher = load_teacher(s["teacher_uri"], device="cpu")
    assert teacher.kind == "clip" and teacher.requires == ("image",)
    cases, truth = read_cases(clip["cohort"], "tissue_type", "validation", teacher.labels,
                              need_image=True)
    assert top_k_accuracy(score_all(teacher, cases), truth, 1) == pytest.approx(s["top1"])
    with pytest.raises(MintError, match="has none"):
        teacher.score([Case(note="no image")])


def test_bare_siglip_directory_scores_label_prompts(tmp_path: Path) -> None:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    from mint_ray.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([f"an H&E image of {t} tissue nuclei" for t in TISSUE_TYPES],
                                vocab_size=300)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    model = SiglipModel(SiglipConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 16,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                     "eos_token_id": None},
        vision_config={**small, "image_size": 32, "patch_size": 8}))
    model.save_pretrained(str(tmp_path))
    SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                    tokenizer=tokenizer).save_pretrained(str(tmp_path))
    with pytest.raises(MintError, match="needs labels"):
        load_teacher(str(tmp_path))
    teacher = load_teacher(str(tmp_path), device="cpu", labels=TISSUE_TYPES, task="tissue_type",
                           prompt_template="an H&E image of {label} tissue nuclei")
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    scores = teacher.score([Case(image=image), Case(image=image[:20])])
    assert scores.shape == (2, len(TISSUE_TYPES)) and np.isfinite(scores).all()
    assert teacher.name == tmp_path.name and len(teacher.version) == 16
    prepared = load_preprocessor(str(tmp_path)).prepare([Case(image=image), Case(image=image[:20])])
    np.testing.assert_array_equal(teacher.score_prepared(prepared), scores)


# ---------------------------------------------------------------- S3


@pytest.mark.s3
def test_teacher_loads_from_s3(fusion: dict[str, Any], s3_bucket: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINT_RAY_CACHE", str(tmp_path / "cache"))
    local_uri = fusion["summary"]["teacher_uri"]
    uri = f"{s3_bucket}/teachers/rare_disease-fusion"
    publish_dir(Path(local_uri), uri, marker=SPEC_FILE, overwrite=True)
    assert storage.exists(storage.join(uri, SPEC_FILE))
    remote = load_teacher(uri, device="cpu")
    local = load_teacher(local_uri, device="cpu")
    assert remote.version == local.version
    cases, _ = read_cases(fusion["cohort"], "rare_disease", "validation", local.labels, False)
    np.testing.assert_array_equal(score_all(remote, cases), score_all(local, cases))
    # The CPU side comes from the spec and tokenizer files: the weights are never fetched.
    fetched: list[str] = []
    read_bytes = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u: fetched.append(u) or read_bytes(u))
    inputs = load_preprocessor(uri).prepare(cases)
    np.testing.assert_array_equal(remote.score_prepared(inputs), score_all(local, cases))
    assert fetched and not [u for u in fetched if u.endswith(".safetensors")]
    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    # A second load hits the cache (same spec) instead of downloading again.
    assert load_teacher(uri, device="cpu").version == local.version
    assert len([p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]) == 1


# ---------------------------------------------------------------- bad input


def test_bad_input_gives_one_clear_error(fusion: dict[str, Any], tmp_path: Path) -> None:
    base = {"task": "rare_disease", "cohort_uri": fusion["cohort"],
            "storage": {"root": str(tmp_path)}, "tracking": {"enabled": False}}
    with pytest.raises(ConfigError, match="kind"):
        _config(**base, kind="vit")
    with pytest.raises(ConfigError, match="unknown task"):
        run(_config(**{**base, "task": "dermatology"}, kind="fusion"))
    with pytest.raises(MintError, match="no rows of task 'tissue_type'"):
        run(_config(**{**base, "task": "tissue_type"}, kind="clip"))
    no_train = build_cohort(str(tmp_path), "rare_disease", {"validation": 2})
    with pytest.raises(MintError, match="no usable train rows"):
        run(_config(**{**base, "cohort_uri": no_train}, kind="fusion"))
    with pytest.raises(MintError, match="no complete dataset"):
        run(_config(**{**base, "cohort_uri": str(tmp_path / "nowhere")}, kind="fusion"))
    with pytest.raises(MintError, match="no teacher here"):
        load_teacher(str(tmp_path))
