"""Teachers: multimodal models that score every label of a task (stage 2).

``load_teacher(uri)`` returns a :class:`Teacher`; ``mint-ray teacher train``
(:mod:`mint_ray.teachers.train`) trains a fusion classifier or a tiny CLIP.
Torch and transformers are imported by the kind modules, on first use.
"""

from mint_ray.teachers.base import (
    KINDS,
    SPEC_FILE,
    Case,
    SavableTeacher,
    Teacher,
    TeacherSpec,
    decode_image,
    load_teacher,
    save_teacher_dir,
    score_all,
    top_k_accuracy,
)

__all__ = ["KINDS", "SPEC_FILE", "Case", "SavableTeacher", "Teacher", "TeacherSpec",
           "decode_image", "load_teacher", "save_teacher_dir", "score_all", "top_k_accuracy"]
