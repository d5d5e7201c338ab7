"""Tiny student directories in the exported format (weights, tokenizer/processor,
``mint_model.json``), without running a training job: for evaluation and serving
tests that need *a* model, not a trained one."""

from __future__ import annotations

import json
from pathlib import Path

from mint_ray.model_folders import METADATA_FILE
from mint_ray.students import TinyStudentConfig, build_tiny_student
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE, TISSUE_TYPES
from tests.prefdata import DISEASES, TERMS


def make_student_dir(path: str | Path, task: str = "rare_disease", seed: int = 0) -> Path:
    """Build an untrained tiny student for ``task`` at ``path`` (a causal LM or Mllama)."""
    kind = "mllama" if task == "tissue_type" else "causal_lm"
    t = TISSUE_TYPE if kind == "mllama" else RARE_DISEASE
    labels = list(TISSUE_TYPES) if kind == "mllama" else DISEASES
    texts = [t.system_prompt, t.instruction, t.format_answer(labels), *TERMS] * 4
    out = build_tiny_student(kind, texts, path, TinyStudentConfig(vocab_size=400, seed=seed))
    (out / METADATA_FILE).write_text(json.dumps({
        "task": task, "kind": kind, "objective": "none", "base_model": f"tiny-{kind}",
        "data_uri": "", "data_content_hash": "", "teacher": {}, "merged": True}, indent=2))
    return out
