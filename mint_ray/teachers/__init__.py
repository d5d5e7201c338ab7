"""Teachers: multimodal models that score every label of a task (stage 2).

``protocol`` is the interface (``Teacher``, ``Preprocessor``, ``Case``,
``TeacherSpec``); ``loader`` finds a kind by name and loads or saves a teacher
folder, or only its CPU side; ``inputs`` is each kind's CPU side (tokenising,
resizing, normalising: no weights, no torch); ``fusion`` and ``clip`` are the
kinds' models; ``train`` is the ``mint-ray teacher train`` stage (with its
``config``, ``cohort`` checks and ``knowledge`` check).
Torch and transformers are imported by the kind modules, on first use.
"""

from mint_ray.teachers.loader import KINDS, load_preprocessor, load_teacher, save_teacher_dir
from mint_ray.teachers.protocol import (
    SPEC_FILE,
    Case,
    Preprocessor,
    SavableTeacher,
    Teacher,
    TeacherSpec,
    score_all,
    top_k_accuracy,
)

__all__ = ["KINDS", "SPEC_FILE", "Case", "Preprocessor", "SavableTeacher", "Teacher", "TeacherSpec",
           "load_preprocessor", "load_teacher", "save_teacher_dir", "score_all", "top_k_accuracy"]
